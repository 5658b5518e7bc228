"""The equivalent forms of a separable layer (convert/export/forms.py): the tiled form computes what SeparableConv2D
computes, exports to TFLite and ONNX that agree with the Keras model, and the faster form is chosen by measurement
(latency_table.fastest_forms)."""

import keras
import numpy as np
import pytest

from sepconv.convert.export.forms import STANDARD, TILED, TiledSeparableConv2D, with_forms
from sepconv.convert.graph import predict_keras

CONFIGS = {
    "same": dict(padding="same"),
    "strided, no bias": dict(strides=2, use_bias=False),
    "dilated, relu": dict(dilation_rate=2, padding="same", activation="relu"),
    "unequal strides": dict(strides=(2, 1), padding="same"),
}


def separable_model(multiplier=3, seed=0, **config):
    keras.utils.set_random_seed(seed)
    x_in = keras.Input((12, 12, 5))
    y = keras.layers.SeparableConv2D(7, 3, depth_multiplier=multiplier, name="s", **config)(x_in)
    model = keras.Model(x_in, keras.layers.Conv2D(4, 1, name="head")(keras.layers.ReLU()(y)))
    rng = np.random.default_rng(seed)
    for weight in model.get_layer("s").weights:  # not the initializers' zero bias: every weight matters
        weight.assign(rng.standard_normal(weight.shape).astype("float32"))
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_tiled_form_computes_what_the_separable_layer_does(name):
    model = separable_model(**CONFIGS[name])
    tiled = with_forms(model, {"s": TILED})
    assert [type(layer).__name__ for layer in tiled.layers[1:]] == ["TiledSeparableConv2D", "ReLU", "Conv2D"]
    assert tiled.get_layer("s").depthwise_kernel.shape == (3, 3, 15, 1), "K*C channels, multiplier 1"
    x = np.random.default_rng(1).standard_normal((6, 12, 12, 5)).astype(np.float32)
    expected = predict_keras(model, x)[0]
    np.testing.assert_allclose(predict_keras(tiled, x)[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(),
                               err_msg=f"{name}: the tiled form must compute the separable layer's function")
    assert with_forms(model, {"s": STANDARD}) is model and with_forms(model, ()) is model, "nothing to change"


def test_forms_are_refused_where_they_do_not_apply():
    model = separable_model()
    with pytest.raises(ValueError, match="unknown separable form"):
        with_forms(model, {"s": "grouped"})
    with pytest.raises(ValueError, match="head: the tiled form is for a SeparableConv2D with depth multiplier > 1"):
        with_forms(model, {"head": TILED})
    with pytest.raises(ValueError, match="depth multiplier > 1"):
        with_forms(separable_model(multiplier=1), {"s": TILED})


@pytest.mark.parametrize("fmt", ["tflite", "onnx", "onnx-nchw"])
def test_exported_in_the_tiled_form_the_artifact_matches_the_keras_model(fmt, tmp_path):
    """The export options' `forms` change the graph the exporters translate, not the function: the float32 artifact
    agrees with the Keras model (standard form) to float tolerance, and its op list shows the form."""
    from sepconv.convert.export.onnx import OnnxOptions, export_onnx
    from sepconv.convert.export.tflite import TFLiteOptions, export_tflite
    from sepconv.deploy.runtime import open_runtime

    model = separable_model(padding="same")
    x = np.random.default_rng(2).standard_normal((4, 12, 12, 5)).astype(np.float32)
    layout = "nchw" if fmt.endswith("nchw") else "nhwc"
    export = (lambda forms: export_tflite(model, options=TFLiteOptions(forms=forms))) if fmt == "tflite" else (
        lambda forms: export_onnx(model, options=OnnxOptions(forms=forms, layout=layout)))
    path = tmp_path / f"m.{fmt.split('-')[0]}"
    path.write_bytes(export((("s", TILED),)))
    runtime = open_runtime(path)
    fed = np.transpose(x, (0, 3, 1, 2)) if layout == "nchw" else x
    got = np.concatenate([runtime.run([fed[i:i + 1]])[0] for i in range(len(x))])
    expected = predict_keras(model, x)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max(),
                               err_msg=f"{fmt}: the tiled export computes the Keras model's function")
    ops = runtime.op_histogram()
    assert any("CONCAT" in op.upper() for op in ops), f"the tiled form concatenates the input: {ops}"
    path.write_bytes(export(()))
    assert not any("CONCAT" in op.upper() for op in open_runtime(path).op_histogram()), "the standard form does not"


def test_the_faster_form_is_chosen_by_timing_both(tmp_path):
    from sepconv.convert.export.tflite import TFLiteOptions
    from sepconv.convert.recovery.latency_table import LatencyOptions, fastest_forms
    from sepconv.deploy.timing import TimingOptions

    options = LatencyOptions(timing=TimingOptions(min_seconds=0.05, min_runs=20), cache_dir=str(tmp_path),
                             export=TFLiteOptions(quantize="int8"))
    record = fastest_forms(separable_model(padding="same"), options)
    times = record["ms"]["s"]
    assert set(times) == {STANDARD, TILED} and all(ms > 0 for ms in times.values())
    assert record["forms"]["s"] == min(times, key=times.get), "the faster of the two, as measured"
    assert record["changed"] == ((("s", TILED),) if record["forms"]["s"] == TILED else ())
    assert record["format"] == "tflite" and record["quantize"] == "int8" and record["where"] == "local"
    again = fastest_forms(separable_model(padding="same", seed=5), options)
    assert again["ms"] == record["ms"], "the same layer shape again is read from the cache (weights do not matter)"
    assert fastest_forms(separable_model(multiplier=1), options) == {}, "multiplier 1: nothing to choose"


def test_the_tiled_layer_round_trips_its_config():
    layer = with_forms(separable_model(strides=2, activation="relu"), {"s": TILED}).get_layer("s")
    copy = TiledSeparableConv2D.from_config(layer.get_config())
    assert copy.get_config() == layer.get_config()
