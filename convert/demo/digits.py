"""The bundled demo: the tutorial's VGG-style network trained on scikit-learn's digits (nothing is downloaded).

The 1,797 8x8 digit images ship inside scikit-learn. They are scaled to [0, 1], enlarged to 32x32 (each pixel becomes
a 4x4 block) and repeated over three channels, so that the network is the tutorial's CIFAR-10 one unchanged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sepconv.convert import DEFAULT_ENERGY, separate
from sepconv.convert.demo import QUICK_EPOCHS, QUICK_FILTERS, model_file
from sepconv.convert.loading import load
from sepconv.convert.pipeline import convert_model
from sepconv.deploy import logs, report
from sepconv.deploy.bench import benchmark
from sepconv.deploy.scores import top1

INPUT_SHAPE = (32, 32, 3)
CLASSES = 10
TUTORIAL_FILTERS = (64, 128, 256)


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """The digits data set as 32x32x3 float32 images in [0, 1], split stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    images = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)
    images = np.repeat(images[..., None], 3, axis=-1)
    x_train, x_test, y_train, y_test = train_test_split(
        images, data.target.astype(np.int64), test_size=test_fraction, random_state=seed, stratify=data.target)
    return Split(x_train, y_train, x_test, y_test)


def tutorial_network(input_shape=INPUT_SHAPE, classes: int = CLASSES, separable: bool = False,
                     filters=TUTORIAL_FILTERS):
    """The tutorial's network: blocks of 2 x Conv2D 3x3 'same' relu + MaxPooling2D, then Flatten, Dense softmax.

    separable=True builds the tutorial's hand-written SeparableConv2D version (depth multiplier 1).
    """
    import keras

    conv = keras.layers.SeparableConv2D if separable else keras.layers.Conv2D
    layers = [keras.Input(input_shape, name="image")]
    for block, width in enumerate(filters, start=1):
        layers += [
            conv(width, 3, padding="same", activation="relu", name=f"block{block}_conv1"),
            conv(width, 3, padding="same", activation="relu", name=f"block{block}_conv2"),
            keras.layers.MaxPooling2D(name=f"block{block}_pool"),
        ]
    layers += [keras.layers.Flatten(name="flatten"), keras.layers.Dense(classes, activation="softmax", name="probs")]
    return keras.Sequential(layers, name="tutorial_separable" if separable else "tutorial")


def residual_network(input_shape=INPUT_SHAPE, classes: int = CLASSES, width: int = 32):
    """A small digits network with BatchNorm and a residual block: the harder case for separation (issue 4).

    stem Conv2D-BN-ReLU, one residual block (two Conv2D-BN, identity shortcut), a strided Conv2D-BN-ReLU, global
    average pooling and a softmax classifier. Convolutions have no bias (BatchNorm follows them).
    """
    import keras

    def conv_bn(x, filters, name, strides=1, relu=True):
        x = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
        return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x

    image = keras.Input(input_shape, name="image")
    x = conv_bn(image, width, "stem", strides=2)
    shortcut = x
    x = conv_bn(x, width, "res1a")
    x = conv_bn(x, width, "res1b", relu=False)
    x = keras.layers.ReLU(name="res1_relu")(keras.layers.Add(name="res1_add")([x, shortcut]))
    x = conv_bn(x, 2 * width, "down", strides=2)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(image, keras.layers.Dense(classes, activation="softmax", name="probs")(x), name="residual_bn")


def train(model, split: Split, *, epochs: int = 15, batch_size: int = 32, seed: int = 0, verbose: int = 0):
    """Train `model` in place with Adam and sparse cross-entropy; returns the Keras History."""
    import keras

    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model.fit(split.x_train, split.y_train, epochs=epochs, batch_size=batch_size, verbose=verbose,
                     shuffle=True)


