"""Is bench-model's harness honest? Its p50 next to a bare `invoke()` loop and to `litert-benchmark`, same model,
same thread count, in one run; three alternating rounds, the median of each tool's p50 reported.

usage: scripts/bench-harness [model.tflite ...]   (default: the demo's float original and its K=1 int8 artifact,
                                                   converted into build/speed/ if missing)
The target: the harness within 5% of the bare loop. Prints a Markdown table for docs/benchmarks.md.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROUNDS = 3
RUNS = 2000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from tabulate import tabulate

    models = args.models or default_models()
    rows = []
    for model in models:
        runs = RUNS if model.stat().st_size < 1 << 20 else RUNS // 10
        results = {"harness": [], "bare invoke() loop": [], "litert-benchmark": []}
        for _ in range(ROUNDS):  # alternate, so that drift hits all three alike
            results["harness"].append(harness_p50(model, args.threads, runs))
            results["bare invoke() loop"].append(bare_p50(model, args.threads, runs))
            results["litert-benchmark"].append(litert_benchmark_p50(model, args.threads, runs))
        bare = float(np.median(results["bare invoke() loop"]))
        for tool, values in results.items():
            p50 = float(np.median(values))
            rows.append([model.name, tool, f"{p50:.4f}", f"{p50 / bare:.3f}", ", ".join(f"{v:.4f}" for v in values)])
        print(f"{model.name}: harness / bare = {float(np.median(results['harness'])) / bare:.3f}", flush=True)
    print(f"\n{ROUNDS} alternating rounds of {RUNS} runs (a tenth for models over 1 MiB) at {args.threads} thread(s); "
          f"p50 in ms; litert-benchmark reports its median to 0.01 ms\n")
    print(tabulate(rows, headers=["model", "tool", "p50 ms (median of rounds)", "ratio to bare loop", "per round"],
                   tablefmt="github", disable_numparse=True))
    return 0


def harness_p50(model: Path, threads: int, runs: int) -> float:
    from sepconv.deploy.bench import benchmark

    report = benchmark([model], threads=(threads,), warmup_runs=50, warmup_seconds=0.2, min_runs=runs,
                       min_seconds=0.0, max_seconds=600.0, block=runs)
    return report.cases[0].latency_ms["p50"]


def bare_p50(model: Path, threads: int, runs: int) -> float:
    """The least a Python caller can do: the interpreter's invoke(), nothing else, timed one by one."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model), num_threads=threads)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    data = np.random.default_rng(0).random(detail["shape"], dtype=np.float32)
    interpreter.set_tensor(detail["index"], data.astype(detail["dtype"]))
    invoke, clock = interpreter.invoke, time.perf_counter
    for _ in range(50):
        invoke()
    samples = np.empty(runs)
    for i in range(runs):
        began = clock()
        invoke()
        samples[i] = clock() - began
    return float(np.median(samples) * 1000)


def litert_benchmark_p50(model: Path, threads: int, runs: int) -> float:
    tool = Path(sys.executable).parent / "litert-benchmark"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([str(tool), "--model", str(model), "--num_runs", str(runs), "--warmup_runs", "50",
                        "--num_threads", str(threads), "--result_json", str(out)], check=True, capture_output=True)
        return float(json.loads(out.read_text())["latency"]["median_ms"])


def default_models() -> list[Path]:
    from sepconv.convert import convert_model
    from sepconv.convert.demo import digits as demo

    folder = Path("build/speed")
    folder.mkdir(parents=True, exist_ok=True)
    source = demo.demo_model(Path("build/demo/digits_tutorial.h5"), verbose=2)
    del source
    train, test = demo.save_split(demo.digits(), folder)
    wanted = {"original_fp32.tflite": dict(separate=False, quantize="none", data=str(train), test_data=str(test)),
              "separated_k1_int8.tflite": dict(rank=1, refine=True, epochs=0, quantize="int8", data=str(train),
                                               test_data=str(test))}
    for name, options in wanted.items():
        if not (folder / name).exists():
            convert_model(Path("build/demo/digits_tutorial.h5"), [folder / name], **options)
    return [folder / name for name in wanted]


if __name__ == "__main__":
    sys.exit(main())
