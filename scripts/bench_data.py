"""Data at scale through convert-model: peak resident memory and seconds per stage for 600, 2,400 and 20,000 generated
224x224 JPEG images (a folder of 4 class sub-folders) and an .npz of the same images, before (another checkout's
Python, --before-python) and after; and fine-tuning's throughput beside Keras' own `fit` on the same tf.data
pipeline (issue 28).

The model: a 3-layer conv net at 224x224x3 (16, 32, 64 filters, stride 2, global pooling, 4 classes), trained for
2 epochs on 400 of the images so that it is a real classifier (the classes differ in colour and pattern). Each
convert case runs `convert-model model.keras out.tflite --data DATA --rank 1 --epochs 1` (the issue's command:
int8, refinement, BatchNorm recalibration, one epoch; case "default": no flag at all, every default with data)
through the CLI's option mapping in a child process, with a peak per stage as scripts/bench_scale.py measures it
(the kernel's high-water mark reset at each progress line).
The throughput case times epoch 2 of sepconv's `finetune` (its callbacks: checkpoint, early stopping, progress)
against epoch 2 of a plain `model.fit` of the same separated model, loss, metrics, validation data and `tf.data`
pipeline (finetuning.feed); each epoch's time includes its validation pass.
This process never imports TensorFlow.

usage: scripts/bench-data [--sizes 600,2400,20000] [--cases folder,npz,default,fit,workers] [--before-python PY]
                          [--out build/data]
       scripts/bench-data --table [--out build/data]
       scripts/bench-data --zoo-roles build/zoo --before-python PY   (the zoo's roles, this code against PY's)
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import _TreePeak, _per_layer_lines_merged, cpu  # noqa: E402  (the same per-stage peaks)

SIZE = 224
CLASSES = 4
FLAGS = ["--rank", "1", "--epochs", "1"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="600,2400,20000")
    parser.add_argument("--cases", default="folder,npz,fit")
    parser.add_argument("--before-python", help="a Python whose sepconv is the code before (its convert cases are "
                        "run as 'before' for the sizes in --before-sizes)")
    parser.add_argument("--before-sizes", default="600,2400")
    parser.add_argument("--out", default="build/data")
    parser.add_argument("--zoo-roles", metavar="ZOO", help="instead: the sha256 of every role's arrays (train, "
                        "calibration, validation, test) of each model in ZOO (scripts/bench-zoo's folder, e.g. "
                        "build/zoo) with bench-zoo's data flags, by this code and by --before-python's")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)), flush=True)
        return 0
    out = Path(args.out)
    store = out / "bench-data.json"
    if args.table:
        print(tables(json.loads(store.read_text())))
        return 0
    if args.zoo_roles:
        return zoo_roles(args.zoo_roles, args.before_python)
    out.mkdir(parents=True, exist_ok=True)
    rows = json.loads(store.read_text()) if store.exists() else []
    print(cpu(), flush=True)
    for size in [int(s) for s in args.sizes.split(",")]:
        folder = out / f"images-{size}"
        if not (folder / "done").exists():
            print(run(sys.executable, ["make", str(size), str(out)]), flush=True)
        for case in args.cases.split(","):
            versions = [("after", sys.executable)]
            if args.before_python and str(size) in args.before_sizes.split(",") and case != "fit":
                versions.insert(0, ("before", args.before_python))
            for version, python in versions:
                result = run(python, [case, str(size), str(out), version])
                result.update(size=size, version=version, cpu=cpu())
                rows = [r for r in rows if (r.get("size"), r.get("case"), r.get("version")) != (size, case, version)]
                rows.append(result)
                store.write_text(json.dumps(rows, indent=1))
                print(f"{case} {size} {version}: exit {result['exit']}, {result['wall_seconds']} s, peak "
                      f"{result['peak_mib']:,} MiB", flush=True)
    print(tables(rows))
    return 0


def run(python: str, argv: list[str]) -> dict:
    """One case in a child process: its JSON result, exit status, wall seconds and peak resident set (the largest
    of the child's own high-water mark and its stages' peaks)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    started = time.perf_counter()
    process = subprocess.Popen([python, __file__, "--child", *argv], env=env, stdout=subprocess.PIPE, text=True)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    lines = out.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    peak = max([round(usage.ru_maxrss / 1024)] + [s["peak_mib"] for s in result.get("stages", [])])
    result.update(case=argv[0], exit=os.waitstatus_to_exitcode(status),
                  wall_seconds=round(time.perf_counter() - started, 1), peak_mib=peak)
    return result