def accuracy(model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` on (x, y)."""
    import keras

    hits = 0
    for start in range(0, len(x), batch_size):
        probs = keras.ops.convert_to_numpy(model(x[start:start + batch_size], training=False))
        hits += int(np.sum(top1(probs) == y[start:start + batch_size]))
    return hits / len(x)


def save_split(split: Split, folder: Path) -> tuple[Path, Path]:
    """The training and the test images with labels as .npz files (x, y): the --data and --test-data a user passes."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    train, test = Path(folder) / "digits_train.npz", Path(folder) / "digits_test.npz"
    np.savez(train, x=split.x_train, y=split.y_train)
    np.savez(test, x=split.x_test, y=split.y_test)
    return train, test


def demo_model(path: Path, *, epochs: int = 15, seed: int = 0, retrain: bool = False, verbose: int = 0,
               filters=TUTORIAL_FILTERS):
    """The trained demo model saved at `path` (.h5): trained and saved on first use, reused after. `filters`: the
    blocks' widths (QUICK_FILTERS for sepconv-demo --quick)."""
    path = Path(path)
    if path.exists() and not retrain:
        return load(path)
    import keras

    keras.utils.set_random_seed(seed)
    model = tutorial_network(filters=filters)
    train(model, digits(seed=seed), epochs=epochs, seed=seed, verbose=verbose)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.h5")
    model.save(tmp, include_optimizer=False)
    tmp.replace(path)
    return load(path)


SPEED_VARIANTS = (("original", dict(separate=False)),
                  ("separated_k1", dict(rank=1, refine=True, epochs=0, recalibrate_bn=False)))


def speed_artifacts(model_path: Path, folder: Path, train: Path, test: Path) -> list[Path]:
    """The speed table's eight artifacts, converted once and cached in `folder`: the original (no separation) and the
    separated model (K = 1, refined by least squares, no fine-tuning), float32 and int8, TFLite and ONNX; TFLite
    first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, separation in SPEED_VARIANTS:
        for precision, quantize in (("fp32", "none"), ("int8", "int8")):
            targets = [folder / f"{kind}_{precision}.tflite", folder / f"{kind}_{precision}.onnx"]
            if not all(t.exists() for t in targets):
                convert_model(model_path, targets, quantize=quantize, data=str(train), test_data=str(test),
                              overwrite=True, **separation)
            paths += targets
    return [p for suffix in (".tflite", ".onnx") for p in paths if p.suffix == suffix]


def run_demo(out: Path, *, epochs: int | None = None, seed: int = 0, retrain: bool = False, bench: bool = True,
             bench_time: float = 1.0, quick: bool = False, say: Callable[[str], None] | None = None,
             verbose: bool = False) -> dict:
    """What sepconv-demo does, in `out`: train (or load) the demo model, separate it at K=1 and with the default
    policy (reports in report_*.json), run convert_model with its defaults for data, time the speed artifacts with
    bench-model's harness (unless `bench` is off), and write the HTML report. `quick`: the same steps on the network
    at a quarter of the width (QUICK_FILTERS, trained QUICK_EPOCHS epochs unless `epochs` says) with the speed table
    at 1 thread only. `say(text)` gets the tables and progress lines as they come (None: silent); `verbose`: the lines
    that only count items off too (sepconv.deploy.logs). Returns the summary (what --json writes)."""
    keras_verbose = 2 if say else 0  # Keras' epoch lines while the demo model trains
    shown = say or (lambda text: None)

    def say(text: str, detail: bool = False) -> None:
        if verbose or not detail:
            shown(text)

    started = time.perf_counter()
    model_path = Path(out) / model_file(quick)
    epochs = epochs if epochs is not None else (QUICK_EPOCHS if quick else 15)
    say(f"{'training' if retrain or not model_path.exists() else 'loading'} the demo model {model_path}"
        f"{' (quick: filters ' + ', '.join(map(str, QUICK_FILTERS)) + ')' if quick else ''} ...")
    model = demo_model(model_path, epochs=epochs, seed=seed, retrain=retrain, verbose=keras_verbose,
                       filters=QUICK_FILTERS if quick else TUTORIAL_FILTERS)
    split = digits(seed=seed)
    baseline = accuracy(model, split.x_test, split.y_test)
    summary = {"model": str(model_path), "quick": quick, "test_images": int(len(split.y_test)), "original": {
        "params": model.count_params(), "test_accuracy": baseline}, "separations": []}
    say(f"original: {model.count_params():,} parameters, test accuracy {baseline:.2%} on {len(split.y_test)} "
        f"held-out digits\n")
    for label, options in (("K=1 on every Conv2D", {"rank": 1}),
                           (f"default policy (energy={DEFAULT_ENERGY})", {})):
        separated, report = separate(model, **options)
        score = accuracy(separated, split.x_test, split.y_test)
        summary["separations"].append({"label": label, "options": options, "test_accuracy": score,
                                       "report": report.to_dict()})
        (Path(out) / f"report_{'k1' if options else 'default'}.json").write_text(report.to_json(indent=2))
        say(f"== {label} (no fine-tuning)\n{report}\ntest accuracy: {score:.2%} (original {baseline:.2%})\n")
    summary["conversion"] = _demo_conversion(Path(out), model_path, split, say)
    if bench:
        summary["speed"] = _demo_speed(Path(out), model_path, bench_time, quick, say)
    summary["report"] = _demo_report(Path(out), summary, say)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary


def _demo_conversion(out: Path, model_path: Path, split: Split, say) -> dict:
    """convert_model on the demo with its defaults for data: a 1-point accuracy budget, refinement, fine-tuning, int8
    TFLite and ONNX, scored and verified on the test digits."""
    train, test = save_split(split, out)
    outputs = [out / "digits_int8.tflite", out / "digits_int8.onnx"]
    say(f"== convert-model {model_path} {' '.join(map(str, outputs))} --data {train} --test-data {test} --overwrite")
    result = convert_model(model_path, outputs, data=str(train), test_data=str(test), overwrite=True,
                           progress=lambda stage, message: say(f"  {stage}: {message}", logs.is_detail(stage, message)))
    say(result.table() + "\n")
    return result.to_dict()


def _demo_speed(out: Path, model_path: Path, bench_time: float, quick: bool, say) -> dict:
    """The speed table: bench-model's harness on the eight demo artifacts at 1 and 2 threads (1 if quick), with test
    accuracy. The quick demo's artifacts are kept apart from the full one's (speed_quick/)."""
    train, test = out / "digits_train.npz", out / "digits_test.npz"
    say("== speed: original and separated (K=1, refined), float32 and int8, TFLite and ONNX (bench-model)")
    paths = speed_artifacts(model_path, out / ("speed_quick" if quick else "speed"), train, test)
    report = benchmark(paths, threads=(1,) if quick else (1, 2), inputs=str(test), min_seconds=bench_time, min_runs=50,
                       progress=lambda message: say(f"  {message}", logs.is_detail("-", message)))
    say(report.table() + "\n")
    return report.to_dict()


def _demo_report(out: Path, summary: dict, say) -> str:
    """The HTML report of the conversion and the speed table (report.html) and a PNG per chart (report/)."""
    renderer = report.renderer()
    page = renderer.render(renderer.classify(json.loads(json.dumps(summary, default=str)), "demo"),
                           title="sepconv demo: the tutorial network on digits")
    path = out / "report.html"
    renderer.write_report(page, path, out / "report", overwrite=True)
    say(f"== report: {path} (charts as PNG in {out / 'report'}/)")
    return str(path)
