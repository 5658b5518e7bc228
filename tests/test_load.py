import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import assert_same_outputs, zip_bomb

from sepconv.convert import load, parse_custom_objects, separate
from sepconv.convert import errors

HERE = Path(__file__).parent


def small_model():
    x_in = keras.Input((8, 8, 3), name="pixels")
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(x_in)
    return keras.Model(x_in, keras.layers.Dense(2, name="head")(keras.layers.Flatten()(x)), name="small")


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def keras2_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("keras2")
    done = subprocess.run([sys.executable, str(HERE / "keras2_writer.py"), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_round_trip_and_input_untouched(tmp_path, suffix):
    model = small_model()
    path = tmp_path / f"m{suffix}"
    model.save(path)
    digest = sha256(path)
    loaded = load(path)
    x = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
    assert_same_outputs(model, loaded, x, rtol=1e-6, what=f"model loaded from {suffix}")
    separate(loaded, rank=1)
    assert sha256(path) == digest, "loading and separating must not touch the input file"


def test_keras2_h5(keras2_files):
    path = keras2_files / "model.h5"
    digest = sha256(path)
    model = load(path)
    expected = np.load(keras2_files / "expected.npz")
    np.testing.assert_allclose(model.predict(expected["x"], verbose=0), expected["y"], atol=1e-5,
                               err_msg="a Keras 2 .h5 must predict in Keras 3 what it predicted in tf.keras")
    assert model.get_layer("bn").moving_variance.numpy().std() > 0, "BatchNorm statistics must be loaded"
    new, report = separate(model, rank="full", only_if_smaller=False)
    assert {row.path for row in report.separated} == {"c1", "c2", "c3"}
    assert_same_outputs(model, new, expected["x"], what="separated Keras 2 model")
    assert sha256(path) == digest


def test_keras2_separable_and_depthwise_layers(keras2_files):
    """tf.keras wrote keys Keras 3 refuses into these layers' configs ("Unrecognized keyword arguments passed to
    SeparableConv2D: {'groups': 1, ...}"): sepconv loads them as the real Keras 3 layers, predicting the same."""
    model = load(keras2_files / "separable.h5")
    expected = np.load(keras2_files / "separable_expected.npz")
    np.testing.assert_allclose(model.predict(expected["x"], verbose=0), expected["y"], atol=1e-5,
                               err_msg="a Keras 2 .h5 with SeparableConv2D must predict what it did in tf.keras")
    assert type(model.get_layer("sep")) is keras.layers.SeparableConv2D
    assert type(model.get_layer("dw")) is keras.layers.DepthwiseConv2D


def test_keras2_weights_only(keras2_files):
    with pytest.raises(errors.WeightsOnlyFileError, match="weights only.*load_weights"):
        load(keras2_files / "weights.h5")


def test_keras2_lambda_refused(keras2_files):
    with pytest.raises(errors.UnsafeModelError, match=r"\['doubler'\].*safe_mode=False"):
        load(keras2_files / "lambda.h5")


def test_weights_only_keras3(tmp_path):
    path = tmp_path / "m.weights.h5"
    small_model().save_weights(path)
    with pytest.raises(errors.WeightsOnlyFileError, match="weights only"):
        load(path)


def test_lambda_refused_in_safe_mode_and_loaded_when_trusted(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: t * 3.0, name="triple")])
    path = tmp_path / "lam.keras"
    model.save(path)
    with pytest.raises(errors.UnsafeModelError, match=r"\['triple'\]"):
        load(path)
    trusted = load(path, safe_mode=False)
    np.testing.assert_allclose(trusted.predict(np.ones((1, 4)), verbose=0), 3.0, err_msg="trusted Lambda")


def test_missing(tmp_path):
    with pytest.raises(errors.ModelNotFoundError, match="no such file"):
        load(tmp_path / "nope.h5")


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
@pytest.mark.parametrize("content, error, match", [
    (b"", errors.EmptyModelFileError, "empty"),
    (b"this is not a model at all", errors.CorruptModelFileError, "damaged or truncated"),
], ids=["empty", "garbage"])
def test_bad_bytes(tmp_path, suffix, content, error, match):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(error, match=match):
        load(path)
    assert path.read_bytes() == content


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_truncated(tmp_path, suffix):
    path = tmp_path / f"m{suffix}"
    small_model().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.CorruptModelFileError, match="damaged or truncated"):
        load(path)


