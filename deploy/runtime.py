"""One interface over LiteRT (.tflite) and ONNX Runtime (.onnx): float arrays in, float arrays out.

Quantized input and output tensors are converted with their scale and zero point, so callers compare artifacts with
the Keras model on the same float inputs whatever the artifact's tensor types are.
"""

from __future__ import annotations

import collections
import functools
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sepconv.deploy.errors import ArtifactError, InvalidOptionError, RuntimeMissingError
from sepconv.deploy.files import first_line
from sepconv.deploy.quiet import captured_output

TFLITE_SUFFIX = ".tflite"
ONNX_SUFFIX = ".onnx"


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: shape uses -1 for a dynamic dimension; scale/zero_point only for quantized tensors."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "scale": self.scale,
                "zero_point": self.zero_point}

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float values to this tensor's dtype (rounded and clipped when it is quantized)."""
        dtype = np.dtype(self.dtype)
        if self.scale is None or not np.issubdtype(dtype, np.integer):
            return x.astype(dtype)
        info = np.iinfo(dtype)
        return np.clip(np.round(x / self.scale + self.zero_point), info.min, info.max).astype(dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        if self.scale is None or not np.issubdtype(q.dtype, np.integer):
            return q.astype(np.float32)
        return ((q.astype(np.float32) - self.zero_point) * self.scale).astype(np.float32)


class Runtime:
    """An opened artifact. `run` takes and returns float arrays with a leading batch dimension."""

    format: str
    runtime_name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def prepare(self, inputs: list[np.ndarray]):
        """A zero-argument function that runs one inference on `inputs` (converted to the tensors' types once, here):
        what a benchmark times, with nothing else in the loop."""
        raise NotImplementedError

    def op_histogram(self) -> dict[str, int]:
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        raise NotImplementedError

    def settings(self) -> dict[str, str]:
        """Settings of the runtime that change its numbers (recorded in the manifest beside the verification)."""
        return {}


def _require_file(path: Path) -> None:
    if not path.exists():
        raise ArtifactError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise ArtifactError(f"{path}: is a directory; pass a .tflite or .onnx file")
    if path.stat().st_size == 0:
        raise ArtifactError(f"{path}: the file is empty (0 bytes); export it again")


def tflite_interpreter_class():
    """(Interpreter class, OpResolverType enum, distribution): LiteRT's, else tflite_runtime's, else TensorFlow's
    (only if TensorFlow happens to be installed)."""
    import importlib
    import importlib.util

    for module, distribution in (("ai_edge_litert.interpreter", "ai-edge-litert"),
                                 ("tflite_runtime.interpreter", "tflite-runtime")):
        try:
            found = importlib.import_module(module)
            return found.Interpreter, getattr(found, "OpResolverType", None), distribution
        except ImportError:
            pass
    if importlib.util.find_spec("tensorflow") is not None:  # only where it happens to be installed already
        lite = importlib.import_module("tensorflow").lite
        return lite.Interpreter, getattr(lite.experimental, "OpResolverType", None), "tensorflow"
    raise RuntimeMissingError("Running .tflite files needs LiteRT, which is not installed: pip install "
                              "'sepconv[edge]' (or pip install ai-edge-litert)")


class LiteRTRuntime(Runtime):
    format = "tflite"

    def __init__(self, path: Path, *, threads: int | None = None, xnnpack: bool = True):
        interpreter_class, resolvers, self.runtime_name = tflite_interpreter_class()
        options = {}
        if not xnnpack:  # the built-in kernels alone, without the default XNNPACK delegate
            if resolvers is None:
                raise InvalidOptionError(f"{self.runtime_name} cannot turn XNNPACK off; install ai-edge-litert")
            options["experimental_op_resolver_type"] = resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.xnnpack = xnnpack
        try:
            with captured_output():  # LiteRT announces its XNNPACK delegate on stderr
                self._interpreter = interpreter_class(model_path=str(path), num_threads=threads, **options)
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise ArtifactError(f"{path}: LiteRT cannot load it ({first_line(error, 200)}); the "
                                f"file is damaged or not a TFLite model: export it again") from error
        self._input_details = self._interpreter.get_input_details()
        self._output_order = _signature_output_order(self._interpreter)
        self._output_details = self._ordered_outputs()
        self.inputs = tuple(tflite_spec(d) for d in self._input_details)
        self.outputs = tuple(tflite_spec(d) for d in self._output_details)
        self._batch = None

    def _ordered_outputs(self) -> list[dict]:
        details = self._interpreter.get_output_details()
        if self._output_order is None:
            return details
        by_index = {detail["index"]: detail for detail in details}
        return [by_index[index] for index in self._output_order]

    def _resize(self, batch: int) -> bool:
        """Resize every input to `batch` rows if the model allows it; False when the batch dimension is fixed."""
        if batch == self._batch:
            return True
        for detail in self._input_details:
            if detail["shape_signature"][0] != -1 and detail["shape"][0] != batch:
                return False
        for detail in self._input_details:
            self._interpreter.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
        with captured_output():
            self._interpreter.allocate_tensors()
        self._output_details = self._ordered_outputs()
        self._batch = batch
        return True

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        batch = len(inputs[0])
        if not self._resize(batch):  # a fixed batch of 1: run sample by sample
            self._resize(1)
            rows = [self.run([x[i:i + 1] for x in inputs]) for i in range(batch)]
            return [np.concatenate([row[k] for row in rows]) for k in range(len(self.outputs))]
        for spec, detail, x in zip(self.inputs, self._input_details, inputs):
            self._interpreter.set_tensor(detail["index"], spec.quantize(np.asarray(x)))
        self._interpreter.invoke()
        return [spec.dequantize(self._interpreter.get_tensor(detail["index"]))
                for spec, detail in zip(self.outputs, self._output_details)]

    def prepare(self, inputs: list[np.ndarray]):
        if not self._resize(len(inputs[0])):
            raise InvalidOptionError(f"this model takes a fixed batch of {self._input_details[0]['shape'][0]}; "
                                     f"use batch {self._input_details[0]['shape'][0]}")
        feeds = [(detail["index"], spec.quantize(np.asarray(x)))
                 for spec, detail, x in zip(self.inputs, self._input_details, inputs)]
        interpreter = self._interpreter

        def invoke():
            for index, value in feeds:
                interpreter.set_tensor(index, value)
            interpreter.invoke()

        return invoke

    def op_histogram(self) -> dict[str, int]:
        ops = self._interpreter._get_ops_details()
        return dict(collections.Counter(op["op_name"] for op in ops if op["op_name"] != "DELEGATE"))

    def versions(self) -> dict[str, str]:
        return {self.runtime_name: package_version(self.runtime_name) or "unknown"}


def _signature_output_order(interpreter) -> list[int] | None:
    """The output tensors' indices in the order of the model's outputs, or None to keep the interpreter's. LiteRT
    lists a model's output tensors in its own order (a two-headed Keras model's second head can come first); the
    model's signature names them output_0, output_1, ... in the Keras model's order."""
    try:
        runner = interpreter.get_signature_runner()
        named = runner.get_output_details()
    except (ValueError, RuntimeError, KeyError):  # no signature (or several): the interpreter's order is all there is
        return None
    if len(named) != len(interpreter.get_output_details()) or not all(
            re.fullmatch(r"output_\d+", name) for name in named):
        return None
    return [named[name]["index"] for name in sorted(named, key=lambda name: int(name.split("_")[1]))]


def tflite_spec(detail: dict) -> TensorSpec:
    """The TensorSpec of a LiteRT interpreter's tensor detail (per-tensor scale and zero point when quantized)."""
    scale, zero_point = detail["quantization"]
    quantized = np.issubdtype(detail["dtype"], np.integer) and scale != 0.0
    return TensorSpec(name=detail["name"], shape=tuple(int(d) for d in detail["shape_signature"]),
                      dtype=np.dtype(detail["dtype"]).name, scale=float(scale) if quantized else None,
                      zero_point=int(zero_point) if quantized else None)


class OnnxRuntime(Runtime):
    format = "onnx"
    runtime_name = "onnxruntime"

    def __init__(self, path: Path, *, threads: int | None = None, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 profile_prefix: str | None = None):
        onnxruntime = _onnxruntime()
        available = onnxruntime.get_available_providers()
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise InvalidOptionError(f"Unrecognized ONNX Runtime providers {unknown}. This installation has: "
                                     f"{available}")
        self._settings = {X64_QUANT_PRECISION: "1"} if int8_kernels_saturate() else {}
        try:
            self._session = _onnx_session(onnxruntime, path, threads, providers, self._settings, profile_prefix)
        except ArtifactError:
            if not self._settings:
                raise
            # ONNX Runtime 1.32 cannot give u8 weights to a weight that feeds several ops (a shared Keras layer):
            # "Attempt to replace the existing tensor". Its default kernels then, and the settings say so.
            self._settings = {X64_QUANT_PRECISION: "0"}
            self._session = _onnx_session(onnxruntime, path, threads, providers, {}, profile_prefix)
        self.inputs = tuple(_onnx_spec(i) for i in self._session.get_inputs())
        self.outputs = tuple(_onnx_spec(o) for o in self._session.get_outputs())
        self._path = path

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        feeds = {spec.name: spec.quantize(np.asarray(x)) for spec, x in zip(self.inputs, inputs)}
        return [np.asarray(y, dtype=np.float32) for y in self._session.run(None, feeds)]

    def end_profiling(self) -> str:
        """The profiler's JSON trace file (opened with profile_prefix), written now."""
        return self._session.end_profiling()

    def prepare(self, inputs: list[np.ndarray]):
        fixed = self.inputs[0].shape[0]
        if fixed not in (-1, len(inputs[0])):
            raise InvalidOptionError(f"this model takes a fixed batch of {fixed}; use batch {fixed}")
        feeds = {spec.name: spec.quantize(np.asarray(x)) for spec, x in zip(self.inputs, inputs)}
        session = self._session
        return lambda: session.run(None, feeds)

    def op_histogram(self) -> dict[str, int]:
        import onnx

        graph = onnx.load(str(self._path), load_external_data=False).graph
        return dict(collections.Counter(node.op_type for node in graph.node))

    def versions(self) -> dict[str, str]:
        return {"onnxruntime": package_version("onnxruntime") or "unknown"}

    def settings(self) -> dict[str, str]:
        return dict(self._settings)


# ONNX Runtime's x86 int8 kernels (MLAS) run a QDQ model as u8 activations x s8 weights. Without VNNI they multiply
# with vpmaddubsw, which adds each pair of products into 16 bits and saturates (2 * 255 * 127 = 64,770 > 32,767):
# on AVX2 and AVX-512 CPUs without VNNI an int8 artifact then computes something else than its graph says (measured:
# the equalized separable layer of tests/test_equalization.py, 98% top-1 agreement as the graph defines it, 89% as
# computed). This session entry makes ONNX Runtime store s8 weights as u8 (w + 128, zero point moved with them) and
# use its U8U8 kernels, which do not saturate: exact, as on ARM and on VNNI CPUs, at some speed. ONNX Runtime honours
# it on x86 only; it is set only where VNNI is missing, so VNNI CPUs keep their faster exact kernels.
X64_QUANT_PRECISION = "session.x64quantprecision"
_X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")


def saturating_cpu(machine: str, cpuinfo: str | None) -> bool:
    """Whether ONNX Runtime's default int8 kernels can saturate on a CPU: x86 without avx512_vnni or avx_vnni in
    its flags (`cpuinfo`: /proc/cpuinfo's text; None where there is none, as on macOS and Windows: assumed to)."""
    if machine.lower() not in _X86_MACHINES:
        return False
    return cpuinfo is None or not re.search(r"\b(avx512_vnni|avx_vnni)\b", cpuinfo)


@functools.cache
def int8_kernels_saturate() -> bool:
    """saturating_cpu for this machine."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = None
    return saturating_cpu(platform.machine(), cpuinfo)


def _onnx_session(onnxruntime, path: Path, threads: int | None, providers, entries: dict[str, str],
                  profile_prefix: str | None = None):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    for key, value in entries.items():
        options.add_session_config_entry(key, value)
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=list(providers))
    except Exception as error:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({first_line(error, 200)}); "
                            f"the file is damaged or not an ONNX model: export it again") from error


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise RuntimeMissingError("Running .onnx files needs ONNX Runtime, which is not installed: pip install "
                                  "'sepconv[edge]' (or pip install onnxruntime)") from error
    return onnxruntime


_ONNX_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8",
                "tensor(uint8)": "uint8", "tensor(int32)": "int32", "tensor(int64)": "int64"}


def _onnx_spec(node) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in node.shape)
    return TensorSpec(name=node.name, shape=shape, dtype=_ONNX_DTYPES.get(node.type, node.type))


def package_version(distribution: str) -> str | None:
    """The installed version of a distribution, or None if it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def import_runtime(path) -> None:
    """Import the runtime library an artifact needs, without opening it (a missing runtime raises
    RuntimeMissingError; an unknown extension does nothing here). A benchmark calls this before it times a load, so
    that the first model's load time and memory growth are the model's, not the library's import."""
    suffix = Path(path).suffix.lower()
    if suffix == TFLITE_SUFFIX:
        with captured_output():
            tflite_interpreter_class()
    elif suffix == ONNX_SUFFIX:
        _onnxruntime()


def open_runtime(path, *, threads: int | None = None, xnnpack: bool = True,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Runtime:
    """Open a .tflite (LiteRT; XNNPACK on unless xnnpack=False) or .onnx (ONNX Runtime with `providers`) artifact."""
    path = Path(path)
    _require_file(path)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InvalidOptionError(f"Unrecognized threads={threads!r}. Use a whole number >= 1")
    suffix = path.suffix.lower()
    if suffix == TFLITE_SUFFIX:
        return LiteRTRuntime(path, threads=threads, xnnpack=xnnpack)
    if suffix == ONNX_SUFFIX:
        return OnnxRuntime(path, threads=threads, providers=tuple(providers))
    raise ArtifactError(f"{path}: unrecognized artifact extension {suffix!r}; sepconv runs .tflite and .onnx files")
