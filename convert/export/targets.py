"""Export targets, registered by file extension: what `convert-model in.h5 out.EXT` makes of each output.

A target is one unit: its extension and format name, its options for convert-model (`TFLiteOutputOptions`,
`OnnxOutputOptions`, `KerasOutputOptions`: everything but the mode, which the run's --quantize sets for every output)
and its exporter's options (`TFLiteOptions`, `OnnxOptions`: those plus the mode), the --quantize modes it accepts
and what --quantize auto falls back to when int8 fails verification, how it exports and quantizes to int8, how its
artifact is verified (through a runtime, in which input layout) and what its manifest adds. The pipeline, the int8
repair (quantization.py), the manifest and the latency table ask the registry; none of them compares format names.
Supporting OpenVINO or Core ML is one new registered `Target` subclass (and its case in tests/test_targets.py, which
fails without it).

Importing this module does not import TensorFlow (the CLI reads the registry for its --help).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from sepconv.convert.errors import InvalidOptionError
from sepconv.convert.export.onnx import CALIBRATION_METHODS, ONNX_MODES, OnnxOptions, export_onnx
from sepconv.convert.export.quantization import diagnose_onnx, diagnose_tflite, onnx_int8, tflite_int8
from sepconv.convert.export.tflite import IO_TYPES, NEEDS_DATA, TFLITE_MODES, TFLiteOptions, export_tflite
from sepconv.convert.export.trace import input_names
from sepconv.convert.graph import batch_size_for
from sepconv.convert.keras_compat import keras_archive

# The output options take their defaults from the exporters' options (TFLiteOptions.io_type is its field's default).


@dataclass(frozen=True)
class TFLiteOutputOptions:
    """A .tflite output's options (TFLiteOptions without the mode): io_type of int8 (float32, int8, uint8) or int16x8
    (float32, int16) models, checked against the run's mode before any work; per_channel weight scales; allow_flex."""

    io_type: str = TFLiteOptions.io_type
    per_channel: bool = TFLiteOptions.per_channel
    allow_flex: bool = TFLiteOptions.allow_flex

    def __post_init__(self):
        types = io_types()
        if self.io_type not in types:
            raise InvalidOptionError(f"Unrecognized io_type={self.io_type!r}. Supported types are: {list(types)}")


def io_types() -> tuple[str, ...]:
    """Every TFLite input/output type, float32 first (--io-type's choices)."""
    return tuple(dict.fromkeys(("float32",) + tuple(t for types in IO_TYPES.values() for t in types)))


@dataclass(frozen=True)
class OnnxOutputOptions:
    """An .onnx output's options (OnnxOptions without the mode): opset (13..18), input layout (nhwc, nchw),
    per_channel weight scales of int8."""

    opset: int = OnnxOptions.opset
    layout: str = OnnxOptions.layout
    per_channel: bool = OnnxOptions.per_channel

    def __post_init__(self):
        OnnxOptions(opset=self.opset, layout=self.layout, per_channel=self.per_channel)  # the exporter's own checks


@dataclass(frozen=True)
class KerasOutputOptions:
    """A .keras output has no options: it is Keras' own save of the separated (and fine-tuned) model, in float."""


