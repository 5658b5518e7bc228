"""Large models through convert-model: seconds and peak resident memory per stage, beside the bare converters (issue 13).

For each keras.applications model (random weights, 224x224x3) and a small unlabelled data set of random images:
- bare-tflite: `tf.lite.TFLiteConverter.from_keras_model(model)`, full int8 calibrated on the same images as the
  pipeline's (the converter the pipeline wraps, without anything around it);
- bare-onnx: `tf2onnx.convert.from_function` of the model's tf.function (float: tf2onnx alone);
- convert RUN: convert-model's own option mapping and `convert_model` (what the CLI's worker runs), exporting a
  .tflite and an .onnx with `--rank 2`: "int8" (`--data`, `--quantize int8 --epochs 0`, no recovery stage: the
  conversion itself), "nodata" (the issue's command: no data, dynamic-range int8, verified on 64 synthetic inputs)
  and "int8+recovery" (as "int8" with `--refine --recalibrate-bn`).
Each case runs in its own child process: its peak is the child's maximum resident set (wait4), and each stage of a
convert run gets its own peak too (the child resets the kernel's high-water mark, /proc/self/clear_refs, at every
progress line, so a stage's peak is the most the process held while that stage ran; with any process it starts, the
sum of their resident sets sampled every 50 ms, is counted too). Inside a progress line, each call of a converter
(tflite_int8, tf2onnx), of ONNX Runtime's quantizer and of a verification gets a row for itself and one for the time
before it. Stage seconds are the time between rows. The bare cases' seconds are the conversion call alone (not the
import or the load).
This process never imports TensorFlow.

usage: scripts/bench-scale [--models ResNet50,MobileNetV2,EfficientNetB0] [--runs int8,nodata,int8+recovery]
                           [--samples 48] [--out build/scale]     (writes OUT/bench-scale.json, prints tables)
       scripts/bench-scale --table                              (the tables of OUT/bench-scale.json)
       scripts/bench-scale --passes [--models ...]              (refinement and BatchNorm recalibration: layer by layer
                                                                 against a probe per layer, side by side)
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("ResNet50", "MobileNetV2", "EfficientNetB0")
# convert-model flags of each run, besides the input and the two outputs ("DATA": the data file). "nodata" is the
# issue's command (no data: dynamic-range int8, verified on 64 synthetic inputs). Random weights give near-constant
# class scores, so the top-1 agreement of an int8 artifact with its Keras model is all or nothing and says nothing:
# the runs use the API's Tolerance(min_agreement=0) (the CLI takes (0, 1]), so that verification runs and is reported
# without failing the run or starting the int8 repair, whose extra conversions would be timed instead.
COMMON = ["--data", "DATA", "--rank", "2", "--epochs", "0"]
RUNS = {
    "int8": COMMON + ["--quantize", "int8", "--no-refine", "--no-recalibrate-bn"],
    "nodata": ["--rank", "2"],
    "int8+recovery": COMMON + ["--quantize", "int8", "--refine", "--recalibrate-bn"],
}
SHAPE = (224, 224, 3)
GIB = 1 << 30


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {','.join(RUNS)}")
    parser.add_argument("--samples", type=int, default=48, help="images in the --data file (default 48)")
    parser.add_argument("--no-bare", dest="bare", action="store_false", help="skip the bare conversions")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every case, interleaved; the tables take "
                        "each case's fastest round (a shared machine's load only ever adds time)")
    parser.add_argument("--passes", action="store_true", help="only time refinement and BatchNorm recalibration run "
                        "layer by layer (as convert-model does) against a probe per layer (as before), side by side")
    parser.add_argument("--out", type=Path, default=Path("build/scale"))
    parser.add_argument("--table", action="store_true", help="only print the tables of OUT/bench-scale.json")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child)
    report = args.out / "bench-scale.json"
    if args.table:
        saved = json.loads(report.read_text())
        print(f"{saved['cpu']}\n\n{tables(saved['rows'])}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.passes:
        return passes_table(args)
    saved = json.loads(report.read_text()) if report.exists() else {"rows": []}
    cases = args.runs.split(",") + (["bare-tflite", "bare-onnx"] if args.bare else [])
    rows = [r for r in saved["rows"] if not (r["model"] in args.models.split(",") and r["case"] in cases)]
    for name in args.models.split(","):
        folder = args.out / name
        case(["make", name, str(folder), str(args.samples)])
        for round_ in range(args.repeat):
            for which in ("bare-tflite", "bare-onnx") if args.bare else ():
                rows.append(dict(case([which, name, str(folder)]), model=name, round=round_))
                print(f"{name} {which}: {rows[-1]['seconds']} s, peak {rows[-1]['peak_mib']:,} MiB", flush=True)
                report.write_text(json.dumps({"cpu": cpu(), "rows": rows}, indent=2))
            for run in args.runs.split(","):
                rows.append(dict(case(["convert", name, str(folder), run]), model=name, round=round_))
                print(f"{name} {run}: exit {rows[-1]['exit']}, {rows[-1]['seconds']} s, peak "
                      f"{rows[-1]['peak_mib']:,} MiB", flush=True)
                report.write_text(json.dumps({"cpu": cpu(), "rows": rows}, indent=2))
    rows.sort(key=lambda r: (MODELS.index(r["model"]) if r["model"] in MODELS else len(MODELS),
                             ["bare-tflite", "bare-onnx", *RUNS].index(r["case"])))
    report.write_text(json.dumps({"cpu": cpu(), "rows": rows}, indent=2))
    print(f"\n{cpu()}\n\n{tables(rows)}")
    return 0


def case(argv: list[str]) -> dict:
    """Run one case in a child process; its JSON result with the child's peak resident set and wall seconds."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # as convert-model's worker runs (convert/supervise.py)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, "--child", *argv], env=env, stdout=subprocess.PIPE,
                               text=True)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    # a convert child resets the kernel's high-water mark at each progress line, so its whole-run peak is the
    # largest of its stages' (wait4 then only knows the last stage's)
    peak = max([round(usage.ru_maxrss / 1024)] + [s["peak_mib"] for s in result.get("stages", [])])
    result.update(case=argv[0] if argv[0] != "convert" else argv[3], exit=os.waitstatus_to_exitcode(status),
                  wall_seconds=round(time.perf_counter() - started, 1), peak_mib=peak)
    result.setdefault("seconds", result["wall_seconds"])
    return result


