"""The model zoo (convert/demo/zoo.py): each entry has the structure it stands for, separates exactly at full rank, and
is trained, saved and cached the way a user would have it."""

import keras
import numpy as np
import pytest

from helpers import assert_same_outputs, count_layers
from sepconv.convert import separate
from sepconv.convert.demo import zoo
from sepconv.convert.loading import load


def _layers(model):
    return [layer for layer in model._flatten_layers(include_self=False)]


def _strided_1x1(model):
    return [layer.name for layer in _layers(model) if type(layer) is keras.layers.Conv2D
            and layer.kernel_size == (1, 1) and layer.strides != (1, 1)]


STRUCTURE = {
    "tutorial": lambda m: count_layers(m, keras.layers.Conv2D) == 6,
    "resnet_bn": lambda m: len(_strided_1x1(m)) == 2 and count_layers(m, keras.layers.BatchNormalization) == 9
    and count_layers(m, keras.layers.Add) == 3,
    "mobilenet_v1": lambda m: count_layers(m, keras.layers.DepthwiseConv2D) == 4 and any(
        isinstance(layer, keras.layers.ReLU) and layer.max_value == 6.0 for layer in _layers(m)),
    "mini_xception": lambda m: len(_strided_1x1(m)) == 4 and count_layers(m, keras.layers.SeparableConv2D) == 8
    and m.input_shape == (None, 64, 64, 1),
    "nested_mobilenetv2": lambda m: any(isinstance(layer, keras.Model) for layer in m.layers)
    and count_layers(m, keras.layers.Conv2D) > 10,
    "rescaling": lambda m: isinstance(m.layers[1], keras.layers.Rescaling),
}


def test_every_zoo_model_has_a_structure_test():
    assert sorted(STRUCTURE) == sorted(zoo.ZOO), "a new zoo model needs its entry in STRUCTURE"


def _built(name, tmp_path_factory):
    builder = zoo.ZOO[name][0]
    if builder is not None:
        return builder()
    # written by tf-keras in a child process; untrained (epochs=0): the structure and exactness need no training, and
    # four epochs at 64x64 took 160 s of the suite (test_zoo_entry_trains_once_and_is_cached covers the training)
    entry = zoo.entry(name, tmp_path_factory.mktemp("zoo"), epochs=0)
    return load(entry.model)


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if zoo.ZOO[name][0] is None else name
                                  for name in sorted(zoo.ZOO)])
def test_zoo_model_structure_and_exact_separation(name, tmp_path_factory):
    model = _built(name, tmp_path_factory)
    assert STRUCTURE[name](model), f"{name} must have the structure it stands for"
    exact, report = separate(model, rank="full", only_if_smaller=False)
    assert report.separated, f"{name}: something to separate"
    x = np.random.default_rng(0).uniform(0, 255 if name == "rescaling" else 1,
                                         (4, *model.input_shape[1:])).astype(np.float32)
    assert_same_outputs(model, exact, x, what=f"{name} separated at full rank")


def test_zoo_data_formats():
    gray = zoo.digits_as("gray64")
    assert gray.x_train.shape[1:] == (64, 64, 1) and gray.x_train.dtype == np.float32
    pixels = zoo.digits_as("uint8_32")
    assert pixels.x_test.dtype == np.uint8 and pixels.x_test.max() == 255
    np.testing.assert_array_equal(pixels.y_test, gray.y_test, err_msg="one split, three formats")
    with pytest.raises(ValueError, match="Supported kinds"):
        zoo.digits_as("rgb128")


@pytest.mark.slow
def test_zoo_entry_trains_once_and_is_cached(tmp_path):
    first = zoo.entry("rescaling", tmp_path, epochs=2)
    stamp = first.model.stat().st_mtime_ns
    again = zoo.entry("rescaling", tmp_path, epochs=2)
    assert again == first and first.model.stat().st_mtime_ns == stamp, "the second call reuses the saved model"
    assert first.accuracy > 0.2, f"two epochs already beat chance (10%) twice over: {first.accuracy:.2%}"
    test, validation = np.load(first.test), np.load(first.validation)
    assert test["x"].dtype == validation["x"].dtype == np.uint8, "this model's data is 0..255 pixels"
    assert len(test["y"]) == len(validation["y"]) == 225, "the digits' 450 test images, halved"
    assert zoo.saved("rescaling", tmp_path) == first, "read back without TensorFlow, the same entry"


def test_layers_already_separable_count_in_the_mac_totals():
    """MobileNet's DepthwiseConv2D layers are kept as they are, and still counted: the totals are known."""
    model = zoo.mobilenet_v1()
    _, report = separate(model, rank=1)
    rows = {row.path: row for row in report.rows}
    assert rows["b1_dw"].macs_before == rows["b1_dw"].macs_after == 16 * 16 * 3 * 3 * 16, "16x16 outputs, 16 channels"
    assert report.totals["macs_before"] == sum(row.macs_before for row in report.rows)
    assert report.totals["macs_after"] < report.totals["macs_before"]


def test_held_out_halves_are_disjoint_stratified_and_fixed():
    """The zoo's validation and test sets: the digits' 450 test images halved, every class in both, the same split
    every time (a run chooses with one half and is scored on the other)."""
    split = zoo.digits_as("unit32")
    (x_val, y_val), (x_test, y_test) = zoo.held_out(split.x_test, split.y_test)
    assert (len(y_val), len(y_test)) == (225, 225)
    assert set(np.unique(y_val)) == set(np.unique(y_test)) == set(range(10))
    flat = {row.tobytes() for row in x_val.reshape(len(x_val), -1)}
    assert not flat & {row.tobytes() for row in x_test.reshape(len(x_test), -1)}, "no image in both halves"
    again = zoo.held_out(split.x_test, split.y_test)
    np.testing.assert_array_equal(again[0][1], y_val, err_msg="the split must not change between runs")