class Target:
    """One export target. Subclasses set the class attributes and implement `export`; a target verified through
    sepconv.deploy's runtimes (`runtime = True`) may implement `int8_tools` for the int8 repair."""

    name: ClassVar[str]  # the manifest's `format`
    extension: ClassVar[str]
    title: ClassVar[str]  # as messages name it
    options_class: ClassVar[type]  # its options in ConvertOptions.targets
    exporter_class: ClassVar[type | None] = None  # its exporter's options: options_class's fields and quantize
    modes: ClassVar[tuple[str, ...]]  # --quantize modes it exports
    auto_fallbacks: ClassVar[tuple[str, ...]] = ()  # tried in order when --quantize auto's int8 fails verification
    runtime: ClassVar[bool] = True  # verified (and benchmarked) through sepconv.deploy.runtime.open_runtime
    calibration_methods: ClassVar[tuple[str, ...]] = ("minmax",)  # what the int8 repair may try besides minmax

    def mode(self, quantize: str) -> str:
        """The mode this target exports for the run's --quantize mode."""
        return quantize

    def export_options(self, options, mode: str):
        """The exporter's options for `options` (an options_class instance) in `mode`."""
        return self.exporter_class(quantize=mode, **asdict(options))

    def check(self, options, quantize: str, path: Path) -> None:
        """Raise InvalidOptionError if this target cannot export `path` with `options` in the run's `quantize` mode."""
        mode = self.mode(quantize)
        if mode not in self.modes:
            raise InvalidOptionError(f"--quantize {quantize} is not available for {self.title} ({path}); supported "
                                     f"modes are: {list(self.modes)}")
        if self.exporter_class is not None:
            self.exporter_class(quantize=mode, **asdict(options))  # its checks of the options with the mode

    def layout(self, options) -> str:
        """The input layout its artifact takes (verification transposes Keras' NHWC inputs to it)."""
        return "nhwc"

    def export(self, model, path: Path, options, representative_data: np.ndarray | None) -> None:
        """Write `model` to `path` (a temporary file the pipeline renames at the end)."""
        raise NotImplementedError

    def int8_tools(self, model, models: Callable, options) -> tuple[Callable, Callable]:
        """(export(setting) -> bytes, diagnose(setting) -> Diagnosis) for quantization.export_int8 of `model`;
        `models(setting)` gives the Keras model a setting quantizes (the model, its equalized twin, its weights
        rounded)."""
        raise NotImplementedError(f"{self.title} has no int8 export")

    def manifest_extras(self, artifact: Path) -> dict:
        """Keys the manifest takes from the artifact itself (updating the manifest's defaults)."""
        return {}

    def describe(self, options) -> dict:
        """The options as the manifest's `options` lists them (flat, beside the other targets')."""
        return asdict(options)


_TARGETS: dict[str, Target] = {}


def register_target(cls: type[Target]) -> type[Target]:
    """Class decorator: register an instance of a Target subclass under its extension."""
    _TARGETS[cls.extension] = cls()
    return cls


def registered_targets() -> dict[str, Target]:
    """{extension: Target} in registration order."""
    return dict(_TARGETS)


def target_for(path) -> Target | None:
    """The target of an output path, by its extension (case-insensitive), or None."""
    return _TARGETS.get(Path(path).suffix.lower())


def target_named(name: str) -> Target:
    """The target whose format is `name` (e.g. 'tflite')."""
    for target in _TARGETS.values():
        if target.name == name:
            return target
    raise InvalidOptionError(f"Unrecognized format={name!r}. Supported formats are: "
                             f"{[t.name for t in _TARGETS.values()]}")


def target_of_exporter(options) -> Target | None:
    """The target whose exporter takes `options` (a TFLiteOptions, OnnxOptions ...), or None."""
    return next((t for t in _TARGETS.values() if t.exporter_class is not None
                 and isinstance(options, t.exporter_class)), None)


def quantize_modes() -> tuple[str, ...]:
    """Every mode some target exports, in registration order (--quantize's choices besides auto)."""
    return tuple(dict.fromkeys(mode for target in _TARGETS.values() for mode in target.modes))


def extensions_text() -> str:
    """'.tflite, .onnx or .keras'."""
    names = list(_TARGETS)
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


@register_target
class TFLite(Target):
    name, extension, title = "tflite", ".tflite", "TFLite"
    options_class, exporter_class = TFLiteOutputOptions, TFLiteOptions
    modes = TFLITE_MODES
    auto_fallbacks = ("dynamic", "float16")  # int8 weights with float activations, then float16 weights

    def export_options(self, options: TFLiteOutputOptions, mode: str) -> TFLiteOptions:
        # a fallback from int8 exports float activations: its inputs and outputs are float32 whatever --io-type said
        return TFLiteOptions(quantize=mode, io_type=options.io_type if mode in NEEDS_DATA else "float32",
                             per_channel=options.per_channel, allow_flex=options.allow_flex)

    def export(self, model, path: Path, options: TFLiteOptions, representative_data) -> None:
        Path(path).write_bytes(export_tflite(model, representative_data=representative_data, options=options))

    def int8_tools(self, model, models, options: TFLiteOptions):
        """The diagnosis of a setting already exported compares that artifact's tensors (not a second conversion)."""
        export = _Made(lambda setting: tflite_int8(models(setting), setting, options.io_type, options.forms))
        return export, lambda setting: diagnose_tflite(models(setting), setting, options.io_type, options.forms,
                                                       artifact=export.of(setting))