def test_zip_without_config(tmp_path):
    path = tmp_path / "m.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(errors.CorruptModelFileError, match="config.json"):
        load(path)


def test_wrong_kinds(tmp_path):
    tflite = tmp_path / "m.tflite"
    tflite.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 64)
    with pytest.raises(errors.WrongFileKindError, match="TFLite model"):
        load(tflite)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07tf2onnx")
    with pytest.raises(errors.WrongFileKindError, match="ONNX model"):
        load(onnx)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(errors.WrongFileKindError, match="unrecognized model file"):
        load(text)
    with pytest.raises(errors.WrongFileKindError, match="is a directory"):
        load(tmp_path)


def test_saved_model_directory(tmp_path):
    path = tmp_path / "saved"
    small_model().export(path, format="tf_saved_model", verbose=False)
    with pytest.raises(errors.SavedModelError, match="SavedModel directory.*model.save"):
        load(path)


def test_misnamed_file_loads_by_content(tmp_path):
    model = small_model()
    path = tmp_path / "m.keras"
    model.save(path)
    renamed = tmp_path / "model.bin"
    path.rename(renamed)
    loaded = load(renamed)
    assert loaded.get_layer("conv").kernel.shape == (3, 3, 3, 6)


class Scale(keras.layers.Layer):
    """A custom layer that is deliberately not registered."""

    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def test_custom_objects(tmp_path):
    x_in = keras.Input((8, 8, 3))
    model = keras.Model(x_in, Scale(3.0, name="scale")(keras.layers.Conv2D(4, 3, name="conv")(x_in)))
    path = tmp_path / "custom.keras"
    model.save(path)
    with pytest.raises(errors.UnknownObjectError, match="'Scale'.*custom_objects"):
        load(path)
    loaded = load(path, custom_objects={"Scale": Scale})
    assert loaded.get_layer("scale").factor == 3.0
    by_spec = load(path, custom_objects=parse_custom_objects([f"{__name__}:Scale"]))
    assert type(by_spec.get_layer("scale")) is Scale


def test_parse_custom_objects():
    objects = parse_custom_objects(["test_load:Scale", "helpers"])
    assert objects["Scale"] is Scale and "assert_same_outputs" in objects
    for bad, match in [(":Scale", "Unrecognized custom object"), ("no_such_module_x:Y", "Cannot import"),
                       ("test_load:Nope", "no attribute 'Nope'")]:
        with pytest.raises(errors.InvalidOptionError, match=match):
            parse_custom_objects([bad])


class Net(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 3)

    def call(self, x):
        return self.conv(x)


def test_subclassed_model(tmp_path):
    net = Net(name="net")
    net(np.zeros((1, 8, 8, 3), np.float32))
    path = tmp_path / "sub.keras"
    net.save(path)
    with pytest.raises(errors.UnsupportedModelError, match="subclassed model .*'Net'"):
        load(path)
    loaded = load(path, custom_objects={"Net": Net})
    with pytest.raises(errors.UnsupportedModelError, match="subclassed model"):
        separate(loaded)


def test_errors_are_one_line(tmp_path):
    path = tmp_path / "empty.h5"
    path.write_bytes(b"")
    with pytest.raises(errors.SepconvError) as caught:
        load(path)
    assert "\n" not in str(caught.value)



def test_zip_bomb_refused_before_keras_opens_it(tmp_path):
    path = zip_bomb(tmp_path / "bomb.keras", small_model())
    assert path.stat().st_size < 1 << 20
    with pytest.raises(errors.ModelTooLargeError, match=r"declares 33\d,\d{3},\d{3} bytes unpacked from .* more than "
                                                        r"the 268,435,456 allowed \(a possible zip bomb\)"):
        load(path)


def test_unpacked_bound_can_be_set(tmp_path):
    path = tmp_path / "m.keras"
    small_model().save(path)
    with pytest.raises(errors.ModelTooLargeError, match="more than the 1,000 allowed"):
        load(path, max_unpacked_bytes=1000)
    h5 = tmp_path / "m.h5"
    small_model().save(h5)
    with pytest.raises(errors.ModelTooLargeError, match="more than the 100 allowed"):
        load(h5, max_unpacked_bytes=100)
    assert load(path, max_unpacked_bytes=10 ** 6).count_params() == small_model().count_params()
