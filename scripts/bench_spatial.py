"""The two separable forms side by side (issue 25): for each model, convert-model's default run (a 1-point accuracy
budget, the latency-aware choice on this machine, fine-tuning) with --form depthwise, spatial and auto, in int8 and
float32, each writing a .tflite and an .onnx; then, per model, mode and format, the original and the three
artifacts timed in ONE interleaved bench-model run (sepconv.deploy.timing, 1 thread, XNNPACK on for TFLite) and
scored on the model's test images.

usage: scripts/bench-spatial [--models demo,resnet_bn,...] [--forms depthwise,spatial,auto] [--quantize int8,none]
                             [--min-time 1] [--out build/spatial]
Prints Markdown: per model, mode and format, each form's accuracy on test (and its change against the original Keras
model), parameters, MACs, p50 speed-up against the original in the same format, and the layers per form; writes
OUT/bench-spatial.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_zoo import cpu, trained  # noqa: E402

FORMS = ("depthwise", "spatial", "auto")
FORMATS = (".tflite", ".onnx")


def main(argv=None) -> int:
    from sepconv.convert.demo import zoo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo," + ",".join(zoo.ZOO), help="comma-separated: demo and zoo names")
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--quantize", default="auto,none",
                        help="convert-model --quantize modes (auto: the default, int8 or its verified fallback; "
                             "none: float32)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per artifact")
    parser.add_argument("--out", type=Path, default=Path("build/spatial"))
    parser.add_argument("--reuse", action="store_true", help="take a form's artifacts from an earlier run in --out "
                        "when they are all there (its summary, outputs and manifests); time them again (the run "
                        "seconds are then the earlier run's stages summed)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models.split(","):
        model = _model(name, args.out)
        for quantize in args.quantize.split(","):
            runs = {form: convert(model, form, quantize, args.out / name / quantize, args.reuse)
                    for form in args.forms.split(",")}
            for suffix in FORMATS:
                results.append(measure(model, quantize, suffix, runs, args.out / name / quantize, args.min_time))
                print(table([results[-1]]), flush=True)
    (args.out / "bench-spatial.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\n{cpu()}; 1 thread; p50 speed-up against the original in the same format and mode, timed in one "
          f"interleaved run per row group\n")
    print(table(results))
    return 0


class _Model:
    def __init__(self, name, path, train, validation, test):
        self.name, self.path, self.train, self.validation, self.test = name, Path(path), train, validation, test


def _model(name: str, out: Path) -> _Model:
    if name == "demo":  # the digits demo's network and split, as scripts/demo trains it (cached in build/demo)
        folder = Path("build/demo")
        code = ("from pathlib import Path; from sepconv.convert.demo import digits; "
                "digits.demo_model(Path('build/demo/digits_tutorial.h5')); "
                "digits.save_split(digits.digits(), Path('build/demo'))")
        subprocess.run([sys.executable, "-c", code], check=True)
        return _Model("demo", folder / "digits_tutorial.h5", folder / "digits_train.npz", None,
                      folder / "digits_test.npz")
    entry = trained(name, Path("build/zoo"))
    return _Model(name, entry.model, entry.train, entry.validation, entry.test)


def convert(model: _Model, form: str, quantize: str, folder: Path, reuse: bool = False) -> dict:
    """convert-model with `--form form`: {form, exit, seconds, error, outputs} (reuse: an earlier run's artifacts,
    when its summary and every output and manifest are there)."""
    folder.mkdir(parents=True, exist_ok=True)
    outputs = [folder / f"{form}{suffix}" for suffix in FORMATS]
    summary = folder / f"{form}.summary.json"
    if reuse and summary.exists() and all(p.exists() and p.with_name(p.name + ".json").exists() for p in outputs):
        seconds = json.loads(summary.read_text()).get("seconds") or {}
        return {"form": form, "exit": 0, "seconds": round(sum(seconds.values()), 1), "error": None,
                "outputs": outputs, "reused": True}
    command = [str(Path(sys.executable).parent / "convert-model"), str(model.path), *map(str, outputs),
               "--data", str(model.train), "--test-data", str(model.test), "--form", form, "--quantize", quantize,
               "--overwrite", "--quiet", "--json", str(summary)]
    if model.validation:
        command += ["--validation-data", str(model.validation)]
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return {"form": form, "exit": done.returncode, "seconds": round(time.perf_counter() - started, 1),
            "error": done.stderr.strip().splitlines()[-1] if done.returncode else None, "outputs": outputs}


def shipped(artifact: Path) -> dict:
    """What the artifact's manifest says was shipped: the separated model's parameters, MACs and layers per form, or
    that the original shipped (its separation was slower)."""
    manifest = json.loads(artifact.with_name(artifact.name + ".json").read_text())
    totals = (manifest.get("separation") or {}).get("totals", {})
    rows = (manifest.get("separation") or {}).get("layers", [])
    return {"shipped": (manifest.get("speed") or {}).get("shipped", "separated"), "quantize": manifest["quantize"],
            "params_before": totals.get("model_params_before"), "params_after": totals.get("model_params_after"),
            "macs_before": totals.get("macs_before"), "macs_after": totals.get("macs_after"),
            "depthwise": sum(r["status"] == "separated" and r.get("form") != "spatial" for r in rows),
            "spatial": sum(r.get("form") == "spatial" for r in rows),
            "kept": sum(r["status"] != "separated" for r in rows),
            "ranks": ((manifest.get("recovery") or {}).get("budget") or {}).get("ranks")}


def measure(model: _Model, quantize: str, suffix: str, runs: dict, folder: Path, min_time: float) -> dict:
    """One interleaved timing run of the original and every form's artifact in `suffix`; accuracy on test."""
    from sepconv.deploy import open_runtime
    from sepconv.deploy.timing import TimingOptions, time_artifacts

    test = np.load(model.test)
    x = test["x"].astype(np.float32)
    x, y = (x[..., None] if x.ndim == 3 else x), test["y"]
    original = export_original(model, quantize, suffix, folder, x)
    paths = [original] + [run["outputs"][FORMATS.index(suffix)] for run in runs.values() if run["exit"] == 0]
    timing = time_artifacts(paths, None, TimingOptions(min_seconds=min_time))
    keras_accuracy = _keras_accuracy(model, x, y)
    row = {"model": model.name, "quantize": quantize, "format": suffix[1:], "cpu": cpu(),
           "original_ms": timing.p50_ms[str(original)], "keras_accuracy": keras_accuracy,
           "original_accuracy": _accuracy(open_runtime(str(original)), x, y), "forms": []}
    for form, run in runs.items():
        entry = {key: value for key, value in run.items() if key != "outputs"}
        if run["exit"] == 0:
            path = run["outputs"][FORMATS.index(suffix)]
            entry.update(ms=timing.p50_ms[str(path)], speedup=row["original_ms"] / timing.p50_ms[str(path)],
                         accuracy=_accuracy(open_runtime(str(path)), x, y), bytes=path.stat().st_size,
                         **shipped(path))
        row["forms"].append(entry)
    return row


