"""ONNX export with tf2onnx (from a tf.function), and int8 with ONNX Runtime's quantizer (QDQ static, or dynamic).

tf2onnx's `from_keras` breaks on some Keras 3 models, so the model is traced into a `tf.function` with a dynamic batch
dimension. The graph keeps the Keras model's NHWC input (tf2onnx's optimizer then leaves a transpose at the input and
where a layout-sensitive op such as Flatten needs one, none around each convolution); `layout="nchw"` makes the input
NCHW, as PyTorch-minded consumers expect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sepconv.convert.errors import ExportError, InvalidOptionError
from sepconv.convert.export.trace import frozen_function, input_names, layers_in_scopes
from sepconv.convert.files import write_atomic
from sepconv.convert.graph import batch_size_for
from sepconv.convert.keras_compat import producer_name
from sepconv.convert.memory import collecting_cycles, release_memory
from sepconv.deploy.files import first_line, temporary_folder
from sepconv.deploy.quiet import captured_output

ONNX_MODES = ("none", "dynamic", "int8")
DEFAULT_OPSET = 17  # supported by tf2onnx 1.16+ and every ONNX Runtime since 1.14
LAYOUTS = ("nhwc", "nchw")


@dataclass(frozen=True)
class OnnxOptions:
    """quantize: none (float32), dynamic (int8 weights, activations quantized at run time), int8 (static QDQ).
    opset: the ONNX opset (13..18). layout: the input layout, nhwc as in Keras or nchw.
    per_channel: per-channel weight scales for int8 (the default).
    forms: separable layers exported in another equivalent graph form, as (path, form) pairs (forms.py)."""

    quantize: str = "none"
    opset: int = DEFAULT_OPSET
    layout: str = "nhwc"
    per_channel: bool = True
    forms: tuple = ()

    def __post_init__(self):
        if self.quantize not in ONNX_MODES:
            raise InvalidOptionError(f"Unrecognized quantize={self.quantize!r} for ONNX. Supported modes are: "
                                     f"{list(ONNX_MODES)}")
        if not isinstance(self.opset, int) or not 13 <= self.opset <= 18:
            raise InvalidOptionError(f"Unrecognized opset={self.opset!r}. Supported opsets are 13 to 18")
        if self.layout not in LAYOUTS:
            raise InvalidOptionError(f"Unrecognized layout={self.layout!r}. Supported layouts are: {list(LAYOUTS)}")


def export_onnx(model, path=None, *, representative_data: np.ndarray | None = None,
                options: OnnxOptions = OnnxOptions(), **kwargs) -> bytes:
    """Convert a Keras model to ONNX; write it atomically to `path` if given; return the serialized model.

    kwargs are OnnxOptions fields. representative_data (float32, shaped like the model's input, NHWC) calibrates
    int8 activations.
    """
    if kwargs:
        options = OnnxOptions(**{**options.__dict__, **kwargs})
    if options.quantize == "int8" and (representative_data is None or len(representative_data) == 0):
        raise InvalidOptionError("quantize='int8' calibrates activations on representative data; pass "
                                 "representative_data (CLI: --data) or use quantize='dynamic'")
    with temporary_folder("sepconv-onnx-") as tmp:
        float_path = Path(tmp) / "float.onnx"
        _tf2onnx(model, float_path, options)
        if options.quantize == "none":
            result = float_path
        else:
            result = Path(tmp) / "quantized.onnx"
            _quantize(float_path, result, options, representative_data, model)
        data = result.read_bytes()
    if path is not None:
        write_atomic(path, data)
    return data


def _tf2onnx(model, path: Path, options: OnnxOptions) -> None:
    """Translate the model's frozen graph (`trace.frozen_function`).

    Freezing first matters: tf2onnx's from_function leaves tensors a layer captures outside its variables (e.g. the
    mean and variance of EfficientNet's Normalization layer) as graph inputs nobody can feed.
    """
    import tensorflow as tf

    names = input_names(model)
    try:
        with captured_output(), collecting_cycles():  # tf2onnx, imported in _from_graph_def, talks on import too
            frozen = frozen_function(model, options.forms)
            tf_inputs = [t.name for t in frozen.inputs if t.dtype != tf.resource]
            tf_outputs = [t.name for t in frozen.outputs]
            proto = _from_graph_def(
                frozen.graph.as_graph_def(), input_names=tf_inputs, output_names=tf_outputs, opset=options.opset,
                inputs_as_nchw=tf_inputs if options.layout == "nchw" else None,
                custom_op_handlers={"Erfc": (_erfc, [])})
    except Exception as error:  # tf2onnx raises ValueError, RuntimeError, its own errors ...
        raise ExportError(f"tf2onnx failed at opset {options.opset} ({first_line(error)}); try another --opset, or run "
                          f"with --debug for tf2onnx's log") from error
    _refuse_untranslated(proto, model, options)
    for old, new in [*zip(tf_inputs, names), *zip(tf_outputs, _output_names(model, len(tf_outputs)))]:
        _rename(proto.graph, old, new)
    path.write_bytes(proto.SerializeToString())
    del proto
    release_memory()  # tf2onnx's copies of the graph, before ONNX Runtime's quantizer and verification add theirs


CATCH_ERRORS = "TF2ONNX_CATCH_ERRORS"


def _from_graph_def(graph_def, **kwargs):
    """tf2onnx's from_graph_def, first without the deep copy of the whole graph it makes before each of its
    optimizers on each pass (so that one that fails can be skipped with the graph as it was): on NASNetMobile the ONNX
    export took 14.8-17.1 s without the copies against 19.5-20.3 s with them (docs/benchmarks.md). When that run
    fails in an optimizer, it runs again as tf2onnx does by default, copies and all, so a failing optimizer is still
    only skipped (a translation that fails before the optimizers fails once). tf2onnx reads the switch from the
    environment: set for the first run, put back after."""
    import traceback

    import tf2onnx

    saved = os.environ.get(CATCH_ERRORS)
    os.environ[CATCH_ERRORS] = "false"
    try:
        return tf2onnx.convert.from_graph_def(graph_def, **kwargs)[0]
    except Exception as error:
        frames = traceback.extract_tb(error.__traceback__)
        if not any(f"tf2onnx{os.sep}optimizer{os.sep}" in frame.filename for frame in frames):
            raise
    finally:
        if saved is None:
            os.environ.pop(CATCH_ERRORS, None)
        else:
            os.environ[CATCH_ERRORS] = saved
    return tf2onnx.convert.from_graph_def(graph_def, **kwargs)[0]  # an optimizer failed: with tf2onnx's safety net


def _output_names(model, count: int) -> list[str]:
    """The Keras output layers' names (unique), else output_0, output_1, ..."""
    names = [producer_name(tensor) for tensor in model.outputs]
    if len(names) != count or len(set(names)) != count:
        return [f"output_{i}" for i in range(count)]
    return names


def _rename(graph, old: str, new: str) -> None:
    for value in list(graph.input) + list(graph.output):
        if value.name == old:
            value.name = new
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


def _erfc(ctx, node, name, args):
    """tf2onnx has no Erfc (Keras' exact gelu uses it): erfc(x) = 1 - erf(x), both in every ONNX opset we allow."""
    import tf2onnx

    node.type = "Erf"
    dtype = tf2onnx.utils.map_onnx_to_numpy_type(ctx.get_dtype(node.output[0]))
    one = ctx.make_const(tf2onnx.utils.make_name(f"{node.name}_one"), np.array(1, dtype=dtype))
    ctx.insert_new_node_on_output("Sub", node.output[0], name=tf2onnx.utils.make_name(f"{node.name}_erfc"),
                                  inputs=[one.output[0], node.output[0]])


def _refuse_untranslated(proto, model, options: OnnxOptions) -> None:
    """tf2onnx writes a graph even when it could not translate some TensorFlow ops; ONNX Runtime would refuse it."""
    import onnx

    untranslated = [node for node in proto.graph.node
                    if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type, "")]
    if untranslated:
        unknown = {node.op_type for node in untranslated}
        layers = layers_in_scopes((node.name for node in untranslated), model)
        shown = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
        hint = (" (Keras runs grouped Conv2D on the CPU as an XLA-compiled call, which tf2onnx cannot translate)"
                if "StatefulPartitionedCall" in unknown else "")
        raise ExportError(f"tf2onnx has no ONNX translation for TensorFlow ops {sorted(unknown)} in layers "
                          f"[{shown or '?'}] at opset {options.opset}{hint}; replace those layers or export to TFLite")


