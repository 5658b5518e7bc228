"""int8 diagnosis and repair (convert/export/quantization.py) on a model whose int8 export fails verification as it is."""

import json
from dataclasses import replace

import keras
import numpy as np
import pytest

from sepconv.convert.export import quantization as q
from sepconv.convert.errors import InvalidOptionError, VerificationError
from sepconv.convert.export.targets import target_named
from sepconv.convert.export.verification import Tolerance


def _masked_class_model(seed=0):
    """A digits-sized classifier with an 11th, masked logit stuck near -1000 (a class switched off by its bias).

    Keras never picks it, so the model's answers are those of the 10 real logits; but int8 quantizes the logits
    tensor per-tensor, so its scale spans [-1000, 10] (about 4 per step) and the real logits, a few units apart, fall
    into one or two steps: top-1 agreement collapses. No calibration fixes a real range; the Dense kept in float does.
    """
    keras.utils.set_random_seed(seed)
    image = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(image)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    logits = keras.layers.Dense(11, name="logits")(x)
    model = keras.Model(image, logits)
    kernel, bias = model.get_layer("logits").get_weights()
    kernel *= 4.0  # real logits a few units apart
    kernel[:, 10], bias[10] = 0.0, -1000.0
    model.get_layer("logits").set_weights([kernel, bias])
    return model


@pytest.fixture(scope="module")
def masked():
    model = _masked_class_model()
    x = np.random.default_rng(0).uniform(0, 1, (320, 8, 8, 1)).astype(np.float32)
    return model, q.Calibration(x[:100], x[:240], x[240:])


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_int8_that_fails_as_requested_is_repaired_with_one_float_layer(masked, fmt):
    model, calibration = masked
    without = q.quantize_verified(model, target_named(fmt), calibration, tolerance=Tolerance(),
                                  options=q.QuantizationOptions(repair=False))[1]
    assert not without.passed and len(without.attempts) == 1
    assert without.attempts[0].agreement < 0.98, without.attempts[0]  # fails verification as it is
    artifact, report = q.quantize_verified(model, target_named(fmt), calibration, tolerance=Tolerance())
    assert report.passed, report.line()
    chosen = report.attempts[report.chosen]
    assert chosen.agreement >= 0.98 and len(chosen.float_layers) == 1, report.line()
    # calibration was tried before any layer was kept in float, and did not fix a real range
    assert [a.float_layers for a in report.attempts[:2]] == [(), ()], report.line()
    [kept] = report.float_layers
    assert kept.op in ("FULLY_CONNECTED", "Gemm", "MatMul"), kept
    assert "relative int8 error" in kept.reason and f"kept in float: {kept.layer}" in report.line()
    assert len(artifact) == chosen.bytes
    # its cost: against the all-int8 attempt with the same calibration (negative on a model this small: the float
    # Dense's weights are fewer bytes than the quantize/dequantize ops and parameters it no longer needs)
    reference = next(a for a in report.attempts if not a.float_layers and a.calibration == chosen.calibration)
    assert kept.bytes == chosen.bytes - reference.bytes, (kept, reference)


def test_formats_of_one_run_share_the_rounded_weights(masked, monkeypatch):
    """A run that writes .tflite and .onnx passes one RepairVariants to both formats' repair: each rounded variant
    (GPTQ, GPTQ + bias) is rounded once, not once per format; one made for other samples is not used."""
    model, calibration = masked
    rounded, real = [], q.round_weights

    def counting(*args, **kwargs):
        rounded.append(kwargs.get("bias_correction"))
        return real(*args, **kwargs)

    monkeypatch.setattr(q, "round_weights", counting)
    variants = q.RepairVariants(model, calibration.samples, per_channel=True)
    names = []
    for fmt in ("tflite", "onnx"):
        report = q.quantize_verified(model, target_named(fmt), calibration, tolerance=Tolerance(), variants=variants)[1]
        names.append([a.name for a in report.attempts])
        assert report.passed, report.line()
    assert all("weight rounding + bias correction" in tried for tried in names), names
    assert sorted(rounded) == [False, True], f"each variant rounded once for both formats: {rounded}"
    other = q.RepairVariants(model, calibration.samples[:50], per_channel=True)
    assert not other.fits(model, calibration.samples, True, True) and variants.fits(model, calibration.samples, True,
                                                                                   True)
    q.quantize_verified(model, target_named("tflite"), calibration, tolerance=Tolerance(), variants=other)
    assert len(rounded) == 4, "variants of other samples are not used: this call rounded its own"


