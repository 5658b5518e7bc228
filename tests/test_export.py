"""Every TFLite mode and every ONNX mode, on hand-made models, keras.applications and the trained digits model."""

import collections

import keras
import numpy as np
import onnx
import pytest
from models import CASES

from sepconv.convert import separate
from sepconv.convert.errors import ExportError, FlexOpsError, InvalidOptionError
from sepconv.convert.export.onnx import ONNX_MODES, export_onnx
from sepconv.convert.export.tflite import TFLITE_MODES, export_tflite
from sepconv.convert.export.verification import verify
from sepconv.convert.graph import predict_keras
from sepconv.deploy import open_runtime

# How close each mode must stay to the Keras model on random-weight models fed inputs like their calibration data.
# Cosine similarity of outputs (per sample, averaged); float32 is also held to allclose below.
COSINE_FLOOR = {
    "tflite": {
        "none": 0.999999,  # same maths in float32
        "float16": 0.999,  # weights rounded to 11 significant bits
        "dynamic": 0.99,  # int8 weights, float activations
        "int8": 0.95,  # int8 weights and activations on random weights: the loosest
        "int16x8": 0.99,  # int16 activations keep most of the precision
    },
    "onnx": {"none": 0.999999, "dynamic": 0.95, "int8": 0.95},
}
FLOAT_RTOL = 1e-4  # float32 artifacts: relative max error, the contract of verification
EXPORT_CASES = ["sequential_options", "functional_branches", "nested", "conv_options"]  # single input, float32


def test_every_mode_has_a_tolerance():
    assert set(COSINE_FLOOR["tflite"]) == set(TFLITE_MODES)
    assert set(COSINE_FLOOR["onnx"]) == set(ONNX_MODES)


def _data(model, n, seed):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, *model.input_shape[1:])).astype(np.float32)


def _export(fmt, model, path, mode, calibration, **kwargs):
    if fmt == "tflite":
        return export_tflite(model, path, quantize=mode, representative_data=calibration, **kwargs)
    return export_onnx(model, path, quantize=mode, representative_data=calibration, **kwargs)


def _check_artifact(fmt, mode, model, path, x, what):
    runtime = open_runtime(path)
    result = verify(model, runtime, x, quantized=mode != "none", quantize=mode)
    cosine = min(check.cosine for check in result.outputs)
    assert cosine >= COSINE_FLOOR[fmt][mode], f"{what}: cosine {cosine} below {COSINE_FLOOR[fmt][mode]}"
    if mode == "none":
        expected = predict_keras(model, x)
        actual = runtime.run([x])
        for e, a in zip(expected, actual):
            np.testing.assert_allclose(a, e, rtol=0, atol=FLOAT_RTOL * np.abs(e).max(),
                                       err_msg=f"{what}: float32 artifact differs from Keras")
        assert result.passed, f"{what}: {result.failures()}"
    return runtime


@pytest.mark.parametrize("fmt, mode", [("tflite", m) for m in TFLITE_MODES] + [("onnx", m) for m in ONNX_MODES])
@pytest.mark.parametrize("case", EXPORT_CASES)
def test_hand_made_models(tmp_path, case, fmt, mode):
    original = CASES[case]()
    model, _ = separate(original, rank=2)
    calibration, x = _data(model, 32, 1), _data(model, 16, 2)
    path = tmp_path / f"{case}.{fmt}"
    data = _export(fmt, model, path, mode, calibration)
    assert path.read_bytes() == data
    runtime = _check_artifact(fmt, mode, model, path, x, f"{case} {fmt} {mode}")
    ops = runtime.op_histogram()
    if fmt == "tflite":
        assert ops.get("DEPTHWISE_CONV_2D", 0) >= 1 and ops.get("CONV_2D", 0) >= 1, ops
        assert not any(op.startswith("Flex") or op == "CUSTOM" for op in ops), ops
    if mode == "int8" and fmt == "onnx":
        assert ops.get("QuantizeLinear", 0) >= 1 and ops.get("DequantizeLinear", 0) >= 1, "QDQ format expected"
    if mode == "dynamic" and fmt == "onnx":
        assert ops.get("ConvInteger", 0) + ops.get("MatMulInteger", 0) >= 1, ops


@pytest.mark.parametrize("io_type", ["int8", "uint8"])
def test_tflite_int8_io_types(tmp_path, io_type):
    model, _ = separate(CASES["functional_branches"](), rank=2)
    path = tmp_path / "m.tflite"
    export_tflite(model, path, quantize="int8", io_type=io_type, representative_data=_data(model, 32, 1))
    runtime = open_runtime(path)
    assert runtime.inputs[0].dtype == io_type and runtime.outputs[0].dtype == io_type
    assert runtime.inputs[0].scale is not None, "quantized inputs carry their scale and zero point"
    _check_artifact("tflite", "int8", model, path, _data(model, 16, 2), f"int8 {io_type} io")


