"""Weight rounding and bias correction for int8 (convert/export/rounding.py), and the repair steps that use them
(convert/export/quantization.py) on a model whose int8 fails by rounding, not by range."""

import keras
import numpy as np
import pytest

from sepconv.convert.export import quantization as q
from sepconv.convert.export.rounding import LEVELS, gptq, nearest, round_weights
from sepconv.convert.export.targets import target_named
from sepconv.convert.export.verification import Tolerance


def _steps(kernel):
    """Each column's kernel in units of its int8 step (max|w| / 127)."""
    scale = np.abs(kernel).max(axis=0) / LEVELS
    return kernel / np.where(scale > 0, scale, 1.0)


def test_gptq_stays_on_the_converters_grid_and_beats_nearest_on_correlated_inputs():
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((2000, 1))
    x = shared + 0.1 * rng.standard_normal((2000, 24))  # inputs that move together: rounding errors can cancel
    kernel = rng.standard_normal((24, 6)).astype(np.float32)
    rounded = gptq(kernel, x.T @ x / len(x))
    steps = _steps(rounded)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4, err_msg="every weight on its column's int8 step")
    np.testing.assert_allclose(np.abs(rounded).max(axis=0), np.abs(kernel).max(axis=0), rtol=1e-6,
                               err_msg="each column's largest weight is kept, so the converter's scale is unchanged")
    np.testing.assert_allclose(nearest(rounded), rounded, rtol=0, atol=1e-6,
                               err_msg="the converter's own nearest rounding reproduces the choice")
    error = lambda k: np.linalg.norm(x @ (k.astype(np.float64) - kernel))  # noqa: E731
    assert error(rounded) < 0.5 * error(nearest(kernel)), (error(rounded), error(nearest(kernel)))


def test_gptq_of_a_stack_is_each_problem_rounded_alone():
    """A depthwise layer's channels are rounded as one stack: the same choices as one call per channel."""
    rng = np.random.default_rng(2)
    kernels, moments = [], []
    for _ in range(7):
        x = rng.standard_normal((300, 1)) + 0.3 * rng.standard_normal((300, 9))
        x[:, 4] = 0.0  # a dead input in every problem
        kernels.append(rng.standard_normal((9, 2)).astype(np.float32))
        moments.append(x.T @ x / len(x))
    stacked = gptq(np.stack(kernels), np.stack(moments))
    assert stacked.shape == (7, 9, 2) and stacked.dtype == np.float32
    for index, (kernel, moment) in enumerate(zip(kernels, moments)):
        np.testing.assert_allclose(stacked[index], gptq(kernel, moment), rtol=0, atol=1e-7,
                                   err_msg=f"problem {index} of the stack against its own call")
    moved = sum(not np.array_equal(s, nearest(k)) for s, k in zip(stacked, kernels))
    assert moved >= 3, f"GPTQ moved weights off their nearest step in only {moved} of 7 problems: a weak test"


def _layers_model():
    keras.utils.set_random_seed(1)
    image = keras.Input((10, 10, 4))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(image)
    x = keras.layers.DepthwiseConv2D(3, strides=2, depth_multiplier=2, name="depthwise")(x)
    x = keras.layers.SeparableConv2D(12, 3, padding="same", use_bias=False, name="separable")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(image, keras.layers.Dense(5, name="dense")(x))
    weights = model.get_weights()
    model.set_weights([w + 0.1 * np.random.default_rng(2).standard_normal(w.shape).astype(w.dtype)
                       if w.ndim == 1 else w for w in weights])  # biases and BatchNorm statistics away from 0 / 1
    bn = model.get_layer("bn")
    bn.moving_variance.assign(np.abs(bn.moving_variance.numpy()) + 0.5)
    return model



