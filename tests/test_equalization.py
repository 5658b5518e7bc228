"""Cross-layer equalization (convert/export/equalization.py): exact in float, and what makes an unbalanced separable layer's
int8 export hold."""

import json

import keras
import numpy as np
import pytest

from sepconv.convert.export import equalization as eq
from sepconv.convert.export import quantization as q
from sepconv.convert.errors import InvalidOptionError
from sepconv.convert.separation.svd import reconstruct
from sepconv.convert.export.targets import target_named
from sepconv.convert.export.verification import Tolerance
from sepconv.convert.graph import predict_keras

# depthwise output channel 0 made 1000x wider than the rest, pointwise row 0 1000x smaller: the same function, but the
# per-tensor int8 step between depthwise and pointwise (set by channel 0) is wider than the other channels' spread
UNBALANCE = np.array([1000.0, 1, 1, 1, 1, 1, 1, 1])


def _unbalanced_model(seed=0):
    keras.utils.set_random_seed(seed)
    image = keras.Input((8, 8, 4), name="image")
    x = keras.layers.SeparableConv2D(12, 3, padding="same", depth_multiplier=2, name="sep")(image)
    x = keras.layers.Flatten(name="flat")(keras.layers.ReLU(name="relu")(x))
    model = keras.Model(image, keras.layers.Dense(10, name="logits")(x))
    layer = model.get_layer("sep")
    depthwise, pointwise = eq.rescale(layer.depthwise_kernel.numpy(), layer.pointwise_kernel.numpy(), 1 / UNBALANCE)
    layer.depthwise_kernel.assign(depthwise)
    layer.pointwise_kernel.assign(pointwise)
    return model


@pytest.fixture(scope="module")
def unbalanced():
    x = np.random.default_rng(0).uniform(0, 1, (300, 8, 8, 4)).astype(np.float32)
    return _unbalanced_model(), q.Calibration(x[:100], x[:200], x[200:])


def test_rescaling_is_exact_in_float():
    rng = np.random.default_rng(1)
    depthwise, pointwise = rng.normal(size=(3, 3, 4, 2)), rng.normal(size=(1, 1, 8, 5))
    scales = np.exp(rng.normal(size=8) * 2)
    new_depthwise, new_pointwise = eq.rescale(depthwise, pointwise, scales)
    np.testing.assert_allclose(reconstruct(new_depthwise, new_pointwise), reconstruct(depthwise, pointwise),
                               rtol=1e-12, atol=1e-12, err_msg="rescaling changed the kernel the pair computes")
    assert not np.allclose(new_depthwise, depthwise)


def test_balance_scales_equalize_both_sides_and_leave_dead_channels():
    r, w = np.array([4.0, 1.0, 0.0, 9.0]), np.array([1.0, 4.0, 2.0, 1.0])
    s = eq.balance_scales(r, w)
    assert s[2] == 1.0  # a channel that never activates keeps its scale
    live = [0, 1, 3]
    # after rescaling, every live channel's activation range is the same multiple of its weight range
    ratio = (r[live] / s[live]) / (w[live] * s[live])
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12, err_msg="activation and weight ranges not balanced")
    np.testing.assert_allclose(np.exp(np.mean(np.log(s[live]))), 1.0, rtol=1e-12, err_msg="geometric mean not 1")


def test_equalize_keeps_the_function_and_evens_the_channels(unbalanced):
    model, calibration = unbalanced
    equalized, report = eq.equalize(model, calibration.samples)
    x = calibration.validation
    # float32 arithmetic in a different order: agreement to round-off, relative to the logits' size
    np.testing.assert_allclose(predict_keras(equalized, x)[0], predict_keras(model, x)[0], rtol=1e-4, atol=1e-4,
                               err_msg="equalization changed the model's float outputs")
    [layer] = report.layers
    assert layer.path == "sep" and layer.channels == 8
    assert layer.spread_before > 50 and layer.spread_after < 5, layer
    np.testing.assert_array_equal(model.get_layer("sep").depthwise_kernel.numpy(),
                                  _unbalanced_model().get_layer("sep").depthwise_kernel.numpy(),
                                  err_msg="the input model was changed")
    json.dumps(report.to_dict())
    with pytest.raises(InvalidOptionError, match="calibration images"):
        eq.equalize(model, calibration.samples[:0])


