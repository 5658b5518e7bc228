"""int8 before and after repair (convert/export/quantization.py) on the zoo (issues 11 and 24).

Models ("--what"): `original`, each zoo model as it was trained (what `convert-model --no-separate --quantize int8`
exports), and `k1`, the zoo's BatchNorm nets forced to K=1: `convert-model MODEL k1.keras --rank 1 --quantize none
--data train.npz --validation-data validation.npz --test-data test.npz` once (separation, refinement, BatchNorm
recalibration, fine-tuning: cached in OUT/MODEL/int8/; recovery "after" is convert-model's default, "before" adds
`--learning-rate 3e-4 --no-frozen-batchnorm-pass`, what it did before the fine-tuning changes of issue 11).
Then the int8 TFLite and ONNX artifacts of that Keras model with each repair setting: "off" (the first attempt
only), "no-cle" (no cross-layer equalization), "no-round" (the repair before issue 24: equalization, calibration,
float layers), "on" (the default: also weight rounding, bias correction and the other weight granularity),
"symmetric" (as "on" with the weight rounding aimed at each layer's float weights on the rounded copy's inputs, as
GPTQ was published and as the repair did before its asymmetric target). Each is judged, as convert-model judges
it, on the zoo's validation digits (half of the digits' test split, never trained on): the attempts' agreement
there, and whether one passed (what --quantize auto's fallback follows); then scored on the other half, the test
digits: top-1 agreement with the Keras model, accuracy, size, layers kept in float, and the repair's seconds.
Calibration: 200 training samples. A setting whose int8 fails on validation has its diagnosis' worst layers, alone
and together, in the JSON.

usage: scripts/bench-int8 [--models resnet_bn,mini_xception | all] [--what k1 | original | both]
                          [--formats tflite,onnx] [--recovery after] [--repair off,on | no-cle | no-round | symmetric]
                          [--out build/zoo]
                          (writes OUT/bench-int8.json, prints a Markdown table)
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet_bn,mini_xception", help="comma-separated zoo names, or all")
    parser.add_argument("--what", default="k1", help="original, k1 or both (see above)")
    parser.add_argument("--formats", default="tflite,onnx")
    parser.add_argument("--recovery", default="after", help="k1 only: before, after or both (see above)")
    parser.add_argument("--repair", default="off,on", help="any of off, no-cle, no-round, on")
    parser.add_argument("--out", type=Path, default=Path("build/zoo"))
    args = parser.parse_args(argv)
    from sepconv.convert.demo import zoo

    rows = []
    recoveries = ("before", "after") if args.recovery == "both" else (args.recovery,)
    kinds = [(what, recovery) for what in (("original", "k1") if args.what == "both" else (args.what,))
             for recovery in (recoveries if what == "k1" else ("",))]
    names = list(zoo.ZOO) if args.models == "all" else args.models.split(",")
    for name in names:
        for what, recovery in kinds:
            for fmt in args.formats.split(","):
                for repair in args.repair.split(","):
                    rows.append(measure(name, what, fmt, recovery, repair, args.out))
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "diagnosis"}), file=sys.stderr,
                          flush=True)
    (args.out / "bench-int8.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return 0


RECOVERY_FLAGS = {"before": ["--learning-rate", "3e-4", "--no-frozen-batchnorm-pass"], "after": []}
REPAIRS = {"off": dict(repair=False), "no-cle": dict(equalize=False), "no-round": dict(round_weights=False),
           "symmetric": dict(asymmetric_rounding=False), "on": dict()}


def separated(name: str, recovery: str, out: Path):
    from sepconv.convert.demo import zoo

    entry = zoo.entry(name, out)
    folder = out / name / "int8"
    folder.mkdir(parents=True, exist_ok=True)
    k1 = folder / ("k1.keras" if recovery == "after" else f"k1-{recovery}.keras")
    if not k1.exists():
        convert = Path(sys.executable).parent / "convert-model"
        subprocess.run([str(convert), str(entry.model), str(k1), "--rank", "1", "--quantize", "none", "--data",
                        str(entry.train), "--validation-data", str(entry.validation), "--test-data", str(entry.test),
                        "--quiet", "--json", str(k1) + ".run.json"]
                       + RECOVERY_FLAGS[recovery], check=True, stdout=subprocess.DEVNULL)
    return entry, k1


def measure(name: str, what: str, fmt: str, recovery: str, repair: str, out: Path) -> dict:
    import time

    from sepconv.convert.data import DataOptions, load_data, resolve_scale
    from sepconv.convert.demo import zoo
    from sepconv.convert.export import quantization as q
    from sepconv.convert.export.targets import target_named
    from sepconv.convert.export.verification import Tolerance, verify
    from sepconv.convert.loading import load
    from sepconv.deploy import open_runtime

    if what == "k1":
        entry, path = separated(name, recovery, out)
    else:
        entry = zoo.entry(name, out)
        path = entry.model
    model = load(path)
    scaling, _ = resolve_scale(model, DataOptions())  # as the pipeline: raw pixels for a model that rescales them
    train = load_data(entry.train, model.input_shape, scaling)  # as the pipeline with --validation-data
    validation, test = (load_data(path, model.input_shape, scaling) for path in (entry.validation, entry.test))
    calibration = q.Calibration(train.x[:200], train.x, validation.x)
    started = time.perf_counter()
    artifact, report = q.quantize_verified(model, target_named(fmt), calibration, tolerance=Tolerance(),
                                           options=q.QuantizationOptions(**REPAIRS[repair]))
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        artifact_path = Path(tmp) / f"int8.{fmt}"
        artifact_path.write_bytes(artifact)
        checked = verify(model, open_runtime(str(artifact_path)), test.x, test.y, quantized=True, quantize="int8")
    first = checked.outputs[0]
    chosen = report.attempts[report.chosen].name if report.passed else None
    return {"model": name, "what": what if what == "original" else f"k1 ({recovery})", "format": fmt,
            "repair": repair, "original_accuracy": entry.accuracy, "keras_accuracy": first.keras_accuracy,
            "validation_passed": report.passed, "chosen": chosen, "agreement": first.agreement,
            "accuracy": first.accuracy, "passed": checked.passed, "bytes": len(artifact), "seconds": round(seconds, 1),
            "float_layers": [f"{f.layer} ({f.op})" for f in report.float_layers],
            "attempts": [f"{a.name}: {a.agreement:.2%}" for a in report.attempts],
            "diagnosis": report.diagnosis.summary() if report.diagnosis and not report.passed else None}


def table(rows) -> str:
    from tabulate import tabulate

    lines = [[r["model"], r["what"], r["format"], r["repair"], f"{r['keras_accuracy']:.2%}",
              "passed: " + r["chosen"] if r["validation_passed"] else "FAILED (auto falls back)",
              f"{r['agreement']:.2%}", f"{r['accuracy']:.2%}", "passed" if r["passed"] else "FAILED",
              f"{r['bytes']:,}", len(r["float_layers"]), r["seconds"], "; ".join(r["attempts"])] for r in rows]
    return tabulate(lines, headers=["model", "what", "format", "repair", "Keras accuracy (test)",
                                    "int8 on validation", "int8 agreement (test)", "int8 accuracy (test)",
                                    "verification (test)", "bytes", "float layers", "repair seconds",
                                    "attempts (agreement on validation)"], tablefmt="github", disable_numparse=True)


if __name__ == "__main__":
    raise SystemExit(main())