def test_tflite_diagnosis_names_the_masked_logits_and_their_range(masked):
    model, calibration = masked
    setting = q.Setting("as requested", calibration.samples, "100 samples")
    diagnosis = q.diagnose_tflite(model, setting)
    worst = diagnosis.worst(1)[0]
    assert worst.op == "FULLY_CONNECTED", diagnosis.summary()
    assert worst.severity > q.RELATIVE_ERROR_ALARM
    assert diagnosis.starts_at.layer == worst.layer
    np.testing.assert_allclose(worst.scale, (worst.max - worst.min) / 255, rtol=0.05,
                               err_msg="the logits' int8 scale spans their float range")
    assert worst.min < -900, worst
    conv = next(row for row in diagnosis.layers if "conv" in row.layer)
    assert conv.severity < 0.1, conv  # the layers before the logits quantize well
    assert worst.keras == ("logits",) and worst.name == "logits", worst
    assert conv.keras == ("conv",), conv
    summary = diagnosis.summary()
    assert "error starts at logits (FULLY_CONNECTED" in summary and worst.layer not in summary, summary
    # all layers together: the int8 model's tensors against the float model's, every earlier error included
    assert conv.accumulated_relative_error is not None and conv.accumulated_relative_error < 0.1, conv
    assert worst.accumulated_relative_error > q.RELATIVE_ERROR_ALARM, worst
    assert "all layers together:" in summary and "at the last (logits)" in summary, summary
    json.dumps(diagnosis.to_dict())


def test_a_float_twin_the_debugger_did_not_keep_gets_no_channel_error_and_no_warning(masked, monkeypatch):
    """TFLite's QuantizationDebugger hands over uninitialised memory for the float twin of some ops (the zoo's
    rescaling CNN's tiled depthwise step: values up to 1e37 and NaNs): numpy then warned "invalid value encountered in
    cast" on the user's terminal. Here the conv op's float twin is spoilt with signalling NaNs, the bit pattern that
    makes that cast warn: no warning, no channel error for that op, the others' as before."""
    import warnings

    model, calibration = masked
    setting = q.Setting("as requested", calibration.samples[:20], "20 samples")
    clean = q.diagnose_tflite(model, setting)
    conv = next(i for i, row in enumerate(clean.layers) if row.keras == ("conv",))
    assert clean.layers[conv].channel_relative_error is not None, clean.layers[conv]
    real, signalling = q._tflite_debugger, np.array([0x7FA00000], np.uint32).view(np.float32)[0]

    def spoilt_debugger(model, setting, io_type, keep=None, forms=(), **options):
        calls = iter(range(10 ** 6))  # the debugger calls keep per sample, for each op in the rows' order

        def keep_spoilt(f, quantized, scale, zero):
            if next(calls) % len(clean.layers) == conv:
                f = np.array(f, np.float32)
                f.reshape(-1)[::7] = signalling
            return keep(f, quantized, scale, zero)

        return real(model, setting, io_type, keep=keep_spoilt, forms=forms, **options)

    monkeypatch.setattr(q, "_tflite_debugger", spoilt_debugger)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        diagnosis = q.diagnose_tflite(model, setting)
    assert diagnosis.layers[conv].channel_relative_error is None, diagnosis.layers[conv]
    for index, row in enumerate(clean.layers):
        if index != conv and row.channel_relative_error is not None:
            assert diagnosis.layers[index].channel_relative_error == pytest.approx(row.channel_relative_error), row