@pytest.mark.parametrize("strides,padding", [((1, 1), "same"), ((2, 2), "same"), ((2, 3), "valid"), ((3, 2), "same")])
def test_the_patches_of_a_1x1_kernel_read_off_the_input_are_tensorflows(strides, padding):
    """A 1x1 kernel's receptive fields are read off the input at its strides (rounding._patches) instead of by
    TensorFlow's extract_patches: the same values in the same order, odd sizes and both paddings included."""
    import tensorflow as tf

    from sepconv.convert.export.rounding import _patches

    x = np.random.default_rng(0).normal(size=(3, 9, 10, 5)).astype(np.float32)
    layer = keras.layers.Conv2D(4, 1, strides=strides, padding=padding)
    layer.build(x.shape)
    expected = tf.image.extract_patches(x, sizes=[1, 1, 1, 1], strides=[1, *strides, 1], rates=[1, 1, 1, 1],
                                        padding=padding.upper())
    np.testing.assert_array_equal(_patches(layer, x, layer.kernel.shape),
                                  np.asarray(expected, np.float64).reshape(-1, 5),
                                  err_msg=f"1x1 patches at strides {strides}, padding {padding}")


def test_the_rounded_variants_share_one_copy_and_each_keeps_its_weights():
    """The repair's rounded variants (quantization.RepairVariants) are rounded in one copy of the model, which holds the
    weights of the variant asked for last: asked for again, a variant's weights are back, the same as round_weights
    gives on a copy of its own; the user's model is left as it was."""
    from dataclasses import replace

    model = _layers_model()
    before = model.get_weights()
    x = np.random.default_rng(3).uniform(0, 1, (64, 10, 10, 4)).astype(np.float32)
    variants = q.RepairVariants(model, x, per_channel=True)
    gptq_setting = q.Setting("gptq", x, "64 samples", rounding=q.ROUNDED)
    bias_setting = replace(gptq_setting, rounding=q.ROUNDED_BIAS)
    rounded = [w.copy() for w in variants.model(gptq_setting).get_weights()]
    corrected = [w.copy() for w in variants.model(bias_setting).get_weights()]
    assert variants.model(gptq_setting) is variants.model(bias_setting) is not model, "one copy for both"
    assert any(not np.array_equal(a, b) for a, b in zip(rounded, corrected)), "bias correction moved a bias"
    for name, setting, expected, bias in (("GPTQ", gptq_setting, rounded, False),
                                          ("GPTQ + bias", bias_setting, corrected, True)):
        again = variants.model(setting).get_weights()
        alone = round_weights(model, x, bias_correction=bias)[0].get_weights()
        for index, (held, own, first) in enumerate(zip(again, alone, expected)):
            np.testing.assert_array_equal(held, first, err_msg=f"{name}: weight {index} when asked for again")
            np.testing.assert_array_equal(held, own, err_msg=f"{name}: weight {index} against its own copy")
    for index, (now, then) in enumerate(zip(model.get_weights(), before)):
        np.testing.assert_array_equal(now, then, err_msg=f"the user's model's weight {index} changed")

@pytest.mark.parametrize("bias_correction", [False, True])
def test_round_weights_puts_every_kernel_on_its_grid_and_corrects_the_mean(bias_correction):
    model = _layers_model()
    before = model.get_weights()
    x = np.random.default_rng(3).uniform(0, 1, (64, 10, 10, 4)).astype(np.float32)
    rounded, report = round_weights(model, x, bias_correction=bias_correction)
    for weights, after in zip(before, model.get_weights()):
        np.testing.assert_array_equal(weights, after, err_msg="the input model is left as it is")
    assert [layer.path for layer in report.layers] == ["conv", "depthwise", "separable", "dense"]
    kernels = {"conv": rounded.get_layer("conv").kernel, "depthwise": rounded.get_layer("depthwise").kernel,
               "separable depthwise": rounded.get_layer("separable").depthwise_kernel,
               "separable pointwise": rounded.get_layer("separable").pointwise_kernel,
               "dense": rounded.get_layer("dense").kernel}
    for name, variable in kernels.items():
        kernel = variable.numpy()
        # per output channel as the converters see it: a depthwise kernel's channels are (input channel, multiplier)
        matrix = kernel.reshape(-1, kernel.shape[2] * kernel.shape[3]) if "depthwise" in name else \
            kernel.reshape(-1, kernel.shape[-1])
        steps = _steps(matrix)
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3, err_msg=f"{name}: weights off the int8 grid")
    for layer in report.layers:
        assert layer.error_rounded <= layer.error_nearest * 1.05 + 1e-4, layer
        assert layer.bias_corrected == bias_correction, layer
    if bias_correction:  # the mean output of the whole model is the float model's again, within rounding noise
        shift = np.mean(rounded.predict(x, verbose=0) - model.predict(x, verbose=0), axis=0)
        plain = round_weights(model, x)[0]
        uncorrected = np.mean(plain.predict(x, verbose=0) - model.predict(x, verbose=0), axis=0)
        assert np.abs(shift).max() < np.abs(uncorrected).max(), (shift, uncorrected)
        assert rounded.get_layer("bn").moving_mean.numpy() is not None