def test_per_tensor_differs_from_per_channel(tmp_path):
    model, _ = separate(CASES["functional_branches"](), rank=2)
    calibration = _data(model, 16, 1)
    per_channel = export_tflite(model, quantize="int8", representative_data=calibration)
    per_tensor = export_tflite(model, quantize="int8", representative_data=calibration, per_channel=False)
    assert per_channel != per_tensor


@pytest.mark.parametrize("kwargs, match", [
    (dict(quantize="int4"), "Unrecognized quantize='int4'"),
    (dict(quantize="int8"), "representative data"),
    (dict(quantize="int8", io_type="int16", representative_data=np.zeros((1, 12, 12, 3), np.float32)), "io_type"),
])
def test_tflite_bad_options(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        export_tflite(CASES["conv_options"](), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(quantize="float16"), "Unrecognized quantize='float16' for ONNX"), (dict(opset=9), "opset=9"),
    (dict(layout="nwhc"), "layout"), (dict(quantize="int8"), "representative data"),
])
def test_onnx_bad_options(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        export_onnx(CASES["conv_options"](), **kwargs)


def _transposes(data: bytes) -> int:
    return collections.Counter(n.op_type for n in onnx.load_from_string(data).graph.node)["Transpose"]


def test_onnx_layout_dynamic_batch_and_transposes(tmp_path):
    x_in = keras.Input((16, 16, 3), name="pixels")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x_in)
    x = keras.layers.Conv2D(8, 3, padding="same")(x)
    x = keras.layers.Conv2D(8, 3, strides=2)(x)
    model, _ = separate(keras.Model(x_in, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))), rank=2)
    nhwc = export_onnx(model, tmp_path / "nhwc.onnx")
    nchw = export_onnx(model, tmp_path / "nchw.onnx", layout="nchw", opset=13)
    assert _transposes(nhwc) == 1, "NHWC: one transpose at the input, none around the six convolutions"
    assert _transposes(nchw) == 0, "NCHW input: no transpose at all"
    graph = onnx.load_from_string(nhwc).graph
    assert graph.input[0].name == "pixels"
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    assert not batch.HasField("dim_value"), "the batch dimension must be dynamic"
    assert onnx.load_from_string(nchw).opset_import[0].version == 13
    x = _data(model, 5, 3)
    expected = predict_keras(model, x)[0]
    got = open_runtime(tmp_path / "nchw.onnx").run([np.transpose(x, (0, 3, 1, 2))])[0]
    np.testing.assert_allclose(got, expected, atol=FLOAT_RTOL * np.abs(expected).max(), err_msg="NCHW ONNX")


def test_a_failing_tf2onnx_optimizer_is_still_only_skipped(tmp_path, monkeypatch):
    """ONNX export runs tf2onnx without its graph copy before each optimizer (onnx._from_graph_def), where an optimizer
    that raises fails the whole translation; then it runs again with the copies, where the optimizer is skipped:
    the export succeeds and computes the model's function, and the user's environment is as it was. A translation
    that fails before the optimizers fails once."""
    import os

    import tf2onnx.optimizer
    from tf2onnx.optimizer.optimizer_base import GraphOptimizerBase

    from sepconv.convert.export import onnx as onnx_export

    seen = []

    class Failing(GraphOptimizerBase):
        def _optimize(self, graph):
            seen.append(os.environ.get(onnx_export.CATCH_ERRORS))
            raise RuntimeError("an optimizer that breaks on this graph")

    monkeypatch.setitem(tf2onnx.optimizer._optimizers, "failing", Failing)
    monkeypatch.delenv(onnx_export.CATCH_ERRORS, raising=False)
    x_in = keras.Input((8, 8, 3))
    model = keras.Model(x_in, keras.layers.Conv2D(4, 3, activation="relu")(x_in))
    data = export_onnx(model, tmp_path / "m.onnx")
    assert seen[0] == "false" and None in seen[1:], f"a run without the copies, then one with them: {seen}"
    assert onnx_export.CATCH_ERRORS not in os.environ, "the environment is put back"
    x = _data(model, 3, 0)
    expected = predict_keras(model, x)[0]
    np.testing.assert_allclose(open_runtime(tmp_path / "m.onnx").run([x])[0], expected,
                               atol=FLOAT_RTOL * np.abs(expected).max(), err_msg="exported with the optimizer skipped")
    assert data == (tmp_path / "m.onnx").read_bytes()
    calls = []

    def untranslatable(*args, **kwargs):  # fails before any optimizer: not tried again
        calls.append(os.environ.get(onnx_export.CATCH_ERRORS))
        raise ValueError("no handler for this op")

    monkeypatch.setattr(tf2onnx.convert, "from_graph_def", untranslatable)
    with pytest.raises(ExportError, match="no handler for this op"):
        export_onnx(model, tmp_path / "n.onnx")
    assert calls == ["false"] and onnx_export.CATCH_ERRORS not in os.environ, calls