def test_converter_names_are_read_as_keras_layers():
    """TensorFlow scopes each op under its layers' names, suffixed `_N` when the model was traced more than once
    (`m_1/conv_1` is the layer `conv`, `m_1/conv_1_2` the layer `conv_1`); TFLite fuses ops and joins their names
    with ';'; tf2onnx makes nodes of its own."""
    inner_input = keras.Input((6, 6, 4))
    inner = keras.Model(inner_input, keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(inner_input),
                        name="inner")
    image = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(image)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2D(4, 1, name="conv_1")(x)
    model = keras.Model(image, inner(x), name="m")
    assert q.keras_layers("m_1/conv_1/convolution", model) == ("conv",)
    assert q.keras_layers("m_1/conv_1_2/BiasAdd", model) == ("conv_1",)
    assert q.keras_layers("m/conv_1/BiasAdd", model) == ("conv_1",), "not suffixed: the names as they are"
    assert q.keras_layers("m_1/bn_1/batchnorm/add_1;m_1/conv_1/convolution", model) == ("conv", "bn"), \
        "the layer with weights first"
    assert q.keras_layers("m_1/inner_1/dw_1/depthwise", model) == ("inner/dw",)
    assert q.keras_layers("Conv__138", model) == ()


def test_onnx_diagnosis_has_local_and_accumulated_errors(masked):
    model, calibration = masked
    from sepconv.convert.export.onnx import OnnxOptions, export_onnx

    float_model = export_onnx(model, options=OnnxOptions())
    diagnosis = q.diagnose_onnx(float_model, q.Setting("x", calibration.samples, "100"), "image")
    worst = diagnosis.worst(1)[0]
    assert worst.op in ("Gemm", "MatMul"), diagnosis.summary()
    assert worst.accumulated_relative_error is not None and worst.channel_relative_error > 0.25


def test_options_are_validated():
    with pytest.raises(InvalidOptionError, match="max_float_layers"):
        q.QuantizationOptions(max_float_layers=-1)
    for aim in (1.5, -0.1, True, "0.99"):
        with pytest.raises(InvalidOptionError, match="aim"):
            q.QuantizationOptions(aim=aim)


def test_convert_model_repairs_and_records_float_layers(tmp_path, masked):
    """The pipeline: int8 repaired, the manifest names the float layer; with --no-repair, one line with the
    diagnosis and nothing written."""
    from sepconv.convert.pipeline import ConvertOptions, convert_model

    model, calibration = masked
    model.save(tmp_path / "m.keras")
    x = np.concatenate([calibration.pool, calibration.validation])
    y = np.argmax(model.predict(x, verbose=0)[:, :10], axis=1)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    common = dict(separate=False, data=str(tmp_path / "d.npz"), quantize="int8")
    with pytest.raises(VerificationError, match="error starts at") as failed:
        convert_model(tmp_path / "m.keras", [tmp_path / "bad.tflite"],
                      options=ConvertOptions(**common, quantization=q.QuantizationOptions(repair=False)))
    assert "\n" not in str(failed.value)
    assert not list(tmp_path.glob("bad*"))
    table = failed.value.details["quantization"][str(tmp_path / "bad.tflite")]["diagnosis"]["layers"]
    assert any(row["op"] == "FULLY_CONNECTED" and row["channel_relative_error"] > 0.25 for row in table), table
    result = convert_model(tmp_path / "m.keras", [tmp_path / "ok.tflite"], options=ConvertOptions(**common))
    manifest = json.loads((tmp_path / "ok.tflite.json").read_text())
    assert manifest["quantization"]["passed"]
    assert len(manifest["quantization"]["float_layers"]) == 1
    assert result.artifacts[0].verification.passed


def test_explain_diagnoses_an_artifact_that_passes(masked):
    _, calibration = masked
    keras.utils.set_random_seed(1)
    image = keras.Input((8, 8, 1), name="image")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, activation="relu", name="conv")(image))
    model = keras.Model(image, keras.layers.Dense(10, name="logits")(x))
    plain = q.quantize_verified(model, target_named("tflite"), calibration, tolerance=Tolerance(min_agreement=0.9))[1]
    assert plain.passed and plain.diagnosis is None and len(plain.attempts) == 1 and plain.diagnosis_seconds == 0
    explained = q.quantize_verified(model, target_named("tflite"), calibration, tolerance=Tolerance(min_agreement=0.9),
                                    options=q.QuantizationOptions(explain=True))[1]
    assert explained.passed and len(explained.attempts) == 1 and explained.float_layers == ()
    assert explained.diagnosis_seconds > 0 and explained.to_dict()["diagnosis_seconds"] > 0
    assert {row.op for row in explained.diagnosis.layers} >= {"CONV_2D", "FULLY_CONNECTED"}
    assert explained.to_dict()["diagnosis"]["samples"] == min(len(calibration.samples), q.DIAGNOSIS_SAMPLES)