def export_original(model: _Model, quantize: str, suffix: str, folder: Path, x: np.ndarray) -> Path:
    """The original model exported as the runs export (int8 for auto, calibrated on 200 training images), not
    verified: the speed baseline (a failing int8 original still runs at int8 speed; an artifact that fell back from
    int8 is compared with it, so its cost shows)."""
    from sepconv.convert import load
    from sepconv.convert.export.targets import target_for

    path = folder / f"original{suffix}"
    target = target_for(path)
    train = np.load(model.train)["x"].astype(np.float32)
    train = train[..., None] if train.ndim == 3 else train
    options = target.export_options(target.options_class(), "int8" if quantize == "auto" else quantize)
    target.export(load(str(model.path)), path, options, train[:200])
    return path


def _keras_accuracy(model: _Model, x, y) -> float:
    from sepconv.convert import load
    from sepconv.convert.graph import predict_keras

    return float(np.mean(np.argmax(predict_keras(load(str(model.path)), x)[0], axis=1) == y))


def _accuracy(runtime, x, y) -> float:
    return float(np.mean(np.argmax(runtime.run([x])[0], axis=1) == y))


def table(rows) -> str:
    lines = ["| model | mode | format | form | test accuracy (change vs Keras original) | params | MACs | p50 speed-up "
             "| layers: depthwise / spatial / kept | run s |", "|" + "---|" * 10]
    for row in rows:
        mode = {"none": "float32", "auto": "auto (int8)"}.get(row["quantize"], row["quantize"])
        lines.append(f"| {row['model']} | {mode} | {row['format']} | original | {row['original_accuracy']:.2%} "
                     f"(Keras {row['keras_accuracy']:.2%}) | | | 1.00x ({row['original_ms'] * 1000:.1f} us) | | |")
        for form in row["forms"]:
            if form["exit"]:
                error = form["error"] if len(form["error"]) < 160 else form["error"][:157] + "..."
                lines.append(f"| | | | {form['form']} | failed: {error} | | | | | {form['seconds']} |")
                continue
            change = 100 * (form["accuracy"] - row["keras_accuracy"])
            macs = (f"{form['macs_before'] / form['macs_after']:.2f}x fewer" if form.get("macs_after") else "")
            params = (f"{form['params_before'] / form['params_after']:.2f}x fewer" if form.get("params_after")
                      else "")
            layers = (f"{form['depthwise']} / {form['spatial']} / {form['kept']}" if form.get("shipped") != "original"
                      else "the original shipped: its separation was slower")
            fallback = f" ({form['quantize']})" if row["quantize"] == "auto" and form["quantize"] != "int8" else ""
            lines.append(
                f"| | | | {form['form']}{fallback} | {form['accuracy']:.2%} ({change:+.2f}) | {params} | {macs} | "
                f"**{form['speedup']:.2f}x** ({form['ms'] * 1000:.1f} us) | {layers} | {form['seconds']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
