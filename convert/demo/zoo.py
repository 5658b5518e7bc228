"""A zoo of realistic models, built and trained from code on scikit-learn's bundled digits (nothing is downloaded).

The demo's VGG-style network is the friendliest case for separation. Users bring BatchNorm, residual blocks with
strided 1x1 projection shortcuts, MobileNet-style stems with ReLU6, legacy tf.keras `.h5` files, nested
`keras.applications` backbones and preprocessing layers inside the model. Each zoo entry is one of those, trained
on the digits training split (1,347 images) and saved the way a user would have it, with its data as .npz files:
train.npz (what it was trained on), and the digits' 450 test images halved into validation.npz (for a run's
choices) and test.npz (scores only), as a careful user keeps them:

| name           | what it stands for                                              | file    | input        |
| tutorial       | the tutorial's VGG-style network (the demo model)               | .h5     | 32x32x3      |
| resnet_bn      | ResNet-style: BatchNorm, residual blocks, strided 1x1 shortcuts | .keras  | 32x32x3      |
| mobilenet_v1   | MobileNet v1: Conv2D stem, depthwise + pointwise blocks, ReLU6  | .keras  | 32x32x3      |
| mini_xception  | mini-Xception (grayscale 64x64), written by tf.keras (Keras 2)  | .h5     | 64x64x1      |
| nested_mobilenetv2 | transfer learning: keras.applications.MobileNetV2 nested     | .keras  | 32x32x3      |
| rescaling      | a Rescaling(1/255) layer inside, fed 0..255 uint8 pixels        | .keras  | 32x32x3      |

`entry(name, folder)` trains on first use and caches the model and data in `folder`; `ZOO` lists the builders.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sepconv.convert.demo import digits as demo
from sepconv.convert.loading import load
from sepconv.convert.supervise import safe_environment

EPOCHS = 15


@dataclass(frozen=True)
class ZooEntry:
    name: str
    model: Path  # the saved model, as a user would pass it to convert-model
    train: Path  # digits_train-like .npz (x, y) in the model's input format: what the model was trained on
    test: Path  # held-out .npz (x, y): half of the digits' test split, for scoring only
    accuracy: float  # the trained model's top-1 accuracy on `test`
    params: int
    validation: Path | None = None  # the other half: images the model never saw, for every choice a run makes


def resnet_bn(input_shape=demo.INPUT_SHAPE, classes: int = demo.CLASSES, width: int = 16):
    """Stem Conv2D-BN-ReLU, then three residual stages (two 3x3 Conv2D-BN each); stages 2 and 3 start strided with a
    strided 1x1 Conv2D-BN projection shortcut, as in ResNet's downsampling blocks; global pooling, softmax."""
    import keras

    L = keras.layers

    def conv_bn(x, filters, kernel, name, strides=1, relu=True):
        x = L.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = L.BatchNormalization(name=f"{name}_bn")(x)
        return L.ReLU(name=f"{name}_relu")(x) if relu else x

    image = keras.Input(input_shape, name="image")
    x = conv_bn(image, width, 3, "stem")
    for stage, filters in enumerate((width, 2 * width, 4 * width), start=1):
        strides = 1 if stage == 1 else 2
        shortcut = x if stage == 1 else conv_bn(x, filters, 1, f"s{stage}_proj", strides=strides, relu=False)
        y = conv_bn(x, filters, 3, f"s{stage}a", strides=strides)
        y = conv_bn(y, filters, 3, f"s{stage}b", relu=False)
        x = L.ReLU(name=f"s{stage}_out")(L.Add(name=f"s{stage}_add")([y, shortcut]))
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(image, L.Dense(classes, activation="softmax", name="probs")(x), name="resnet_bn")


def mobilenet_v1(input_shape=demo.INPUT_SHAPE, classes: int = demo.CLASSES, width: int = 16):
    """MobileNet v1 in small: a strided 3x3 Conv2D-BN-ReLU6 stem, four depthwise-separable blocks (DepthwiseConv2D-
    BN-ReLU6, 1x1 Conv2D-BN-ReLU6), a 3x3 Conv2D head block, global pooling, dropout and softmax."""
    import keras

    L = keras.layers
    image = keras.Input(input_shape, name="image")
    x = L.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(image)
    x = L.ReLU(6.0, name="stem_relu6")(L.BatchNormalization(name="stem_bn")(x))
    for block, (filters, strides) in enumerate(((2 * width, 1), (4 * width, 2), (4 * width, 1), (8 * width, 2)), 1):
        x = L.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False, name=f"b{block}_dw")(x)
        x = L.ReLU(6.0, name=f"b{block}_dw_relu6")(L.BatchNormalization(name=f"b{block}_dw_bn")(x))
        x = L.Conv2D(filters, 1, use_bias=False, name=f"b{block}_pw")(x)
        x = L.ReLU(6.0, name=f"b{block}_pw_relu6")(L.BatchNormalization(name=f"b{block}_pw_bn")(x))
    x = L.Conv2D(8 * width, 3, padding="same", use_bias=False, name="head_conv")(x)
    x = L.ReLU(6.0, name="head_relu6")(L.BatchNormalization(name="head_bn")(x))
    x = L.Dropout(0.2, name="drop")(L.GlobalAveragePooling2D(name="pool")(x))
    return keras.Model(image, L.Dense(classes, activation="softmax", name="probs")(x), name="mobilenet_v1")