def test_cli_flags_map_onto_quantization_options():
    from sepconv.convert.cli import convert_options, convert_parser

    args = convert_parser().parse_args(["m.h5", "m.tflite", "--explain-quantization", "--no-repair",
                                        "--max-float-layers", "1", "--no-equalize", "--no-round-weights",
                                        "--repair-aim", "0"])
    assert convert_options(args).quantization == q.QuantizationOptions(repair=False, explain=True,
                                                                        max_float_layers=1, equalize=False,
                                                                        round_weights=False, aim=0.0)
    assert convert_options(convert_parser().parse_args(["m.h5", "m.tflite"])).quantization == q.QuantizationOptions()


@pytest.mark.parametrize("images, max_drop, expected", [
    (225, 1.0, []),
    (60, 1.0, ["one image is 1.67 points of the 1-point --max-accuracy-drop budget", "give at least 200"]),
    (40, None, ["one image is 2.50% of top-1 agreement, against the 2% that int8 may lose", "give at least 100"]),
])
def test_too_few_validation_images_are_said_with_how_many_it_would_take(images, max_drop, expected):
    from sepconv.convert.pipeline import _unresolved

    lines = " | ".join(_unresolved(images, max_drop, 0.98))
    for part in expected:
        assert part in lines, lines
    if not expected:
        assert lines == ""
    assert _unresolved(images, None, None) == [], "no budget and nothing quantized: nothing to resolve"


def test_a_model_whose_own_top1_moves_under_int8_noise_is_named_when_int8_fails():
    """keras_stability: a classifier whose images differ by less than half an int8 input step keeps its top-1 on few
    of them under that noise (its int8 cannot agree: the input quantization alone erases the differences); its failed
    int8 report says so and records the figure. The same model on images spread over the range is stable."""
    keras.utils.set_random_seed(3)
    image = keras.Input((4, 4, 1))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1000.0, offset=-500.0)(image))  # decides on the thousandths
    model = keras.Model(image, keras.layers.Dense(3, activation="softmax")(x))
    rng = np.random.default_rng(3)
    samples = rng.uniform(0, 1, (64, 4, 4, 1)).astype(np.float32)  # the int8 input step: 1 / 255
    close = (0.5 + 0.001 * rng.uniform(-1, 1, (200, 4, 4, 1))).astype(np.float32)
    spread = rng.uniform(0, 1, (200, 4, 4, 1)).astype(np.float32)
    assert q.keras_stability(model, close, samples) < 0.9
    assert q.keras_stability(model, spread, samples) > 0.98
    assert q.keras_stability(model, np.round(spread * 255).astype(np.uint8), samples) is None, "integer images"
    report = q.quantize_verified(model, target_named("tflite"), q.Calibration(samples, samples, close),
                                 tolerance=Tolerance(), options=q.QuantizationOptions(repair=False))[1]
    assert not report.passed and report.keras_stability < 0.9, report.line()
    assert "the Keras model itself keeps its top-1 on only" in report.line(), report.line()
    assert report.to_dict()["keras_stability"] == report.keras_stability


def test_a_fallbacks_line_names_the_three_layers_where_int8_hurts_most():
    """Where the error is spread (no layer bad alone), the layers that matter are those where it has added up: ranked
    by the error all layers together give, each with its own error beside it; without that measure, by their own."""
    rows = [q.LayerError(f"op{i}", "CONV_2D", i, 1.0, alone, None, None, None, together, keras=(f"block_{i}",))
            for i, (alone, together) in enumerate([(0.04, 0.05), (0.01, 0.22), (0.02, 0.21), (0.03, 0.10),
                                                    (0.005, 0.20)])]
    line = q.Diagnosis("tflite", "debugger", 100, tuple(rows)).worst_line()
    assert line == ("where int8 hurts most (all layers together, each alone): block_1 22% (1%), block_2 21% (2%), "
                    "block_4 20% (0%)"), line
    alone = q.Diagnosis("tflite", "debugger", 100, tuple(replace(r, accumulated_relative_error=None) for r in rows))
    assert alone.worst_line() == "where int8 hurts most (each layer alone): block_0 4%, block_3 3%, block_2 2%"