def _repaired_by_equalization(model, calibration, fmt):
    """The int8 report of `model`, after checking that its int8 fails without repair and that the repair's first
    step, equalization, is what passes."""
    without = q.quantize_verified(model, target_named(fmt), calibration, tolerance=Tolerance(),
                                  options=q.QuantizationOptions(repair=False))[1]
    assert not without.passed and without.attempts[0].agreement < 0.9, without.line()
    report = q.quantize_verified(model, target_named(fmt), calibration, tolerance=Tolerance())[1]
    assert report.passed, report.line()
    assert [(a.name, a.equalized) for a in report.attempts] == [("as requested", False),
                                                              ("cross-layer equalization", True)], report.line()
    return report


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_int8_of_an_unbalanced_separable_layer_fails_and_equalization_repairs_it(unbalanced, fmt):
    report = _repaired_by_equalization(*unbalanced, fmt)
    assert report.attempts[report.chosen].agreement >= 0.98 and report.float_layers == ()
    assert report.to_dict()["equalization"]["layers"][0]["path"] == "sep"
    assert "equalized 1 separable layers on 100 images (widest channel range spread: sep" in report.line()


def test_equalization_can_be_turned_off(unbalanced):
    model, calibration = unbalanced
    report = q.quantize_verified(model, target_named("tflite"), calibration, tolerance=Tolerance(),
                                 options=q.QuantizationOptions(equalize=False, max_float_layers=0))[1]
    assert not any(a.equalized for a in report.attempts) and report.equalization is None, report.line()


def test_pointwise_row_range_is_what_int8_weights_see():
    pointwise = np.array([[1.0, -4.0], [2.0, 1.0], [0.0, 0.0]]).reshape(1, 1, 3, 2)
    # per channel: relative to each output channel's largest weight, so a folded BatchNorm scale (whole columns)
    # changes nothing
    np.testing.assert_allclose(eq.pointwise_row_range(pointwise, True), [1.0, 1.0, 0.0], err_msg="per channel")
    np.testing.assert_allclose(eq.pointwise_row_range(pointwise, True, np.array([10.0, 0.1])), [1.0, 1.0, 0.0],
                               err_msg="per channel ignores column scales")
    # per tensor: the raw magnitudes after the folded BatchNorm's column scale
    np.testing.assert_allclose(eq.pointwise_row_range(pointwise, False), [4.0, 2.0, 0.0], err_msg="per tensor")
    np.testing.assert_allclose(eq.pointwise_row_range(pointwise, False, np.array([10.0, 0.1])), [10.0, 20.0, 0.0],
                               err_msg="per tensor, BatchNorm folded")