def nested_mobilenetv2(input_shape=demo.INPUT_SHAPE, classes: int = demo.CLASSES):
    """The Keras transfer-learning pattern: keras.applications.MobileNetV2 (alpha 0.35, random weights: nothing is
    downloaded) as one nested layer, then global pooling and a softmax head."""
    import keras

    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=input_shape, alpha=0.35)
    for layer in base.layers:  # Keras' 0.999 suits ImageNet's long runs; 15 short epochs leave statistics unsettled
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    image = keras.Input(input_shape, name="image")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(base(image))
    return keras.Model(image, keras.layers.Dense(classes, activation="softmax", name="probs")(x),
                       name="nested_mobilenetv2")


def rescaling(input_shape=demo.INPUT_SHAPE, classes: int = demo.CLASSES):
    """A small CNN that takes 0..255 pixels and scales them itself with a Rescaling(1/255) layer."""
    import keras

    L = keras.layers
    image = keras.Input(input_shape, name="pixels")
    x = L.Rescaling(1 / 255.0, name="rescale")(image)
    for block, filters in enumerate((32, 64), start=1):
        x = L.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{block}_conv1")(x)
        x = L.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{block}_conv2")(x)
        x = L.MaxPooling2D(name=f"block{block}_pool")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(image, L.Dense(classes, activation="softmax", name="probs")(x), name="rescaling")


# The mini-Xception of Arriaga et al. (real-time emotion classification, 2017), the way its users wrote it in
# tf.keras: run in a child process with tf-keras so that the file is a genuine Keras 2 .h5.
_MINI_XCEPTION = r"""
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np
import tf_keras as k2
L = k2.layers
out, data = sys.argv[1], np.load(sys.argv[2])
k2.utils.set_random_seed(0)
reg = k2.regularizers.l2(0.01)
image = k2.Input((64, 64, 1))
x = L.Conv2D(8, 3, use_bias=False, kernel_regularizer=reg)(image)
x = L.Activation("relu")(L.BatchNormalization()(x))
x = L.Conv2D(8, 3, use_bias=False, kernel_regularizer=reg)(x)
x = L.Activation("relu")(L.BatchNormalization()(x))
for filters in (16, 32, 64, 128):
    residual = L.BatchNormalization()(L.Conv2D(filters, 1, strides=2, padding="same", use_bias=False)(x))
    x = L.SeparableConv2D(filters, 3, padding="same", use_bias=False, depthwise_regularizer=reg)(x)
    x = L.Activation("relu")(L.BatchNormalization()(x))
    x = L.SeparableConv2D(filters, 3, padding="same", use_bias=False, depthwise_regularizer=reg)(x)
    x = L.BatchNormalization()(x)
    x = L.MaxPooling2D(3, strides=2, padding="same")(x)
    x = L.add([x, residual])
x = L.Conv2D(10, 3, padding="same")(x)
x = L.GlobalAveragePooling2D()(x)
model = k2.Model(image, L.Activation("softmax", name="predictions")(x), name="mini_xception")
model.compile(k2.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
if int(sys.argv[3]):  # 0: saved untrained (a test of the file's structure needs no training)
    model.fit(data["x"], data["y"], epochs=int(sys.argv[3]), batch_size=32, verbose=0, shuffle=True)
    # BatchNorm's moving statistics lag the last epochs' weights under this strong l2 (inference 28% where
    # training-mode batches give 99%): settle them with passes that change no weight (learning rate 0), as a careful
    # user would.
    model.compile(k2.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    model.fit(data["x"], data["y"], epochs=3, batch_size=32, verbose=0, shuffle=True)
model.save(out)
"""

ZOO = {
    "tutorial": (demo.tutorial_network, ".h5", "unit32"),
    "resnet_bn": (resnet_bn, ".keras", "unit32"),
    "mobilenet_v1": (mobilenet_v1, ".keras", "unit32"),
    "mini_xception": (None, ".h5", "gray64"),
    "nested_mobilenetv2": (nested_mobilenetv2, ".keras", "unit32"),
    "rescaling": (rescaling, ".keras", "uint8_32"),
}


