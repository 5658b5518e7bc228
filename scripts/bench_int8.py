"""int8 before and after repair (convert/export/quantization.py) on the zoo's BatchNorm nets forced to K=1 (issue 11).

For each model and recovery: `convert-model MODEL k1.keras --rank 1 --quantize none --data train.npz
--validation-data validation.npz --test-data test.npz` once (separation, refinement, BatchNorm recalibration,
fine-tuning: cached in OUT/MODEL/int8/). Recovery "after" is convert-model's default; "before" adds `--learning-rate 3e-4 --no-frozen-batchnorm-pass`, what it did
before the fine-tuning changes of issue 11. Then the int8 TFLite and ONNX artifacts of that Keras model with each
repair setting: "off" (the first attempt, as convert-model exported before issue 11), "no-cle" (calibration and float
layers only), "on" (cross-layer equalization first, the default), each scored on the test digits: top-1 agreement
with the K=1 Keras model, accuracy, size, layers kept in float. Calibration: 200 training samples; the repair is
judged on the zoo's validation digits (half of the digits' test split, never trained on); the other half only scores.

usage: scripts/bench-int8 [--models resnet_bn,mini_xception] [--formats tflite,onnx] [--recovery after]
                          [--repair off,on] [--out build/zoo]   (writes OUT/bench-int8.json, prints a Markdown table)
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet_bn,mini_xception")
    parser.add_argument("--formats", default="tflite,onnx")
    parser.add_argument("--recovery", default="after", help="before, after or both (see above)")
    parser.add_argument("--repair", default="off,on", help="any of off, no-cle, on")
    parser.add_argument("--out", type=Path, default=Path("build/zoo"))
    args = parser.parse_args(argv)
    rows = []
    recoveries = ("before", "after") if args.recovery == "both" else (args.recovery,)
    for name in args.models.split(","):
        for recovery in recoveries:
            for fmt in args.formats.split(","):
                for repair in args.repair.split(","):
                    rows.append(measure(name, fmt, recovery, repair, args.out))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    (args.out / "bench-int8.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return 0


RECOVERY_FLAGS = {"before": ["--learning-rate", "3e-4", "--no-frozen-batchnorm-pass"], "after": []}
REPAIRS = {"off": dict(repair=False), "no-cle": dict(equalize=False), "on": dict()}


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


def measure(name: str, fmt: str, recovery: str, repair: str, out: Path) -> dict:
    from sepconv.convert.export import quantization as q
    from sepconv.convert.export.targets import target_named
    from sepconv.convert.data import load_data
    from sepconv.convert.loading import load
    from sepconv.convert.export.verification import Tolerance, verify
    from sepconv.deploy import open_runtime

    entry, k1 = separated(name, recovery, out)
    model = load(k1)
    train = load_data(entry.train, model.input_shape)  # as the pipeline with --validation-data
    validation, test = (load_data(path, model.input_shape) for path in (entry.validation, entry.test))
    calibration = q.Calibration(train.x[:200], train.x, validation.x)
    artifact, report = q.quantize_verified(model, target_named(fmt), calibration, tolerance=Tolerance(),
                                           options=q.QuantizationOptions(**REPAIRS[repair]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"int8.{fmt}"
        path.write_bytes(artifact)
        checked = verify(model, open_runtime(str(path)), test.x, test.y, quantized=True, quantize="int8")
    first = checked.outputs[0]
    return {"model": name, "format": fmt, "recovery": recovery, "repair": repair, "original_accuracy": entry.accuracy,
            "keras_k1_accuracy": first.keras_accuracy, "agreement": first.agreement, "accuracy": first.accuracy,
            "passed": checked.passed, "bytes": len(artifact),
            "float_layers": [f"{f.layer} ({f.op})" for f in report.float_layers],
            "attempts": [f"{a.name}: {a.agreement:.2%}" for a in report.attempts]}


def table(rows) -> str:
    from tabulate import tabulate

    lines = [[r["model"], r["format"], r["recovery"], r["repair"], f"{r['original_accuracy']:.2%}",
              f"{r['keras_k1_accuracy']:.2%}", f"{r['agreement']:.2%}", f"{r['accuracy']:.2%}",
              "passed" if r["passed"] else "FAILED", f"{r['bytes']:,}", len(r["float_layers"]),
              "; ".join(r["attempts"])] for r in rows]
    return tabulate(lines, headers=["model", "format", "recovery", "repair", "original", "K=1 Keras", "int8 agreement (test)",
                                    "int8 accuracy (test)", "verification", "bytes", "float layers",
                                    "attempts (agreement on validation)"], tablefmt="github", disable_numparse=True)


if __name__ == "__main__":
    raise SystemExit(main())