def test_per_tensor_equalization_folds_the_following_batchnorm_and_stays_exact():
    keras.utils.set_random_seed(2)
    image = keras.Input((6, 6, 3), name="image")
    x = keras.layers.SeparableConv2D(5, 3, use_bias=False, name="sep")(image)
    model = keras.Model(image, keras.layers.BatchNormalization(name="bn")(x))
    model.get_layer("bn").set_weights([np.linspace(0.1, 10, 5), np.zeros(5), np.zeros(5), np.ones(5)])
    x = np.random.default_rng(2).normal(size=(16, 6, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(eq._folded_batchnorm_scale(model, "sep"), np.linspace(0.1, 10, 5) / np.sqrt(1 + 1e-3),
                               rtol=1e-6, err_msg="the BatchNorm reading the layer is found and folded")
    equalized, report = eq.equalize(model, x, per_channel=False)
    assert not report.per_channel and len(report.layers) == 1
    np.testing.assert_allclose(predict_keras(equalized, x)[0], predict_keras(model, x)[0], rtol=1e-4, atol=1e-4,
                               err_msg="per-tensor equalization changed the float outputs")


def test_a_separable_layer_inside_a_nested_model_is_equalized_in_the_copy_only():
    keras.utils.set_random_seed(4)
    inner_in = keras.Input((8, 8, 3))
    inner = keras.Model(inner_in, keras.layers.SeparableConv2D(6, 3, depth_multiplier=2, name="sep")(inner_in),
                        name="inner")
    image = keras.Input((8, 8, 3), name="image")
    model = keras.Model(image, keras.layers.Dense(3)(keras.layers.Flatten()(inner(image))))
    before = [w.copy() for w in model.get_weights()]
    x = np.random.default_rng(4).normal(size=(10, 8, 8, 3)).astype(np.float32)
    equalized, report = eq.equalize(model, x)
    assert [layer.path for layer in report.layers] == ["inner/sep"]
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(new, old, err_msg="the input model's (nested) weights were changed")
    np.testing.assert_allclose(predict_keras(equalized, x)[0], predict_keras(model, x)[0], rtol=1e-4, atol=1e-5,
                               err_msg="equalization inside a nested model changed the float outputs")


@pytest.mark.parametrize("case", ["functional_branches", "nested"])
def test_equalization_in_one_pass_matches_a_probe_per_layer(case, monkeypatch):
    """equalize runs the copy once, layer by layer (graph.layer_inputs); it used to probe each separable layer's
    input from the model's input (graph.layer_input), which grows with the square of the depth."""
    from models import CASES

    from sepconv.convert import separate

    from sepconv.convert import graph

    separated, _ = separate(CASES[case](), rank=2)
    x = np.random.default_rng(0).uniform(0, 1, (16, *separated.input_shape[1:])).astype(np.float32)
    walked, walked_report = eq.equalize(separated, x)
    monkeypatch.setattr(eq, "layer_inputs", lambda model, x, paths: (
        (path, graph.layer_input(model, path, x)) for path in paths))  # each probed when asked for
    probed, probed_report = eq.equalize(separated, x)
    assert [row.path for row in walked_report.layers] == [row.path for row in probed_report.layers]
    assert len(walked_report.layers) > 1, walked_report
    for variable, mine, theirs in zip(walked.weights, walked.get_weights(), probed.get_weights()):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5,
                                   err_msg=f"{case} equalized: {variable.path}, one pass vs a probe per layer")


# the first BatchNorm's channel 0 made 1000x wider than the rest (it reaches ReLU6's clip), the depthwise kernel's
# channel 0 1000x smaller: the function of a network whose ReLU6 output channels are all narrow, but the per-tensor int8
# step of that output (6 / 255, set by channel 0) is wider than every other channel's range
WIDE = 1000.0


def _unbalanced_activation_model(seed=0):
    keras.utils.set_random_seed(seed)
    image = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(image)
    x = keras.layers.ReLU(6.0, name="relu6")(keras.layers.BatchNormalization(name="bn1")(x))
    x = keras.layers.ZeroPadding2D(1, name="pad")(x)
    x = keras.layers.DepthwiseConv2D(3, use_bias=False, name="depthwise")(x)
    x = keras.layers.Activation("relu", name="relu")(keras.layers.BatchNormalization(name="bn2")(x))
    x = keras.layers.Conv2D(6, 1, name="project")(x)
    x = keras.layers.Flatten(name="flat")(x)
    model = keras.Model(image, keras.layers.Dense(4, name="logits")(x))
    bn1 = model.get_layer("bn1")
    wide = np.ones(8, np.float32)
    wide[0] = WIDE
    bn1.set_weights([np.full(8, 0.005, np.float32) * wide, np.full(8, 0.002, np.float32) * wide,
                     np.zeros(8, np.float32), np.ones(8, np.float32)])
    depthwise = model.get_layer("depthwise")
    depthwise.kernel.assign(depthwise.kernel.numpy() / wide.reshape(1, 1, 8, 1))
    return model


@pytest.fixture(scope="module")
def unbalanced_activation():
    x = np.random.default_rng(5).uniform(-1, 1, (300, 8, 8, 3)).astype(np.float32)
    return _unbalanced_activation_model(), q.Calibration(x[:100], x[:200], x[200:])


def test_activation_pairs_are_found_through_padding_relu6_and_activation_layers(unbalanced_activation):
    model, _ = unbalanced_activation
    assert eq.activation_pairs(model) == [("bn1", "depthwise", 6.0), ("bn2", "project", np.inf)]
    image = keras.Input((8, 8, 3))
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 1)(image))
    leaky = keras.layers.LeakyReLU()(x)  # not positive-homogeneous with a clip we can keep: left alone
    branched = keras.layers.ReLU()(keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 1)(leaky)))
    model = keras.Model(image, [keras.layers.Conv2D(2, 1)(branched), keras.layers.Conv2D(2, 1)(branched)])
    assert eq.activation_pairs(model) == [], "a LeakyReLU, and a ReLU read by two layers, are not pairs"


