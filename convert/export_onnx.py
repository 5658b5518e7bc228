"""ONNX export with tf2onnx (from a tf.function), and int8 with ONNX Runtime's quantizer (QDQ static, or dynamic).

tf2onnx's `from_keras` breaks on some Keras 3 models, so the model is traced into a `tf.function` with a dynamic batch
dimension. The graph keeps the Keras model's NHWC input (tf2onnx's optimizer then leaves a transpose at the input and
where a layout-sensitive op such as Flatten needs one, none around each convolution); `layout="nchw"` makes the input
NCHW, as PyTorch-minded consumers expect.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sepconv.convert.errors import ExportError, InvalidOptionError
from sepconv.deploy.quiet import captured_output

ONNX_MODES = ("none", "dynamic", "int8")
DEFAULT_OPSET = 17  # supported by tf2onnx 1.16+ and every ONNX Runtime since 1.14
LAYOUTS = ("nhwc", "nchw")


@dataclass(frozen=True)
class OnnxOptions:
    """quantize: none (float32), dynamic (int8 weights, activations quantized at run time), int8 (static QDQ).
    opset: the ONNX opset (13..18). layout: the input layout, nhwc as in Keras or nchw.
    per_channel: per-channel weight scales for int8 (the default)."""

    quantize: str = "none"
    opset: int = DEFAULT_OPSET
    layout: str = "nhwc"
    per_channel: bool = True

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
    with tempfile.TemporaryDirectory(prefix="sepconv-onnx-") as tmp:
        float_path = Path(tmp) / "float.onnx"
        _tf2onnx(model, float_path, options)
        if options.quantize == "none":
            result = float_path
        else:
            result = Path(tmp) / "quantized.onnx"
            _quantize(float_path, result, options, representative_data, model)
        data = result.read_bytes()
    if path is not None:
        from sepconv.convert.files import write_atomic

        write_atomic(path, data)
    return data


def input_names(model) -> list[str]:
    return [tensor._keras_history.operation.name for tensor in model.inputs]


def _tf2onnx(model, path: Path, options: OnnxOptions) -> None:
    import tensorflow as tf

    specs = tuple(tf.TensorSpec((None, *t.shape[1:]), t.dtype, name=name) for t, name in zip(model.inputs,
                                                                                                input_names(model)))

    def forward(*inputs):
        return model(inputs[0] if len(inputs) == 1 else list(inputs), training=False)

    function = tf.function(forward, input_signature=specs)
    nchw = input_names(model) if options.layout == "nchw" else None
    try:
        with captured_output() as log:
            import tf2onnx

            tf2onnx.convert.from_function(function, input_signature=specs, opset=options.opset,
                                          inputs_as_nchw=nchw, output_path=str(path))
    except Exception as error:  # tf2onnx raises ValueError, RuntimeError, its own errors ...
        raise ExportError(f"tf2onnx failed at opset {options.opset} ({_first(error)}); try another --opset, or run "
                          f"with --debug for tf2onnx's log") from error
    if not path.exists():
        raise ExportError(f"tf2onnx wrote no model at opset {options.opset}; its log ends: {log.tail(1)}")


def _quantize(source: Path, target: Path, options: OnnxOptions, representative_data, model) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with captured_output():
            if options.quantize == "dynamic":
                quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                                 per_channel=options.per_channel)
                return
            prepared = source.with_name("prepared.onnx")
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            samples = np.asarray(representative_data, dtype=np.float32)
            if options.layout == "nchw":
                samples = np.transpose(samples, (0, 3, 1, 2))
            name = input_names(model)[0]

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self._rows = iter(range(len(samples)))

                def get_next(self):
                    index = next(self._rows, None)
                    return None if index is None else {name: samples[index:index + 1]}

            quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=options.per_channel, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8)
    except Exception as error:  # onnxruntime.quantization raises many types
        raise ExportError(f"ONNX Runtime's {options.quantize} quantization failed ({_first(error)}); run with --debug "
                          f"for details") from error


def _first(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
