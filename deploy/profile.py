"""Where an artifact's time goes: per-op time from each runtime, grouped by the Keras layer that made the op.

ONNX Runtime: its own profiler (SessionOptions.enable_profiling), the session opened as bench-model opens it (threads,
providers, int8 settings): every node's kernel time over `runs` runs after a warm-up, averaged; its MACs from the
shapes the profiler records. What the nodes do not account for (Run()'s own cost: feeding, fetching, scheduling) is
the `overhead` row. The profiler slows what it times (a record per node per run: the digits demo's int8 nodes sum to
0.41 ms profiled against a p50 of 0.25 ms unprofiled).

LiteRT: the Python package has no op profiler (no `--enable_op_profiling`, no `benchmark_model` in any wheel), so
the profile is measured by prefix truncation: the model cut after op 0, after op 1, ... (same weights; the
subgraph's operators truncated, its output set to the last op's output) and every prefix, with the empty one (an
invoke() of nothing: the fixed cost, the `overhead` row), timed in ONE interleaved run of bench-model's harness at the
case's threads and XNNPACK setting, one run of each prefix per round; an op is charged the 10th percentile
(PREFIX_QUANTILE) of the prefix that ends with it less that of the one before (clipped at 0: two prefixes within
noise). Why not the p50 in rounds of 0.05 s, as bench-model times: another job's burst (50-400 ms) then slows a few
prefixes' rounds and not the others', and the op that ends a slowed prefix is charged the burst; the p50 of a
mixture of slowed and quiet runs moves with the mix. Measured on a 0.1 ms int8 CNN whose time is its convolutions
(tests/test_profile.py's, Intel Xeon, shared, with 0, 1 or 2 bursty busy-looping jobs beside it): with the p50 in
0.05 s rounds, a non-convolution op (the Flatten, the final FullyConnected or Dequantize) was charged the most time
in 11 of 124 profiles and the non-convolution ops' share reached 0.51; with one run per round and the 10th
percentile, in none of 100 (their share 0.10-0.11 on average, at most 0.39 once: a Dequantize charged 18%).
A prefix re-partitions XNNPACK's delegate, so an op's time includes the cost of a partition boundary where one
appears. Its MACs from the tensors' shapes. Dozens of models run in turn evict each other's weights from the caches,
so the full prefix runs slower than the model timed alone (a 0.05 ms model: 0.068 ms, measured with the p50 in 0.05 s
rounds); the shares are what the prefixes measure.

Both methods' times are therefore shares of the case's p50, measured unprofiled by bench-model: each row is that p50
split by them (`scale` = p50 / the profiled total; `raw_total_ms` keeps the profiled total, a check that the profile
timed the same model).

Layers: TensorFlow names an op after the Keras layers it came from (`model/block1_conv1_1/Relu;...`, the `_1` a
scope suffix): the op is charged to the first scope segment under the model's own that names a layer the manifest
lists (its separation rows, nested paths included), else to that segment without its `_N` suffix, else to the op's
name. Keras layers that were fused into another op (BatchNorm into its convolution) have no time of their own.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sepconv.deploy.errors import InvalidOptionError
from sepconv.deploy.runtime import OnnxRuntime

OVERHEAD = "(runtime overhead)"
PREFIX_QUANTILE = 10  # the percentile of each prefix's timed runs that charges its last op (module doc)
_SUFFIX = re.compile(r"_\d+$")


@dataclass(frozen=True)
class OpTime:
    index: int
    name: str  # the op's output tensor (LiteRT) or node (ONNX Runtime) name
    op: str  # its type
    layer: str  # the Keras layer it is charged to (module doc)
    ms: float
    macs: int  # multiply-accumulates per inference (convolutions and dense layers; 0 for the others)


@dataclass(frozen=True)
class LayerTime:
    layer: str
    ms: float
    share: float  # of the profile's total
    macs: int
    mac_share: float | None  # of the model's MACs (None when no op has any)
    ops: int


@dataclass(frozen=True)
class Profile:
    method: str  # "ort-profiler" or "prefix-truncation"
    total_ms: float  # the ops and the overhead together
    overhead_ms: float
    raw_total_ms: float  # as the profile measured it (slowed by the profiler's records or the prefixes' turns)
    scale: float  # total_ms / raw_total_ms: the case's p50 / the profiled total (1 without a p50 to split)
    ops: tuple[OpTime, ...]
    layers: tuple[LayerTime, ...]  # by time, largest first; the overhead last
    op_types: tuple[LayerTime, ...]  # the same per op type (its `layer` the type: CONV_2D, DepthwiseConv, ...)
    runs: int

    def to_dict(self) -> dict:
        return asdict(self)


def profile_case(path: Path, threads: int, inputs: list[np.ndarray], time_models, *, measured_ms: float | None = None,
                 providers=("CPUExecutionProvider",), layer_names=(), runs: int = 100) -> Profile:
    """The profile of one artifact at one thread count (module doc); `inputs` as bench-model feeds them;
    time_models(paths) -> (PREFIX_QUANTILE ms of each, timed runs of the least timed): one interleaved run of the
    caller's harness at the case's settings (the prefixes of a .tflite); measured_ms: the case's p50 unprofiled,
    which the profile's shares split (None: the profiled times as they are); `layer_names`: Keras layer paths (the
    manifest's) that ops are charged to where their names say so."""
    path = Path(path)
    if path.suffix == ".onnx":
        ops, overhead, runs = _onnx_ops(path, threads, inputs, providers, runs)
        method = "ort-profiler"
    elif path.suffix == ".tflite":
        ops, overhead, runs = _tflite_ops(path, time_models)
        method = "prefix-truncation"
    else:
        raise InvalidOptionError(f"{path}: no profiler for {path.suffix or 'this kind of'} file; profile a .tflite "
                                 f"or .onnx artifact")
    raw = sum(op.ms for op in ops) + overhead
    scale = measured_ms / raw if measured_ms and raw > 0 else 1.0
    known = _layer_index(layer_names)
    ops = tuple(OpTime(op.index, op.name, op.op, _layer_of(op.name, known), round(op.ms * scale, 6), op.macs)
                for op in ops)
    overhead *= scale
    return Profile(method=method, total_ms=round(sum(op.ms for op in ops) + overhead, 6),
                   overhead_ms=round(overhead, 6), raw_total_ms=round(raw, 6), scale=round(scale, 4), ops=ops,
                   layers=_layers(ops, overhead, lambda op: op.layer),
                   op_types=_layers(ops, overhead, lambda op: op.op), runs=runs)


