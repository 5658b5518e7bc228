"""Where does a .tflite model spend its time? A per-op profile without a profiler binary, by prefix truncation.

The LiteRT Python package has no op profiler (its `litert-benchmark` has no `--enable_op_profiling`, and TFLite's
C++ `benchmark_model` is not shipped in any wheel). So: cut the model after op 0, after op 1, ... (same weights,
the subgraph's operators truncated and its output set to the last op's output), benchmark every prefix with
bench-model's harness in one interleaved run (same thread count, XNNPACK as in production), and charge each op the
difference between the p50 of the prefix that ends with it and the prefix before it. The "empty" prefix (no ops,
output = input) measures the fixed cost of one invoke() call. A prefix re-partitions XNNPACK's delegate, so a
marginal time includes the cost of a partition boundary where one appears; that is the point of measuring it.

usage: scripts/tflite_profile.py model.tflite [--threads 1] [--min-time 1]     Prints Markdown.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np


def prefix_models(model: Path, folder: Path) -> list[tuple[int, Path]]:
    """(last op index, path) for the empty prefix (-1) and every prefix of the model's main subgraph."""
    from ai_edge_litert.tools import flatbuffer_utils

    original = flatbuffer_utils.read_model(str(model))
    operators = original.subgraphs[0].operators
    prefixes = []
    for last in range(-1, len(operators)):
        cut = copy.deepcopy(original)
        graph = cut.subgraphs[0]
        graph.operators = operators[:last + 1]
        graph.outputs = list(operators[last].outputs) if last >= 0 else list(graph.inputs)
        cut.signatureDefs = []  # the signature names the original outputs; the prefix has its own
        path = folder / f"{model.stem}_prefix{last + 1:03d}.tflite"
        flatbuffer_utils.write_model(cut, str(path))
        prefixes.append((last, path))
    return prefixes


def op_table(model: Path) -> list[dict]:
    """Each op of the main subgraph: name, output shape and multiply-accumulates (convolutions and dense only)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(model),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = []
    for op in interpreter._get_ops_details():
        shapes = [tuple(int(d) for d in tensors[i]["shape"]) for i in op["inputs"] if i >= 0]
        out = tuple(int(d) for d in tensors[op["outputs"][0]]["shape"])
        ops.append({"index": op["index"], "op": op["op_name"], "out": out, "macs": _macs(op["op_name"], shapes, out)})
    return ops


def _macs(name: str, shapes: list[tuple], out: tuple) -> int:
    elements = int(np.prod(out)) if out else 0
    if name == "CONV_2D":  # weights (cout, kh, kw, cin)
        return elements * int(np.prod(shapes[1][1:]))
    if name == "DEPTHWISE_CONV_2D":  # weights (1, kh, kw, cin * multiplier)
        return elements * shapes[1][1] * shapes[1][2]
    if name == "FULLY_CONNECTED":  # weights (units, inputs)
        return elements * shapes[1][1]
    return 0


def profile(model: Path, threads: int = 1, min_seconds: float = 1.0, progress=None) -> dict:
    """Marginal p50 (microseconds) of every op, from one interleaved benchmark of all prefixes."""
    from sepconv.deploy import benchmark

    ops = op_table(model)
    with tempfile.TemporaryDirectory() as tmp:
        prefixes = prefix_models(model, Path(tmp))
        report = benchmark([path for _, path in prefixes], threads=(threads,), min_seconds=min_seconds,
                           min_runs=200, warmup_seconds=0.2, progress=progress)
    p50 = [case.latency_ms["p50"] * 1000 for case in report.cases]
    ci = [case.latency_ms["ci95_p50"] for case in report.cases]
    for op, before, after, interval in zip(ops, p50, p50[1:], ci[1:]):
        op["us"] = after - before
        op["cumulative_us"] = after
        op["ci95_cumulative_us"] = [v * 1000 for v in interval]
    return {"model": str(model), "threads": threads, "empty_invoke_us": p50[0], "total_us": p50[-1], "ops": ops,
            "context": report.context}


def markdown(result: dict) -> str:
    from tabulate import tabulate

    total = result["total_us"]
    rows = [["-", "invoke() of an empty model", "", "", f"{result['empty_invoke_us']:.1f}",
             f"{result['empty_invoke_us'] / total:.0%}", ""]]
    for op in result["ops"]:
        rate = f"{op['macs'] / op['us'] / 1000:.1f}" if op["macs"] and op["us"] > 0.5 else ""
        rows.append([op["index"], op["op"], "x".join(map(str, op["out"])), f"{op['macs'] / 1e6:.2f}" if op["macs"]
                     else "", f"{op['us']:.1f}", f"{op['us'] / total:.0%}", rate])
    by_type = {}
    for op in result["ops"]:
        by_type.setdefault(op["op"], [0.0, 0])
        by_type[op["op"]][0] += op["us"]
        by_type[op["op"]][1] += op["macs"]
    summary = [[name, f"{us:.1f}", f"{us / total:.0%}", f"{macs / 1e6:.2f}" if macs else "",
                f"{macs / us / 1000:.1f}" if macs and us > 0.5 else ""]
               for name, (us, macs) in sorted(by_type.items(), key=lambda item: -item[1][0])]
    head = (f"{Path(result['model']).name}, {result['threads']} thread(s), XNNPACK on: marginal p50 of each op "
            f"(prefix truncation), total p50 {total:.1f} us\n\n")
    return (head + tabulate(rows, headers=["#", "op", "output", "MMAC", "us", "share", "GMAC/s"], tablefmt="github",
                            disable_numparse=True) + "\n\nby op type:\n\n" +
            tabulate(summary, headers=["op type", "us", "share", "MMAC", "GMAC/s"], tablefmt="github",
                     disable_numparse=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=1.0)
    args = parser.parse_args(argv)
    result = profile(args.model, args.threads, args.min_time,
                     progress=lambda message: print(f"  {message}", file=sys.stderr, flush=True))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