def _quantize(source: Path, target: Path, options: OnnxOptions, representative_data, model) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with captured_output():
            if options.quantize == "dynamic":
                quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                                 per_channel=options.per_channel)
                return
            samples = np.asarray(representative_data, dtype=np.float32)
            if options.layout == "nchw":
                samples = np.transpose(samples, (0, 3, 1, 2))
            quantize_static_qdq(source, target, samples, input_names(model)[0], per_channel=options.per_channel,
                                batch=batch_size_for(model))
    except Exception as error:  # onnxruntime.quantization raises many types
        raise ExportError(f"ONNX Runtime's {options.quantize} quantization failed ({first_line(error)}); run with --debug "
                          f"for details") from error


CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def quantize_static_qdq(source: Path, target: Path, samples: np.ndarray, input_name: str, *, per_channel: bool = True,
                        method: str = "minmax", nodes_to_exclude=(), batch: int = 1) -> None:
    """ONNX Runtime's static QDQ int8 of `source`, calibrated on `samples` (already in the model's layout) with
    `method`; `nodes_to_exclude` stay in float. The calibration runs `samples` up to `batch` at a time (the model's
    batch dimension is free): every calibrator's ranges are the same as one at a time (min / max reduce over each
    run, the histogram methods stack every run's outputs before they count), the runs far fewer (calibration_batch)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    prepared = target.with_name(target.stem + ".prepared.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    try:
        feed = reader(samples, input_name, calibration_batch(len(samples), batch))
        quantize_static(str(prepared), str(target), feed, quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method], nodes_to_exclude=list(nodes_to_exclude))
    finally:
        prepared.unlink(missing_ok=True)


def calibration_batch(count: int, limit: int) -> int:
    """The largest batch up to `limit` that divides `count` samples: ONNX Runtime's histogram calibrators stack every
    run's outputs into one array, so the runs must be of one size."""
    return max(size for size in range(1, max(1, min(limit, count)) + 1) if count % size == 0)


def reader(samples: np.ndarray, input_name: str, batch: int = 1):
    """An ONNX Runtime CalibrationDataReader feeding `samples` `batch` at a time (one at a time by default: the QDQ
    debugger's activations are per sample)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._starts = iter(range(0, len(samples), batch))

        def get_next(self):
            start = next(self._starts, None)
            return None if start is None else {input_name: samples[start:start + batch]}

    return Reader()