def zoo_roles(zoo: str, before: str | None) -> int:
    """Print, per zoo model and bench-zoo data mode, whether this code's roles equal --before-python's."""
    found = {version: run(python, ["roles", "0", zoo, version]) for version, python in
             (("after", sys.executable), ("before", before)) if python}
    after = found["after"].get("roles", {})
    for name, digest in after.items():
        then = found.get("before", {}).get("roles", {}).get(name)
        verdict = "" if then is None else ("same as before" if then == digest else "DIFFERS from before")
        print(f"{name}: {digest[:16]} {verdict}")
    return 0 if all(found.get("before", {}).get("roles", {}).get(n, d) == d for n, d in after.items()) else 1


# --- in the child ------------------------------------------------------------------------------------------------


def child(argv: list[str]) -> dict:
    what, size, out = argv[0], int(argv[1]), Path(argv[2])
    if what == "make":
        return make(size, out)
    if what == "fit":
        return fit(size, out)
    if what == "roles":
        return roles(out)
    if what == "workers":
        return workers(size, out)
    return convert(what, size, out, argv[3])


def make(size: int, out: Path) -> dict:
    """SIZE x SIZE JPEGs of 4 classes (a colour cast and a stripe direction each, on noise), the same images as a
    uint8 .npz, and (once) the model trained on 400 of them."""
    import numpy as np
    from PIL import Image

    folder = out / f"images-{size}"
    rng = np.random.default_rng(size)
    casts = np.array([[60, 0, 0], [0, 60, 0], [0, 0, 60], [40, 40, 0]], np.float32)
    x = np.empty((size, SIZE, SIZE, 3), np.uint8)
    y = np.arange(size) % CLASSES
    ramp = np.linspace(0, 50, SIZE, dtype=np.float32)
    for i, label in enumerate(y):
        stripes = ramp[:, None] if label % 2 else ramp[None, :]
        image = rng.normal(100, 40, (SIZE, SIZE, 3)).astype(np.float32) + casts[label] + stripes[..., None]
        x[i] = np.clip(image, 0, 255).astype(np.uint8)
        target = folder / f"class{label}" / f"{i:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(target, quality=90)
    np.savez(out / f"images-{size}.npz", x=x, y=y)
    if not (out / "model.keras").exists():
        _model(x[:400], y[:400], out / "model.keras")
    (folder / "done").write_text("")
    return {"images": size, "bytes": sum(f.stat().st_size for f in folder.rglob("*.jpg"))}


def _model(x, y, path: Path) -> None:
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    h = inputs
    for filters in (16, 32, 64):
        h = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(h)
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x / 255.0, y, epochs=2, batch_size=32, verbose=0)
    model.save(path)


def convert(case: str, size: int, out: Path, version: str) -> dict:
    """convert-model's option mapping and convert_model, as the CLI's worker runs them, with a peak per stage."""
    from sepconv.convert.cli import convert_options, convert_parser
    from sepconv.convert.pipeline import convert_model

    data = out / (f"images-{size}.npz" if case == "npz" else f"images-{size}")
    target = out / f"{case}-{size}-{version}.tflite"
    flags = [] if case == "default" else FLAGS  # "default": every default (budget, latency table, 10 epochs, ...)
    argv = [str(out / "model.keras"), str(target), "--data", str(data), *flags, "--overwrite"]
    stages, last, peaks, started = [], [time.perf_counter()], _TreePeak(), time.perf_counter()

    def progress(stage, message, step=None):
        now = time.perf_counter()
        own, tree = peaks.take()
        stages.append({"stage": stage, "seconds": round(now - last[0], 2), "peak_mib": tree, "own_peak_mib": own,
                       "message": message[:160]})
        print(f"  [{now - started:6.1f}s] {stage}: {message[:150]} ({tree:,} MiB)", file=sys.stderr, flush=True)
        last[0] = now

    result = convert_model(argv[0], [target], options=convert_options(convert_parser().parse_args(argv)),
                           progress=progress)
    progress("write", "")
    peaks.stop()
    artifact = result.artifacts[0]
    last_stage = result.recovery.stages[-1] if result.recovery else None
    return {"seconds": round(time.perf_counter() - started, 2), "stages": stages,
            "command": f"convert-model model.keras out.tflite --data {data.name} {' '.join(flags)}".strip(),
            "artifact": {"quantize": artifact.quantize, "accuracy": artifact.verification.outputs[0].accuracy},
            "keras_test_accuracy": last_stage.accuracy if last_stage else None,
            "data": {k: result.data.get(k) if isinstance(result.data, dict) else getattr(result.data, k, None)
                     for k in ("train_samples", "validation_samples", "heldout_samples", "streamed")}}