@register_target
class Onnx(Target):
    name, extension, title = "onnx", ".onnx", "ONNX"
    options_class, exporter_class = OnnxOutputOptions, OnnxOptions
    modes = ONNX_MODES
    # int8 weights with float activations, then float32 (ONNX Runtime's CPU kernels have no float16: TFLite's float16
    # fallback runs in float32 too); without it a model whose int8 and dynamic both fail wrote nothing at all
    auto_fallbacks = ("dynamic", "none")
    calibration_methods = CALIBRATION_METHODS

    def layout(self, options: OnnxOptions) -> str:
        return options.layout

    def export(self, model, path: Path, options: OnnxOptions, representative_data) -> None:
        Path(path).write_bytes(export_onnx(model, representative_data=representative_data, options=options))

    def int8_tools(self, model, models, options: OnnxOptions):
        """int8 quantizes the float ONNX export (made once per Keras model) with ONNX Runtime's QDQ quantizer; the
        diagnosis of a setting already quantized compares that artifact (not a second quantization)."""
        floats, name = {}, input_names(model)[0]

        def float_model(setting):
            key = (setting.equalized, setting.rounding)
            if key not in floats:
                floats[key] = export_onnx(models(setting), options=replace(options, quantize="none"))
            return floats[key]

        batch = batch_size_for(model)
        export = _Made(lambda setting: onnx_int8(float_model(setting), setting, name, options.layout, batch))
        return export, lambda setting: diagnose_onnx(float_model(setting), setting, name, options.layout,
                                                     models(setting), qdq=export.of(setting))

    def manifest_extras(self, artifact: Path) -> dict:
        import onnx

        model = onnx.load(str(artifact), load_external_data=False)
        return {"opset": next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")),
                              None)}


@register_target
class Keras(Target):
    name, extension, title = "keras", ".keras", "Keras"
    options_class = KerasOutputOptions
    modes = ("none",)
    runtime = False  # verified by loading it back in Keras

    def mode(self, quantize: str) -> str:
        return "none"  # a .keras file keeps the float model whatever --quantize says (the other outputs take it)

    def export_options(self, options: KerasOutputOptions, mode: str) -> KerasOutputOptions:
        return options

    def export(self, model, path: Path, options: KerasOutputOptions, representative_data) -> None:
        Path(path).write_bytes(keras_archive(model))  # a full disk fails here, in our write, leaving no Keras folder


def check_target_options(given: tuple) -> None:
    """ConvertOptions.targets: output options of registered targets, at most one per target."""
    allowed = [t.options_class.__name__ for t in _TARGETS.values()]
    if not isinstance(given, tuple):
        raise InvalidOptionError(f"Unrecognized targets={given!r}. Use a tuple of {allowed}, e.g. "
                                 f"(TFLiteOutputOptions(io_type='int8'), OnnxOutputOptions(opset=13))")
    seen = set()
    for options in given:
        target = next((t for t in _TARGETS.values() if isinstance(options, t.options_class)), None)
        if target is None:
            raise InvalidOptionError(f"Unrecognized targets entry {options!r}. Supported options are: {allowed}")
        if target.extension in seen:
            raise InvalidOptionError(f"targets holds two {type(options).__name__}; give one per target")
        seen.add(target.extension)


def given_options(given: tuple, target: Target):
    """The options of `target` among `given` (ConvertOptions.targets), else its defaults."""
    found = [o for o in given if isinstance(o, target.options_class)]
    return found[0] if found else target.options_class()


class _Made:
    """An int8 exporter that keeps what it made per setting while export_int8 runs, so that the diagnosis of a setting
    already exported reads its artifact instead of making it again."""

    def __init__(self, make: Callable):
        # id(setting) -> (setting, its artifact): the setting is kept alive, so no other object can take its id
        self._make, self._made = make, {}

    def __call__(self, setting) -> bytes:
        self._made[id(setting)] = (setting, self._make(setting))
        return self._made[id(setting)][1]

    def of(self, setting) -> bytes | None:
        return self._made.get(id(setting), (None, None))[1]
