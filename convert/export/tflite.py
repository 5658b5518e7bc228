"""TFLite (LiteRT) export with the TFLite converter: float32, float16, dynamic-range int8, full int8, 16x8.

The converter reads the model's frozen function (`trace.frozen_function`, the same graph the ONNX export uses).

Built-in ops only: if the model needs TensorFlow ops (Flex / SELECT_TF_OPS), which the plain LiteRT runtime of a
Raspberry Pi cannot run, the export fails naming the ops and layers, unless `allow_flex=True`. Keras' own
`model.export(format="litert")` enables Flex silently; this module does not use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from sepconv.convert.errors import ExportError, FlexOpsError, InvalidOptionError
from sepconv.convert.export.trace import frozen_function, layers_in_scopes
from sepconv.convert.files import write_atomic
from sepconv.convert.keras_compat import disable_per_channel
from sepconv.deploy.files import first_line
from sepconv.deploy.quiet import captured_output
from sepconv.deploy.runtime import tflite_interpreter_class

TFLITE_MODES = ("none", "float16", "dynamic", "int8", "int16x8")
NEEDS_DATA = ("int8", "int16x8")
IO_TYPES = {"int8": ("float32", "int8", "uint8"), "int16x8": ("float32", "int16")}


@dataclass(frozen=True)
class TFLiteOptions:
    """quantize: none (float32), float16 (weights), dynamic (int8 weights), int8 (full integer), int16x8.
    io_type: input/output tensor type of int8 models (float32, int8, uint8) or of 16x8 ones (float32, int16).
    per_channel: per-channel weight quantization (the default); False for per-tensor.
    allow_flex: embed TensorFlow ops the built-in runtime lacks (needs a Flex-enabled runtime).
    forms: separable layers exported in another equivalent graph form, as (path, form) pairs (forms.py; the run's
    latency table chooses them)."""

    quantize: str = "none"
    io_type: str = "float32"
    per_channel: bool = True
    allow_flex: bool = False
    forms: tuple = ()

    def __post_init__(self):
        if self.quantize not in TFLITE_MODES:
            raise InvalidOptionError(f"Unrecognized quantize={self.quantize!r} for TFLite. Supported modes are: "
                                     f"{list(TFLITE_MODES)}")
        allowed = IO_TYPES.get(self.quantize, ("float32",))
        if self.io_type not in allowed:
            raise InvalidOptionError(f"Unrecognized io_type={self.io_type!r} for quantize={self.quantize!r}. "
                                     f"Supported types are: {list(allowed)}")


def export_tflite(model, path=None, *, representative_data: np.ndarray | None = None,
                  options: TFLiteOptions = TFLiteOptions(), **kwargs) -> bytes:
    """Convert a Keras model to a TFLite flatbuffer; write it atomically to `path` if given; return its bytes.

    kwargs are TFLiteOptions fields (quantize=..., io_type=..., ...). representative_data (float32, shaped like the
    model's input) calibrates int8 and 16x8 activations; a few hundred samples are plenty.
    """
    if kwargs:
        options = TFLiteOptions(**{**options.__dict__, **kwargs})
    if options.quantize in NEEDS_DATA and (representative_data is None or len(representative_data) == 0):
        raise InvalidOptionError(f"quantize={options.quantize!r} calibrates activations on representative data; "
                                 f"pass representative_data (CLI: --data) or use quantize='dynamic'")
    with captured_output():
        frozen = frozen_function(model, options.forms)
    converter = make_converter(frozen, representative_data, options)
    try:
        with captured_output() as log:
            flatbuffer = converter.convert()
    except Exception as error:  # the converter raises ConverterError, RuntimeError, ValueError ...
        raise _translate(error, log.text, model, frozen, options) from error
    if not options.allow_flex:  # a Flex model needs a Flex-enabled runtime, which plain LiteRT is not
        _require_loadable(flatbuffer, options)
    if path is not None:
        write_atomic(path, flatbuffer)
    return flatbuffer


def make_converter(frozen, representative_data, options: TFLiteOptions):
    import tensorflow as tf

    # The function is frozen (no variables), so an empty module is the whole trackable object the converter asks for.
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen], tf.Module())
    builtins = tf.lite.OpsSet.TFLITE_BUILTINS
    if options.quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if options.quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if options.quantize in NEEDS_DATA:
        samples = np.asarray(representative_data, dtype=np.float32)
        converter.representative_dataset = lambda: ([samples[i:i + 1]] for i in range(len(samples)))
        if options.quantize == "int8":
            builtins = tf.lite.OpsSet.TFLITE_BUILTINS_INT8
        else:
            builtins = tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        io_dtype = {"float32": tf.float32, "int8": tf.int8, "uint8": tf.uint8, "int16": tf.int16}[options.io_type]
        converter.inference_input_type = io_dtype
        converter.inference_output_type = io_dtype
    converter.target_spec.supported_ops = [builtins] + ([tf.lite.OpsSet.SELECT_TF_OPS] if options.allow_flex else [])
    if not options.per_channel:
        disable_per_channel(converter)
    return converter


def _require_loadable(flatbuffer: bytes, options: TFLiteOptions) -> None:
    """The converter can emit a model that LiteRT then refuses to prepare (e.g. 16x8 bias overflow): catch it here."""
    interpreter_class, _, runtime = tflite_interpreter_class()
    try:
        with captured_output():
            interpreter_class(model_content=flatbuffer).allocate_tensors()
    except (RuntimeError, ValueError) as error:
        first = first_line(error, 200)
        raise ExportError(f"The TFLite converter produced a quantize={options.quantize!r} model that {runtime} "
                          f"refuses to prepare ({first}); try another --quantize mode (e.g. int8)") from error


def _translate(error: Exception, log: str, model, frozen, options: TFLiteOptions) -> ExportError:
    text = f"{error}\n{log}"
    ops = sorted(set(re.findall(r"^\s*tf\.(\w+)\(", text, flags=re.MULTILINE))
                 | set(re.findall(r"'tf\.(\w+)' op is neither", text)))
    layers = layers_in_scopes((n.name for n in frozen.graph.as_graph_def().node if n.op in ops), model)
    where = f"ops {ops or ['?']} (layers {layers or ['?']})"
    if "ERROR_NEEDS_FLEX_OPS" in text or "Flex ops:" in text:
        return FlexOpsError(
            f"TFLite needs TensorFlow {where} that the built-in LiteRT runtime lacks, so a Raspberry Pi runtime could "
            f"not run the model; replace those layers, or pass --allow-flex (allow_flex=True) to embed them for a "
            f"Flex-enabled runtime")
    if "ERROR_NEEDS_CUSTOM_OPS" in text or "Custom ops:" in text:
        return ExportError(f"TFLite has no kernel for TensorFlow {where}, not even with Flex; replace those layers "
                           f"with ones TFLite supports")
    first = first_line(error)
    return ExportError(f"The TFLite converter failed for quantize={options.quantize!r} ({first}); run with --debug "
                       f"for the converter's log")