def _layers(ops, overhead: float, key) -> tuple[LayerTime, ...]:
    """The ops grouped by key(op), largest time first, and the overhead row last."""
    total = sum(op.ms for op in ops) + overhead
    all_macs = sum(op.macs for op in ops)
    grouped: dict[str, list] = {}
    for op in ops:
        grouped.setdefault(key(op), []).append(op)
    rows = [LayerTime(layer, round(sum(o.ms for o in found), 6), _share(sum(o.ms for o in found), total),
                      sum(o.macs for o in found), _share(sum(o.macs for o in found), all_macs) if all_macs else None,
                      len(found)) for layer, found in grouped.items()]
    rows.sort(key=lambda row: -row.ms)
    return tuple(rows) + (LayerTime(OVERHEAD, round(overhead, 6), _share(overhead, total), 0,
                                    0.0 if all_macs else None, 0),)


def _share(part: float, whole: float) -> float:
    return round(part / whole, 4) if whole > 0 else 0.0


def _layer_index(paths) -> dict:
    """{name as TensorFlow scopes it: the layer's path} for every path and every suffix of it."""
    index = {}
    for path in paths or ():
        parts = path.split("/")
        for start in range(len(parts)):
            index.setdefault("/".join(parts[start:]), path)
    return index


def _layer_of(name: str, known: dict) -> str:
    scopes = [_SUFFIX.sub("", part) for part in name.split(";")[0].split("/")]
    if len(scopes) < 2:
        return name.split(";")[0]
    for start in range(1, len(scopes)):  # the longest run of scopes under the model's that names a known layer
        for end in range(len(scopes), start, -1):
            found = known.get("/".join(scopes[start:end]))
            if found:
                return found
    return scopes[1]


# ------------------------------------------------------------------------------------------------- ONNX Runtime