def _chain(depth=6):
    keras.utils.set_random_seed(4)
    image = keras.Input((12, 12, 6))
    x = image
    for i in range(depth):
        x = keras.layers.Conv2D(6, 3, padding="same", activation="relu" if i < depth - 1 else None,
                                name=f"conv{i}")(x)
    return keras.Model(image, x)


def test_the_asymmetric_target_keeps_a_deep_chain_closer_to_the_float_model():
    """Each layer rounded against the float model's own output absorbs what the layers before it drifted; rounded
    against its float weights on the drifted inputs (GPTQ as published), the drift passes on and adds up."""
    model = _chain()
    x = np.random.default_rng(5).uniform(0, 1, (48, 12, 12, 6)).astype(np.float32)
    held_out = np.random.default_rng(6).uniform(0, 1, (48, 12, 12, 6)).astype(np.float32)
    reference = model.predict(held_out, verbose=0)

    def error(copy):
        return float(np.sqrt(np.mean((copy.predict(held_out, verbose=0) - reference) ** 2)) / np.std(reference))

    symmetric, plain = round_weights(model, x, asymmetric=False)
    asymmetric, report = round_weights(model, x)
    assert report.asymmetric and not plain.asymmetric and report.to_dict()["asymmetric"]
    # 0.85x here (0.82-0.88x over depths 6-10, widths 4-8, two seeds): held-out images, not the calibration ones
    assert error(asymmetric) < 0.92 * error(symmetric), (error(asymmetric), error(symmetric))


def _rounding_breaks_it():
    """Three classes scored by weights that are each under half an int8 step: every class's logit is s0 (a channel
    whose weight 1.0 sets the step, the same for every class) plus a * s1 + b * s2, where s1 and s2 each feed 40
    identical input channels and a, b are 12 steps spread evenly over them (0.3 step per weight). Rounding each
    weight to its nearest step zeroes them all: the logits tie and top-1 agreement falls to about a third. Rounded
    with GPTQ, each group's sum survives (the channels are identical, so one weight's error is made up by the next)."""
    step = 1.0 / LEVELS
    kernel = np.zeros((81, 3), np.float32)
    kernel[0] = 1.0
    for cls, (a, b) in enumerate([(12, 0), (0, 12), (8, 8)]):
        kernel[1:41, cls] = a * step / 40
        kernel[41:81, cls] = b * step / 40
    inputs = keras.Input((81,), name="features")
    model = keras.Model(inputs, keras.layers.Dense(3, name="scores")(inputs))
    model.get_layer("scores").set_weights([kernel, np.zeros(3, np.float32)])
    rng = np.random.default_rng(0)
    s0, s1, s2 = rng.uniform(0, 0.05, 400), rng.uniform(0, 1, 400), rng.uniform(0, 1, 400)
    x = np.concatenate([s0[:, None], np.repeat(s1[:, None], 40, 1), np.repeat(s2[:, None], 40, 1)], 1)
    x = x.astype(np.float32)
    return model, q.Calibration(x[:150], x[:300], x[300:])


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_int8_broken_by_rounding_is_repaired_by_weight_rounding_not_by_float_layers(fmt, monkeypatch):
    from sepconv.convert.export import targets

    model, calibration = _rounding_breaks_it()
    maker = {"tflite": "tflite_int8", "onnx": "onnx_int8"}[fmt]
    conversions, convert = [], getattr(q, maker)
    for module in (q, targets):  # every int8 conversion or quantization, the exporter's and the diagnosis's
        monkeypatch.setattr(module, maker, lambda *a, **k: conversions.append(1) or convert(*a, **k))
    as_is = q.quantize_verified(model, target_named(fmt), calibration, tolerance=Tolerance(),
                                options=q.QuantizationOptions(repair=False))[1]
    assert not as_is.passed and as_is.attempts[0].agreement < 0.9, as_is.line()
    assert as_is.repair_seconds == 0 and as_is.to_dict()["repair_seconds"] == 0, "repair off: nothing to time"
    assert as_is.diagnosis is not None and as_is.diagnosis_seconds > 0, "a failed first attempt is diagnosed, timed"
    assert f"the diagnosis {as_is.diagnosis_seconds:.1f} s" in as_is.line()
    assert len(conversions) == 1, "the diagnosis runs the attempt's own artifact, not a second conversion"
    artifact, report = q.quantize_verified(model, target_named(fmt), calibration, tolerance=Tolerance())
    assert report.passed, report.line()
    chosen = report.attempts[report.chosen]
    assert chosen.name == "weight rounding (GPTQ)" and chosen.rounding == "gptq" and not chosen.float_layers, \
        report.line()
    assert chosen.agreement >= 0.98 and len(artifact) == chosen.bytes
    assert report.rounding is not None and report.rounding["layers"][0]["path"] == "scores"
    assert report.rounding["layers"][0]["error_rounded"] < 0.1 * report.rounding["layers"][0]["error_nearest"]
    assert "weight rounding (GPTQ): agreement" in report.line()
    assert all(a.seconds > 0 for a in report.attempts), report.attempts
    assert report.repair_seconds >= report.attempts[-1].seconds - 0.01, (report.repair_seconds, report.attempts)
    assert f"the repair took {report.repair_seconds:.1f} s" in report.line()