def test_stretch_scales_fill_the_widest_range_and_respect_the_clip():
    r = np.array([4.0, 2.0, 0.06, 0.0])
    np.testing.assert_allclose(eq.stretch_scales(r, None, clip=np.inf), [1.0, 0.5, 0.015, 1.0],
                               err_msg="depthwise reader: every live channel stretched to the widest")
    np.testing.assert_allclose(eq.stretch_scales(np.array([6.0, 3.0, 1.5, 0.03]), None, clip=6.0),
                               [1.0, 1.0, 0.5, 0.01], err_msg="ReLU6: stretched to half the clip at most")
    balanced = eq.stretch_scales(np.array([2.0, 1.0, 0.5]), np.array([1.0, 0.25, 1.0]), clip=np.inf)
    assert np.max(np.array([2.0, 1.0, 0.5]) / balanced) == pytest.approx(2.0), "no channel passes R after scaling"
    ratio = (np.array([2.0, 1.0, 0.5]) / balanced) / (np.array([1.0, 0.25, 1.0]) * balanced)
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12, err_msg="activation and weight ranges not balanced")


def test_equalization_across_activations_keeps_the_function(unbalanced_activation):
    model, calibration = unbalanced_activation
    equalized, report = eq.equalize(model, calibration.samples)
    ranges = predict_keras(keras.Model(model.input, model.get_layer("relu6").output), calibration.samples)[0]
    ranges = ranges.reshape(-1, 8).max(axis=0)
    assert ranges[0] == pytest.approx(6.0) and ranges[1:].max() < 6 / 255, f"the construction: {ranges}"
    across = {layer.path: layer for layer in report.layers}
    assert set(across) == {"depthwise", "project"} and across["depthwise"].across == "bn1", report
    assert across["depthwise"].spread_before > 100 and across["depthwise"].spread_after < 2.01, across["depthwise"]
    assert across["depthwise"].scale_max == 1.0, "the channel at ReLU6's clip keeps its scale"
    for x, name in ((calibration.samples, "calibration"), (calibration.validation, "held-out")):
        np.testing.assert_allclose(predict_keras(equalized, x)[0], predict_keras(model, x)[0], rtol=1e-4, atol=1e-5,
                                   err_msg=f"equalization across the ReLUs changed the float outputs ({name} images)")
    np.testing.assert_array_equal(model.get_layer("bn1").gamma.numpy()[0], np.float32(0.005 * WIDE),
                                  err_msg="the input model was changed")


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_int8_of_an_unbalanced_activation_fails_and_equalization_repairs_it(unbalanced_activation, fmt):
    report = _repaired_by_equalization(*unbalanced_activation, fmt)
    assert "equalized 2 activations across a ReLU on 100 images" in report.line(), report.line()