def test_flex_ops_are_refused_then_allowed(tmp_path):
    from custom_layers import LogDetFeature

    x_in = keras.Input((8, 8, 3))
    model = keras.Model(x_in, LogDetFeature(name="logdet_feature")(keras.layers.Conv2D(4, 3, name="conv")(x_in)))
    with pytest.raises(FlexOpsError, match=r"Cholesky.*logdet_feature.*--allow-flex"):
        export_tflite(model, tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()
    assert len(export_tflite(model, allow_flex=True)) > 0


def test_ops_without_any_kernel_are_named():
    x_in = keras.Input((8, 8, 3))
    y = keras.layers.Lambda(keras.ops.erfinv, name="inverse_erf")(keras.layers.Conv2D(4, 3)(x_in))
    with pytest.raises(ExportError, match=r"no kernel.*Erfinv.*inverse_erf"):
        export_tflite(keras.Model(x_in, y))


@pytest.mark.slow
def test_trained_digits_int8_agreement(tmp_path, trained_demo, digits):
    """int8 artifacts of the trained demo model give the Keras model's answers on the digits test set."""
    model, _ = separate(trained_demo["model"], rank=4)
    calibration = digits.x_train[:200]
    keras_accuracy = float(np.mean(np.argmax(predict_keras(model, digits.x_test)[0], 1) == digits.y_test))
    for fmt in ("tflite", "onnx"):
        path = tmp_path / f"digits.{fmt}"
        _export(fmt, model, path, "int8", calibration)
        result = verify(model, path, digits.x_test, digits.y_test, quantized=True, quantize="int8")
        check = result.outputs[0]
        assert check.agreement >= 0.98, f"{fmt} int8 agrees with Keras on {check.agreement:.2%} of digits"
        assert check.accuracy >= keras_accuracy - 0.015, f"{fmt} int8 accuracy {check.accuracy} vs {keras_accuracy}"
        assert result.passed


def test_onnx_untranslatable_ops_are_named():
    x_in = keras.Input((8, 8, 3))
    y = keras.layers.Lambda(keras.ops.erfinv, name="inverse_erf")(keras.layers.Conv2D(4, 3)(x_in))
    with pytest.raises(ExportError, match=r"no ONNX translation.*Erfinv.*inverse_erf"):
        export_onnx(keras.Model(x_in, y))


def test_artifacts_are_verified_against_one_forward_pass_of_each_model(tmp_path, monkeypatch):
    """A large model's Keras forward passes over the test inputs are the slowest part of its conversion (issue 13):
    the original's outputs are computed once (they score every stage and every artifact), the separated model's once
    for the stage table and once for all the artifacts, however many there are."""
    from models import functional_branches

    from sepconv.convert import convert_model

    from sepconv.convert import graph
    from sepconv.convert.export import verification
    from sepconv.convert.recovery import budget, finetuning, steps

    functional_branches().save(tmp_path / "m.keras")
    calls = []
    real = graph.predict_keras
    for module in (graph, verification, steps, budget, finetuning):  # every module that runs a model's forward pass
        monkeypatch.setattr(module, "predict_keras",
                            lambda model, x, batch_size=None: (calls.append(model), real(model, x, batch_size))[1])
    result = convert_model(tmp_path / "m.keras", [tmp_path / "m.tflite", tmp_path / "m.onnx"], rank=1,
                           quantize="none")
    assert all(artifact.verification.passed for artifact in result.artifacts)
    assert len(calls) == 3 and calls[1] is calls[2] and calls[0] is not calls[1], [m.name for m in calls]
    assert all(a.verification.original_agreement is not None for a in result.artifacts)


def test_a_silent_step_gets_a_progress_line_every_so_often():
    import time

    from sepconv.convert.pipeline import _heartbeat

    lines = []
    with _heartbeat(lambda stage, message: lines.append((stage, message)), every=0.3) as say:
        say("export", "m.tflite: converting (tflite, int8)")
        time.sleep(1.6)
    assert lines[0] == ("export", "m.tflite: converting (tflite, int8)")
    assert len(lines) >= 2 and all(stage == "export" and message.startswith("still working (")
                                   for stage, message in lines[1:]), lines
    count = len(lines)
    time.sleep(0.5)
    assert len(lines) == count, "no line once the run is over"


def test_one_frozen_graph_serves_every_export_until_a_weight_changes(tmp_path):
    """Tracing and freezing a large model is a conversion's fixed cost: both exporters and every int8 attempt share
    one frozen function, and a changed weight (fine-tuning, a user's assign) makes a new one."""
    import gc
    import weakref

    from sepconv.convert.export import trace

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    first = trace.frozen_function(model)
    assert trace.frozen_function(model) is first
    traced = trace._KEPT[model].traced[1]
    model.get_layer("conv").kernel.assign(np.zeros((3, 3, 3, 4), np.float32))
    changed = trace.frozen_function(model)
    assert changed is not first
    assert trace._KEPT[model].traced[1] is traced, "new weights: frozen again from the same trace, not traced again"
    path = tmp_path / "changed.tflite"
    export_tflite(model, path)
    x = np.ones((2, 8, 8, 3), np.float32)
    np.testing.assert_allclose(open_runtime(str(path)).run([x])[0], keras.ops.convert_to_numpy(model(x)), rtol=1e-5,
                               atol=1e-6, err_msg="an export after a weight changed must hold the new weights")
    kernel = model.get_layer("conv").kernel
    zeros = np.zeros((3, 3, 3, 4), np.float32)  # the weights of `changed`
    kernel.assign(np.ones((3, 3, 3, 4), np.float32))
    assert trace.frozen_function(model) is not changed, "one weight set kept by default: the zeros' is gone"
    trace.keep_frozen(model, 2)  # a model that switches between weight sets (the int8 repair's copy)
    ones = trace.frozen_function(model)
    kernel.assign(zeros)
    again = trace.frozen_function(model)
    kernel.assign(np.ones((3, 3, 3, 4), np.float32))
    assert trace.frozen_function(model) is ones, "switched back: the kept frozen function, not a new freeze"
    kernel.assign(np.full((3, 3, 3, 4), 2.0, np.float32))
    third = trace.frozen_function(model)
    assert third is not ones and third is not again
    kernel.assign(np.ones((3, 3, 3, 4), np.float32))
    assert trace.frozen_function(model) is not ones, "two kept: the oldest (the ones') made room for the third"
    alive = weakref.ref(model)
    del first, changed, model, traced, kernel, ones, again, third
    gc.collect()
    gc.collect()
    assert alive() is None, "the cache must not keep a model alive"


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_onnx_calibration_in_batches_gives_the_ranges_one_at_a_time_does(tmp_path, monkeypatch, method):
    """ONNX Runtime calibrates on the samples a batch per run (a divisor of their count: the histogram calibrators
    stack the runs): the QDQ model's every scale is the one a run per sample gives, in a sixth of the runs or fewer."""
    import onnxruntime

    from sepconv.convert.export.onnx import calibration_batch, quantize_static_qdq
    from sepconv.convert.export.quantization import _qdq_scales

    assert [calibration_batch(n, 64) for n in (200, 1000, 97, 1, 12)] == [50, 50, 1, 1, 12]
    model = CASES["functional_branches"]()
    source = tmp_path / "float.onnx"
    export_onnx(model, source)
    x, name = _data(model, 60, seed=3), onnx.load(str(source)).graph.input[0].name
    runs, run = [], onnxruntime.InferenceSession.run
    monkeypatch.setattr(onnxruntime.InferenceSession, "run", lambda self, *a, **k: runs.append(1) or run(self, *a, **k))
    scales = {}
    for batch in (1, 64):
        runs.clear()
        quantize_static_qdq(source, tmp_path / f"{batch}.onnx", x, name, method=method, batch=batch)
        scales[batch] = (_qdq_scales(onnx.load(str(tmp_path / f"{batch}.onnx")).graph), len(runs))
    (one, one_runs), (batched, batched_runs) = scales[1], scales[64]
    assert one.keys() == batched.keys() and len(one) > 3, (one, batched)
    np.testing.assert_allclose([batched[k] for k in one], list(one.values()), rtol=1e-5,
                               err_msg=f"{method}: the scales calibrated in batches of 60 differ from one at a time")
    assert batched_runs * 6 <= one_runs, (batched_runs, one_runs)