# --- in the child ------------------------------------------------------------------------------------------------


def child(argv: list[str]) -> int:
    what, name, folder = argv[0], argv[1], Path(argv[2])
    result = {"make": make, "bare-tflite": bare_tflite, "bare-onnx": bare_onnx, "convert": convert,
              "passes": passes}[what](
        name, folder, *argv[3:])
    print(json.dumps(result), flush=True)
    return 0


def make(name: str, folder: Path, samples: str) -> dict:
    """The model (random weights) and --data (random pixels 0..255, no labels), once."""
    import keras
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    model_path, data = folder / f"{name}.keras", folder / "data.npz"
    if not model_path.exists():
        keras.utils.set_random_seed(0)
        getattr(keras.applications, name)(weights=None, input_shape=SHAPE).save(model_path)
    if not data.exists() or len(np.load(data)["x"]) != int(samples):
        x = np.random.default_rng(0).integers(0, 256, (int(samples), *SHAPE), dtype=np.uint8)
        np.savez(data, x=x)
    return {}


def import_tensorflow() -> None:
    import keras  # noqa: F401
    import tensorflow  # noqa: F401
    import tf2onnx  # noqa: F401


def _model_and_calibration(name: str, folder: Path):
    """The model, and the images convert-model calibrates int8 on (its own split of --data, same seed)."""
    import keras

    from sepconv.convert.cli import convert_options, convert_parser
    from sepconv.convert.data import datasets

    started = time.perf_counter()
    model = keras.saving.load_model(folder / f"{name}.keras")
    load_seconds = time.perf_counter() - started
    options = convert_options(convert_parser().parse_args([str(folder / f"{name}.keras"), "x.tflite", "--data",
                                                           str(folder / "data.npz")]))
    return model, datasets(model, options).calibration, round(load_seconds, 2)