def digits_as(kind: str) -> demo.Split:
    """The demo's digits split in one of the zoo's input formats: 'unit32' (32x32x3 float in [0, 1]), 'gray64'
    (64x64x1 float in [0, 1]) or 'uint8_32' (32x32x3 uint8 pixels 0..255, for models that rescale themselves)."""
    split = demo.digits()
    if kind == "unit32":
        return split
    if kind == "uint8_32":
        return demo.Split(*(np.round(a * 255).astype(np.uint8) if a.ndim == 4 else a for a in split.__dict__.values()))
    if kind == "gray64":
        def gray(x):
            return np.repeat(np.repeat(x[..., :1], 2, axis=1), 2, axis=2)
        return demo.Split(gray(split.x_train), split.y_train, gray(split.x_test), split.y_test)
    raise ValueError(f"Unrecognized kind={kind!r}. Supported kinds are: ['gray64', 'uint8_32', 'unit32']")


# Models that learn slower than EPOCHS allows: MobileNetV2 from scratch at 32x32 reached 66% in 15 epochs.
EPOCHS_FOR = {"nested_mobilenetv2": 40}


def entry(name: str, folder, *, epochs: int | None = None, verbose: int = 0) -> ZooEntry:
    """The trained zoo model `name` with its data in `folder` (made on first use, reused after); epochs: of its
    training (None: EPOCHS, or EPOCHS_FOR[name]; 0: saved untrained, for tests of the file's structure)."""
    if name not in ZOO:
        raise ValueError(f"Unrecognized zoo model {name!r}. Supported models are: {sorted(ZOO)}")
    epochs = EPOCHS_FOR.get(name, EPOCHS) if epochs is None else epochs
    builder, suffix, kind = ZOO[name]
    folder = Path(folder) / name
    folder.mkdir(parents=True, exist_ok=True)
    model_path, info_path = folder / f"{name}{suffix}", folder / "info.json"
    train, validation, test = folder / "train.npz", folder / "validation.npz", folder / "test.npz"
    if not (model_path.exists() and train.exists()):
        split = digits_as(kind)
        np.savez(train, x=split.x_train, y=split.y_train)
        _train_and_save(builder, split, train, model_path, epochs, verbose)
        info_path.unlink(missing_ok=True)
    if not (info_path.exists() and validation.exists() and test.exists()):
        split = digits_as(kind)
        (x_val, y_val), (x_test, y_test) = held_out(split.x_test, split.y_test)
        np.savez(validation, x=x_val, y=y_val)
        np.savez(test, x=x_test, y=y_test)
        model = _load(model_path)
        info = {"accuracy": demo.accuracy(model, x_test.astype(np.float32), y_test),
                "params": int(model.count_params())}
        info_path.write_text(json.dumps(info))
    return saved(name, folder.parent)


def saved(name: str, folder) -> ZooEntry:
    """The zoo entry `entry(name, folder)` made, read back without TensorFlow."""
    folder = Path(folder) / name
    info = json.loads((folder / "info.json").read_text())
    return ZooEntry(name, folder / f"{name}{ZOO[name][1]}", folder / "train.npz", folder / "test.npz",
                    info["accuracy"], info["params"], folder / "validation.npz")


def held_out(x: np.ndarray, y: np.ndarray):
    """The digits' test split (450 images the zoo never trains on) halved, stratified by class with a fixed seed:
    ((x, y) validation, (x, y) test). A run chooses with the first and is scored on the second."""
    from sklearn.model_selection import train_test_split

    x_val, x_test, y_val, y_test = train_test_split(x, y, test_size=0.5, random_state=0, stratify=y)
    return (x_val, y_val), (x_test, y_test)


def _load(path: Path):
    return load(path)


def _train_and_save(builder, split: demo.Split, train_npz: Path, path: Path, epochs: int, verbose: int) -> None:
    tmp = path.with_name(path.name + ".partial" + path.suffix)
    if builder is None:  # mini-Xception: written by tf.keras in a child process

        done = subprocess.run([sys.executable, "-c", _MINI_XCEPTION, str(tmp), str(train_npz), str(epochs)],
                              capture_output=True, text=True, env=safe_environment())  # oneDNN crashes it here
        if done.returncode != 0:
            raise RuntimeError(f"training mini_xception with tf-keras failed (exit {done.returncode}; it needs the "
                               f"test extra: pip install 'sepconv[test]'): {done.stderr.strip()[-500:]}")
    else:
        import keras

        keras.utils.set_random_seed(0)
        model = builder()
        demo.train(model, demo.Split(split.x_train.astype(np.float32), split.y_train, split.x_test, split.y_test),
                   epochs=epochs, verbose=verbose)
        model.save(tmp, include_optimizer=False) if path.suffix == ".h5" else model.save(tmp)
    tmp.replace(path)