def _onnx_ops(path: Path, threads: int, inputs, providers, runs: int):
    with tempfile.TemporaryDirectory(prefix="sepconv-profile-") as folder:
        runtime = OnnxRuntime(path, threads=threads, providers=tuple(providers),
                              profile_prefix=str(Path(folder) / "ort"))
        invoke = runtime.prepare(inputs)
        for _ in range(10):  # warm-up, profiled too: dropped below by run
            invoke()
        began = time.perf_counter()
        for _ in range(runs):
            invoke()
        wall_ms = (time.perf_counter() - began) * 1000 / runs
        events = json.loads(Path(runtime.end_profiling()).read_text())
    nodes = [event for event in events if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")]
    per_run: dict[str, list] = {}
    for event in nodes:
        per_run.setdefault(event["name"][:-len("_kernel_time")], []).append(event)
    ops = []
    for index, (name, found) in enumerate(per_run.items()):
        timed = found[-runs:]  # the last `runs` calls: the warm-up's are the first ones
        args = found[-1].get("args", {})
        ops.append(OpTime(index, name, args.get("op_name", "?"), "", round(sum(e["dur"] for e in timed) / 1000
                                                                          / max(1, len(timed)), 6),
                          _onnx_macs(args)))
    overhead = max(0.0, wall_ms - sum(op.ms for op in ops))
    return ops, overhead, runs


def _onnx_macs(args: dict) -> int:
    op = args.get("op_name", "")
    shapes = [list(item.values())[0] for item in args.get("input_type_shape", [])]
    outputs = [list(item.values())[0] for item in args.get("output_type_shape", [])]
    if not outputs or not shapes:
        return 0
    out = int(np.prod(outputs[0]))
    if op in ("Conv", "ConvInteger", "QLinearConv", "FusedConv", "NhwcFusedConv", "QLinearConvInteger"):
        weight = shapes[3] if op == "QLinearConv" and len(shapes) > 3 else shapes[1] if len(shapes) > 1 else None
        return out * int(np.prod(weight[1:])) if weight else 0  # weights (M, C / group, kh, kw)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm", "QGemm", "FusedMatMul", "FusedGemm"):
        left = shapes[0]
        return out * int(left[-1]) if left else 0
    return 0


# ------------------------------------------------------------------------------------------------------ LiteRT

def _tflite_ops(path: Path, time_models):
    details = _tflite_details(path)
    with tempfile.TemporaryDirectory(prefix="sepconv-profile-") as folder:
        p50, runs = time_models(_prefixes(path, Path(folder)))
    ops = [OpTime(op["index"], op["name"], op["op"], "", round(max(0.0, after - before), 6), op["macs"])
           for op, before, after in zip(details, p50, p50[1:])]
    # the full model's p50 less the clipped ops: what the empty prefix and the partition edges cost
    return ops, max(0.0, p50[-1] - sum(op.ms for op in ops)), runs


def _prefixes(path: Path, folder: Path) -> list[Path]:
    """The empty prefix and every prefix of the main subgraph, as .tflite files in `folder`."""
    from ai_edge_litert.tools import flatbuffer_utils

    original = flatbuffer_utils.read_model(str(path))
    operators = original.subgraphs[0].operators
    written = []
    for last in range(-1, len(operators)):
        cut = copy.deepcopy(original)
        graph = cut.subgraphs[0]
        graph.operators = operators[:last + 1]
        graph.outputs = list(operators[last].outputs) if last >= 0 else list(graph.inputs)
        cut.signatureDefs = []  # the signature names the original outputs; a prefix has its own
        written.append(folder / f"prefix{last + 1:04d}.tflite")
        flatbuffer_utils.write_model(cut, str(written[-1]))
    return written


def _tflite_details(path: Path) -> list[dict]:
    """Each op of the main subgraph: index, output tensor name, type and multiply-accumulates."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(path),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = []
    for op in interpreter._get_ops_details():
        shapes = [tuple(int(d) for d in tensors[i]["shape"]) for i in op["inputs"] if i >= 0]
        output = tensors[op["outputs"][0]]
        out = tuple(int(d) for d in output["shape"])
        ops.append({"index": op["index"], "name": output["name"], "op": op["op_name"],
                    "macs": _tflite_macs(op["op_name"], shapes, out)})
    return ops


def _tflite_macs(name: str, shapes: list[tuple], out: tuple) -> int:
    elements = int(np.prod(out)) if out else 0
    if name == "CONV_2D" and len(shapes) > 1:  # weights (cout, kh, kw, cin)
        return elements * int(np.prod(shapes[1][1:]))
    if name == "DEPTHWISE_CONV_2D" and len(shapes) > 1:  # weights (1, kh, kw, cin * multiplier)
        return elements * shapes[1][1] * shapes[1][2]
    if name == "FULLY_CONNECTED" and len(shapes) > 1:  # weights (units, inputs)
        return elements * shapes[1][1]
    return 0