def bare_tflite(name: str, folder: Path) -> dict:
    import tensorflow as tf

    model, samples, load_seconds = _model_and_calibration(name, folder)
    started = time.perf_counter()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([samples[i:i + 1]] for i in range(len(samples)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    flatbuffer = converter.convert()
    return {"seconds": round(time.perf_counter() - started, 2), "load_seconds": load_seconds,
            "bytes": len(flatbuffer), "calibration_samples": len(samples)}


def bare_onnx(name: str, folder: Path) -> dict:
    import tensorflow as tf
    import tf2onnx

    model, _, load_seconds = _model_and_calibration(name, folder)
    started = time.perf_counter()
    spec = (tf.TensorSpec((None, *SHAPE), tf.float32, name="input"),)
    function = tf.function(lambda x: model(x, training=False), input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=17)
    return {"seconds": round(time.perf_counter() - started, 2), "load_seconds": load_seconds,
            "bytes": len(proto.SerializeToString())}


def convert(name: str, folder: Path, run: str) -> dict:
    """convert-model's option mapping and convert_model, as the CLI's worker runs them, with a peak per stage."""
    from dataclasses import replace

    from sepconv.convert.cli import convert_options, convert_parser
    from sepconv.convert.pipeline import convert_model
    from sepconv.convert.export.verification import Tolerance

    import_tensorflow()  # as the bare cases do before their clock starts: the import is not the conversion
    outputs = [folder / f"{run}.tflite", folder / f"{run}.onnx"]
    flags = [str(folder / "data.npz") if flag == "DATA" else flag for flag in RUNS[run]]
    argv = [str(folder / f"{name}.keras"), *map(str, outputs), *flags, "--overwrite"]
    stages = []
    last = [time.perf_counter(), "start"]
    peaks = _TreePeak()

    def progress(stage, message, step=None):
        now = time.perf_counter()
        own, tree = peaks.take()
        stages.append({"stage": stage, "seconds": round(now - last[0], 2), "peak_mib": tree, "own_peak_mib": own,
                       "message": message[:160], "step": step})
        print(f"  [{now - started:6.1f}s] {stage}{' ' + step if step else ''}: {message[:150]} ({tree:,} MiB, "
              f"this process {own:,})", file=sys.stderr, flush=True)
        last[:] = now, stage

    _instrument_steps(lambda step, message: progress(last[1], message, step))
    options = replace(convert_options(convert_parser().parse_args(argv)), tolerance=Tolerance(min_agreement=0.0))
    started = time.perf_counter()
    result = convert_model(argv[0], outputs, options=options, progress=progress)
    progress("write", "")
    peaks.stop()
    separated = next(s for s in result.recovery.stages if s.name == "separated")
    return {"seconds": round(time.perf_counter() - started, 2), "stages": stages, "pipeline_seconds": result.seconds,
            "separation_seconds": separated.seconds,  # separate_with alone, without scoring the separated model
            "command": "convert-model MODEL.keras OUT.tflite OUT.onnx " + " ".join(RUNS[run]).replace(
                "DATA", "data.npz") + (" (min_agreement=0)" if "DATA" in RUNS[run] else ""),
            "artifacts": [{"path": Path(a.path).name, "quantize": a.quantize, "bytes": a.bytes,
                           "check": a.verification.outputs[0].criterion} for a in result.artifacts]}


# Steps inside a progress line that get their own row (stage "step"): the converters, ONNX Runtime's quantizer and
# the verifications; each has a row for the time before it (message "...") and one for itself.
STEPS = {"sepconv.convert.export.onnx": ["_tf2onnx", "quantize_static_qdq"],
         "sepconv.convert.export.quantization": ["tflite_int8"], "sepconv.convert.export.verification": ["verify"]}


def _instrument_steps(record) -> None:
    import functools
    import importlib

    def wrapped(function, name):
        @functools.wraps(function)
        def step(*args, **kwargs):
            record(f"({name})", "...")
            try:
                return function(*args, **kwargs)
            finally:
                record(name, "")
        return step

    for module_name, names in STEPS.items():
        module = importlib.import_module(module_name)
        for name in names:
            setattr(module, name, wrapped(getattr(module, name), name.strip("_")))


class _TreePeak:
    """The peak resident memory of this process alone (the kernel's high-water mark, reset at each take) and of this
    process with its children (a child that convert-model starts, e.g. for tf2onnx): sampled every 50 ms, and never
    less than this process's own high-water mark."""

    def __init__(self):
        import threading

        self._tree, self._done = 0, threading.Event()
        _reset_peak()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def take(self) -> tuple[int, int]:
        own = _peak_mib()
        tree, self._tree = max(self._tree, own), 0
        _reset_peak()
        return own, tree

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            self._tree = max(self._tree, sum(_rss_mib(pid) for pid in _tree_pids(os.getpid())))


def _tree_pids(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            pids += [p for child in task.read_text().split() for p in _tree_pids(int(child))]
        except OSError:
            pass
    return pids


def _rss_mib(pid: int) -> int:
    from sepconv.convert.memory import resident_bytes

    return round((resident_bytes(pid) or 0) / (1 << 20))


def passes(name: str, folder: Path) -> dict:
    """Refinement then BatchNorm recalibration of the model separated at rank 2 (convert-model --rank 2) on its
    calibration images, twice, on two copies: layer by layer (refinement.layer_inputs, what convert-model runs) and
    with a probe from the model's input per layer (refinement.layer_input, what it ran before); seconds of each
    (after an untimed warm-up on 2 images) and the largest difference between the two copies' weights, relative to
    the largest weight of its array."""
    import numpy as np

    from sepconv.convert import separate

    from sepconv.convert.recovery import refinement

    model, calibration, _ = _model_and_calibration(name, folder)
    walk = refinement.layer_inputs
    probe = lambda model, x, paths: ((path, refinement.layer_input(model, path, x)) for path in paths)  # noqa: E731
    separated, report = separate(model, rank=2)  # warm-up (TensorFlow's first calls of each op), not timed
    refinement.refine(model, separated, calibration[:2], report)
    refinement.recalibrate_batchnorm(separated, calibration[:2])
    seconds, copies = {}, {}
    for how, inputs in (("layer by layer", walk), ("a probe per layer", probe)):
        separated, report = separate(model, rank=2)
        refinement.layer_inputs = inputs
        started = time.perf_counter()
        refinement.refine(model, separated, calibration, report)
        middle = time.perf_counter()
        refinement.recalibrate_batchnorm(separated, calibration)
        seconds[how] = {"refine": round(middle - started, 1), "batchnorm": round(time.perf_counter() - middle, 1)}
        copies[how] = separated.get_weights()
    refinement.layer_inputs = walk
    difference = max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
                     for a, b in zip(*copies.values()))
    return {"seconds": seconds, "samples": len(calibration), "max_relative_weight_difference": difference}


def passes_table(args) -> int:
    from tabulate import tabulate

    lines = []
    for name in args.models.split(","):
        folder = args.out / name
        case(["make", name, str(folder), str(args.samples)])
        result = case(["passes", name, str(folder)])
        for how, seconds in result["seconds"].items():
            lines.append([name, how, seconds["refine"], seconds["batchnorm"], result["samples"],
                          f"{result['max_relative_weight_difference']:.1e}"])
        print(lines[-2], lines[-1], flush=True)
    print(f"\n{cpu()}\n\n" + tabulate(lines, headers=["model", "layer inputs", "refine (s)", "batchnorm (s)", "images",
                                                      "max weight difference"], tablefmt="github"))
    return 0


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0+)


def _peak_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return 0


# --- tables --------------------------------------------------------------------------------------------------------


def tables(rows) -> str:
    from tabulate import tabulate

    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        rounds = {}
        for r in rows:
            if r["model"] == name:
                rounds.setdefault(r["case"], []).append(r)
        mine = {case: min(runs, key=lambda r: (r["exit"] != 0, r["seconds"])) for case, runs in rounds.items()}
        bare = sum(mine[c]["seconds"] for c in ("bare-tflite", "bare-onnx") if c in mine)
        lines = [[case, r["exit"], f"{r['seconds']:.1f}", " ".join(f"{x['seconds']:.0f}" for x in rounds[case]),
                  f"{max(x['peak_mib'] for x in rounds[case]):,}",
                  f"{r['seconds'] / bare:.2f}x" if bare and case in RUNS and not r["exit"] else "",
                  r.get("separation_seconds", "")] for case, r in mine.items()]
        out.append(f"{name}: whole runs (bare: the conversion call alone; convert: every stage; seconds: the fastest "
                   f"round)\n\n" + tabulate(
                       lines, headers=["case", "exit", "seconds", "rounds (s)", "peak MiB", "vs bare tflite + onnx",
                                       "separation alone (s)"], tablefmt="github", disable_numparse=True))
        for run in (r for r in RUNS if r in mine and mine[r].get("stages")):
            stages = [[s["stage"] + (f" {s['step']}" if s.get("step") else ""), f"{s['seconds']:.1f}",
                       f"{s['peak_mib']:,}", f"{s['own_peak_mib']:,}" if "own_peak_mib" in s else "", s["message"][:70]]
                      for s in _per_layer_lines_merged(mine[run]["stages"])]
            out.append(f"{name} {run}: per progress line (`{mine[run]['command']}`)\n\n" + tabulate(
                stages, headers=["stage", "seconds", "peak MiB", "this process", "line (abridged)"], tablefmt="github",
                disable_numparse=True))
    return "\n\n".join(out)


def _per_layer_lines_merged(stages: list[dict]) -> list[dict]:
    """Consecutive "[i/n] layer" lines of one stage (refinement, BatchNorm recalibration) as one row."""
    merged = []
    for stage in stages:
        last = merged[-1] if merged else None
        if last and stage["message"].startswith("[") and last["stage"] == stage["stage"] and last.get("layers"):
            last.update(seconds=last["seconds"] + stage["seconds"], peak_mib=max(last["peak_mib"], stage["peak_mib"]),
                        own_peak_mib=max(last.get("own_peak_mib", 0), stage.get("own_peak_mib", 0)),
                        layers=last["layers"] + 1, message=f"{last['layers'] + 1} per-layer lines")
        else:
            merged.append(dict(stage, layers=1 if stage["message"].startswith("[") else 0))
    return merged


def cpu() -> str:
    name = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
            break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return f"CPU: {name}, {os.cpu_count()} cores, {memory:.0f} GiB; Python {sys.version.split()[0]}"


if __name__ == "__main__":
    raise SystemExit(main())