def test_a_step_that_does_not_help_is_dropped_from_the_later_ones():
    """export_int8 with a fake exporter: rounding agrees worse than the first attempt, so the calibration attempts
    that follow quantize the weights to nearest again."""
    calibration = q.Calibration(np.zeros((4, 2), np.float32), np.zeros((8, 2), np.float32),
                                np.zeros((4, 2), np.float32))
    scores = {"as requested": 0.90, "weight rounding (GPTQ)": 0.80, "weight rounding + bias correction": 0.85}
    seen = []

    def export(setting):
        seen.append(setting)
        return setting.name.encode()

    def judge(data, x):
        score = scores.get(data.decode(), 0.5)
        return score, score, False, False

    class Target:
        calibration_methods = ("minmax",)

    q.export_int8(None, Target(), calibration, export=export, judge=judge, diagnose=lambda s: None,
                  per_channel=True, options=q.QuantizationOptions(max_float_layers=0),
                  rounding=lambda setting: {"layers": [1]})
    names = [s.name for s in seen]
    assert names[:3] == ["as requested", "weight rounding (GPTQ)", "weight rounding + bias correction"], names
    assert [s.rounding for s in seen[3:]] == ["nearest", "nearest"], [(s.name, s.rounding) for s in seen]
    assert seen[-1].name == "per-tensor weights" and not seen[-1].per_channel


REPAIRS_IN_NOISE = {"weight rounding (GPTQ)": True, "weight rounding + bias correction": True}