def workers(size: int, out: Path, epochs: int = 3) -> dict:
    """Fine-tuning's epochs on one worker and on two local workers (`--strategy multi-worker`, TF_CONFIG over
    loopback, each in its own folder), the convert-model command otherwise the same (streamed data, --rank 1, no
    latency table, no quantization); each run's epoch seconds as its progress lines say them."""
    import re
    import socket

    convert = str(Path(sys.executable).parent / "convert-model")
    argv = [str(out.resolve() / "model.keras"), "out.tflite", "--data", str(out.resolve() / f"images-{size}"),
            "--rank", "1", "--epochs", str(epochs), "--patience", str(epochs), "--no-latency", "--quantize", "none",
            "--data-cache-mb", "0", "--overwrite"]

    def seconds(text: str) -> list[float]:
        return [float(m) for m in re.findall(r"finetune: epoch \d+/\d+: .* \(([\d.]+) s\)", text)]

    folder = out / "workers" / "single"
    folder.mkdir(parents=True, exist_ok=True)
    single = subprocess.run([convert, *argv], cwd=folder, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    sockets = [socket.socket() for _ in range(2)]
    for each in sockets:
        each.bind(("127.0.0.1", 0))
    cluster = {"worker": [f"127.0.0.1:{each.getsockname()[1]}" for each in sockets]}
    for each in sockets:
        each.close()
    started = []
    for index in range(2):
        folder = out / "workers" / f"worker{index}"
        folder.mkdir(parents=True, exist_ok=True)
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        started.append(subprocess.Popen([convert, *argv, "--strategy", "multi-worker"], cwd=folder,
                                        env=dict(os.environ, TF_CONFIG=config), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    texts = [process.communicate()[1] for process in started]
    return {"single": {"exit": single.returncode, "epoch_s": seconds(single.stderr)},
            "multi": [{"exit": process.returncode, "epoch_s": seconds(text)} for process, text in zip(started, texts)],
            "command": f"convert-model model.keras out.tflite --data images-{size} " + " ".join(argv[4:])}


def roles(zoo: Path) -> dict:
    """sha256 of each zoo model's run data (datasets: train, calibration, validation, test arrays and labels) for
    bench-zoo's labelled modes (--data, --validation-data, --test-data) and for --data alone (the split)."""
    import hashlib

    import numpy as np

    from sepconv.convert import load
    from sepconv.convert.data import datasets
    from sepconv.convert.options import ConvertOptions

    found = {}
    for folder in sorted(p for p in zoo.iterdir() if (p / "train.npz").exists()):
        model = load(next(f for f in folder.iterdir() if f.suffix in (".h5", ".keras")))
        given = dict(validation_data=str(folder / "validation.npz"), test_data=str(folder / "test.npz"))
        for mode, extra in (("bench-zoo", given), ("data alone", {})):
            data = datasets(model, ConvertOptions(data=str(folder / "train.npz"), **extra))
            digest = hashlib.sha256()
            for array in (data.train.x, data.train.y, data.calibration, data.validation.x, data.validation.y,
                          data.test.x, data.test.y):
                digest.update(np.ascontiguousarray(array).tobytes())
            found[f"{folder.name} ({mode})"] = digest.hexdigest()
    return {"roles": found}


def fit(size: int, out: Path, rounds: int = 5) -> dict:
    """Epoch 2 of sepconv's finetune against epoch 2 of Keras' fit (same model, loss, metrics, validation and
    streamed pipeline) and of Keras' fit on the images held in memory, in `rounds` interleaved rounds (this machine
    is shared: times drift); the medians and each round's ratio."""
    import keras
    import numpy as np

    from sepconv.convert import separate
    from sepconv.convert.data import DataOptions, load_data
    from sepconv.convert.recovery import finetuning

    model = keras.models.load_model(out / "model.keras")
    data = load_data(out / f"images-{size}", model.input_shape, DataOptions(scale="unit", cache_mb=0))
    options = finetuning.FinetuneOptions(epochs=2, patience=5)
    val = np.arange(len(data)) % 10 == 0
    train_x, val_x = data.x.take(np.flatnonzero(~val)), data.x.take(np.flatnonzero(val))
    classes = int(model.outputs[0].shape[-1])
    targets = finetuning._targets(model, train_x, data.y[~val], classes)
    checked_targets = finetuning._targets(model, val_x, data.y[val], classes)
    held = (train_x.read(), val_x.read()) if train_x.nbytes < 4 << 30 else None  # 20,000 images: 11 GB, not held
    epochs = []

    class Epochs(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epochs.append(time.perf_counter() - self.start)

    def plain(streamed: bool) -> float:
        student, _ = separate(model, rank=1)
        student.compile(keras.optimizers.Adam(1e-3), loss=finetuning._distillation_loss(classes, 4.0, 0.5),
                        metrics=[finetuning._agreement(classes), finetuning._accuracy(classes)])
        if streamed:
            student.fit(finetuning.feed(train_x, targets, options.batch_size, shuffle=0)["x"], epochs=2, verbose=0,
                        validation_data=finetuning.feed(val_x, checked_targets, options.batch_size)["x"],
                        callbacks=[Epochs()], shuffle=False)  # the pipeline shuffles
        else:
            student.fit(held[0], targets, batch_size=options.batch_size, epochs=2, verbose=0,
                        validation_data=(held[1], checked_targets), callbacks=[Epochs()])
        return epochs[-1]

    def ours() -> float:
        student, _ = separate(model, rank=1)
        finetuning.finetune(student, model, train_x, data.y[~val], options=options, verbose=0, callbacks=[Epochs()],
                            validation=(val_x, data.y[val]))
        return epochs[-1]

    times = {"finetune": [], "fit": [], "in_memory": []}
    for _ in range(rounds):
        times["finetune"].append(ours())
        times["fit"].append(plain(streamed=True))
        if held is not None:
            times["in_memory"].append(plain(streamed=False))
    median = {name: float(np.median(values)) if values else None for name, values in times.items()}
    return {"images": len(train_x), "rounds": rounds,
            "times": {name: [round(v, 2) for v in values] for name, values in times.items()},
            "finetune_epoch_s": round(median["finetune"], 2), "keras_fit_epoch_s": round(median["fit"], 2),
            "ratio": round(median["finetune"] / median["fit"], 3),
            "round_ratios": [round(a / b, 3) for a, b in zip(times["finetune"], times["fit"])],
            "finetune_images_per_s": round(len(train_x) / median["finetune"], 1),
            "keras_fit_images_per_s": round(len(train_x) / median["fit"], 1),
            "in_memory_fit_epoch_s": round(median["in_memory"], 2) if held is not None else None}


# --- tables --------------------------------------------------------------------------------------------------------


def tables(rows: list[dict]) -> str:
    from tabulate import tabulate

    converts = [r for r in rows if r["case"] in ("folder", "npz", "default")]
    lines = [[r["case"], f"{r['size']:,}", r["version"], r["exit"], f"{r['peak_mib']:,}", f"{r['wall_seconds']:.0f}",
              (r.get("data") or {}).get("streamed", ""), (r.get("artifact") or {}).get("quantize", ""),
              _percent((r.get("artifact") or {}).get("accuracy"))]
             for r in sorted(converts, key=lambda r: (r["case"], r["size"], r["version"] != "before"))]
    out = [rows[0].get("cpu", "") if rows else "",
           "whole runs (`convert-model model.keras out.tflite --data DATA --rank 1 --epochs 1`; \"default\": the "
           "folder with no flag; peak: resident set, MiB)\n\n" + tabulate(
               lines, headers=["data", "images", "code", "exit", "peak MiB", "seconds", "streamed", "artifact",
                               "test accuracy"], tablefmt="github", disable_numparse=True)]
    for r in (r for r in converts if r.get("stages") and r["version"] == "after"):
        stages = [[s["stage"], f"{s['seconds']:.1f}", f"{s['peak_mib']:,}", s["message"][:80]]
                  for s in _per_layer_lines_merged(r["stages"])]
        out.append(f"{r['case']} {r['size']:,} images (after): per progress line\n\n" + tabulate(
            stages, headers=["stage", "seconds", "peak MiB", "line (abridged)"], tablefmt="github",
            disable_numparse=True))
    fits = [[f"{r['size']:,}", r["images"], r["finetune_epoch_s"], r["keras_fit_epoch_s"], f"{r['ratio']:.3f}",
             r["finetune_images_per_s"], r["keras_fit_images_per_s"], r.get("in_memory_fit_epoch_s") or "",
             " ".join(map(str, r.get("round_ratios", [])))]
            for r in rows if r["case"] == "fit" and not r["exit"]]
    if fits:
        out.append("fine-tuning throughput, epoch 2 (validation included), streamed tf.data pipeline, medians of "
                   "interleaved rounds; 'fit in memory': Keras' fit on the same images held in memory\n\n" + tabulate(
                       fits, headers=["data", "train images", "finetune s", "Keras fit s", "ratio", "finetune img/s",
                                      "fit img/s", "fit in memory s", "each round's ratio"], tablefmt="github",
                       disable_numparse=True))
    for r in (r for r in rows if r["case"] == "workers" and not r["exit"]):
        lines = [["1 worker", r["single"]["exit"], " ".join(map(str, r["single"]["epoch_s"]))]]
        lines += [[f"worker {i} of 2", w["exit"], " ".join(map(str, w["epoch_s"]))] for i, w in enumerate(r["multi"])]
        out.append(f"fine-tuning epochs, {r['size']:,} images, one worker and two local workers (`{r['command']}`, "
                   f"then with --strategy multi-worker)\n\n" + tabulate(
                       lines, headers=["run", "exit", "epoch seconds"], tablefmt="github", disable_numparse=True))
    return "\n\n".join(out)


def _percent(value) -> str:
    return f"{value:.2%}" if isinstance(value, float) else ""


if __name__ == "__main__":
    sys.exit(main())