@pytest.mark.parametrize("noise", [{}, REPAIRS_IN_NOISE, {"as requested": True, **REPAIRS_IN_NOISE}])
def test_none_at_the_bar_the_best_within_the_noise_is_chosen_when_the_first_is_within_it(noise):
    """export_int8 with a fake exporter whose attempts all fall short of the bar as measured: when the first attempt
    (as requested) is within the validation images' noise, the best attempt they cannot tell from the bar is chosen
    (and said); when only repair attempts are - each the best of several on the same images, flattered by the choice
    - or none is, nothing is chosen (auto falls back), and the report says why."""
    calibration = q.Calibration(np.zeros((4, 2), np.float32), np.zeros((8, 2), np.float32),
                                np.zeros((4, 2), np.float32))
    scores = {"as requested": 0.90, "weight rounding (GPTQ)": 0.975, "weight rounding + bias correction": 0.97}

    def judge(data, x):
        name = data.decode()
        return scores.get(name, 0.5), 0.9, False, noise.get(name, False)

    class Target:
        calibration_methods = ("minmax",)

    data, report = q.export_int8(None, Target(), calibration, export=lambda setting: setting.name.encode(),
                                 judge=judge, diagnose=lambda s: None, per_channel=True,
                                 options=q.QuantizationOptions(max_float_layers=0),
                                 rounding=lambda setting: {"layers": [{"path": "conv", "error_nearest": 0.1,
                                                                       "error_rounded": 0.05}],
                                                           "samples": 4, "bias_correction": False})
    if not noise.get("as requested"):
        assert not report.passed and report.chosen is None and not report.within_noise and data == b"as requested"
        assert ("weight rounding (GPTQ) is under the bar by less than the validation images can show, but as the "
                "best of 5 attempts on them (and as requested is not): not chosen" in report.line()) == bool(noise), \
            report.line()
        return
    assert report.passed and report.within_noise and data == b"weight rounding (GPTQ)", report
    assert "weight rounding (GPTQ) is under it by less than the validation images can show" in report.line()
    assert report.to_dict()["within_noise"] is True


@pytest.mark.parametrize("scores, aim, chosen, tried", [
    # passes the bar, under the aim: the steps run until one reaches the aim, and that one ships
    ({"weight rounding (GPTQ)": 0.9956}, 0.99, "weight rounding (GPTQ)", 3),
    # none reaches the aim: every step but the float layers is tried, the one that agrees best ships
    ({"weight rounding (GPTQ)": 0.985, "calibration on 8 shuffled samples": 0.9889}, 0.99,
     "calibration on 8 shuffled samples", 6),
    # none agrees better: the first attempt ships
    ({}, 0.99, "as requested", 6),
    # at or over the aim, or no aim: the first attempt that passes ships, nothing else is tried
    ({}, 0.98, "as requested", 1),
    ({"weight rounding (GPTQ)": 1.0}, 0.0, "as requested", 1),
])
def test_a_first_attempt_that_passes_under_the_aim_is_repaired_and_the_best_kept(scores, aim, chosen, tried):
    """export_int8 with a fake exporter: as requested agrees on 98.67% of the validation images, over the 98% bar
    (the judge's `passed`), under the repair's aim: the repair steps run (no layer in float), stopped at the first
    that reaches the aim, and the attempt that agrees best is exported; a step that agrees worse is never chosen."""
    calibration = q.Calibration(np.zeros((4, 2), np.float32), np.zeros((8, 2), np.float32),
                                np.zeros((4, 2), np.float32))
    scores = {"as requested": 0.9867, "cross-layer equalization": 0.9778, "weight rounding + bias correction": 0.97,
              **scores}

    def judge(data, x):
        score = scores.get(data.decode(), 0.5)
        return score, 0.9, score >= 0.98, score >= 0.98

    class Target:
        calibration_methods = ("minmax",)

    data, report = q.export_int8(None, Target(), calibration, export=lambda setting: setting.name.encode(),
                                 judge=judge, diagnose=lambda s: pytest.fail("a passing first attempt is not "
                                                                             "diagnosed"),
                                 per_channel=True, options=q.QuantizationOptions(aim=aim),
                                 equalization=lambda: {"layers": [{"path": "conv", "spread_before": 4.5,
                                                                   "spread_after": 2.3}], "samples": 4},
                                 rounding=lambda setting: {"layers": [{"path": "conv", "error_nearest": 0.1,
                                                                       "error_rounded": 0.05}],
                                                           "samples": 4, "bias_correction": False})
    assert data == chosen.encode() and report.passed and not report.within_noise, report.line()
    assert report.attempts[report.chosen].name == chosen and len(report.attempts) == tried, report.line()
    assert all(not a.float_layers for a in report.attempts), report.line()
    if tried > 1:
        said = ("no step agreed better: as requested kept" if chosen == "as requested" else
                f"{chosen} agrees best: chosen")
        assert f"as requested passed with agreement 98.67%, under the repair's aim of 99%: {said}" in report.line()
        assert report.repair_seconds > 0
    else:
        assert report.note == "" and report.repair_seconds == 0
