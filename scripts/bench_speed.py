"""The first speed table: the digits demo's original and separated (K = 1, refined) models, float32 and int8, as
TFLite and ONNX, at 1 and 2 threads, with sizes and test accuracy, measured by bench-model's harness in one
interleaved run; then the default run (`convert-model` with the demo's data and every default, int8 TFLite and ONNX)
as convert-model timed it against the original converted the same way (issue 23: p50s, speed-up with its interval,
MAC ratio, the latency table's predicted speed-up); then where time goes: bench-model --profile of the original and
the separated int8 models, ONNX and TFLite (per layer and per op type; sepconv.deploy.profile).

usage: scripts/bench-speed [--out build/speed] [--threads 1,2] [--min-time 2]   Prints Markdown for docs/benchmarks.md.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/speed"))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--min-time", type=float, default=2.0)
    args = parser.parse_args(argv)
    from sepconv.deploy.bench import benchmark

    artifacts, test = build(args.out)
    threads = tuple(int(t) for t in args.threads.split(","))
    report = benchmark(artifacts, threads=threads, inputs=str(test), min_seconds=args.min_time, min_runs=100,
                       progress=lambda message: print(f"  {message}", file=sys.stderr, flush=True))
    (args.out / "speed.json").write_text(report.to_json(indent=2))
    print(report.table(markdown=True))
    print()
    print(default_run_table(Path("build/demo/digits_tutorial.h5"), args.out))
    print()
    print(profile_tables([args.out / "original_int8.onnx", args.out / "separated_k1_int8.onnx",
                          args.out / "original_int8.tflite", args.out / "separated_k1_int8.tflite"], test))
    return 0


def default_run_table(model: Path, folder: Path) -> str:
    """convert-model with every default on the demo's split (int8 TFLite and ONNX), and the speed it measured for each
    artifact against the original converted the same way (its manifest's `speed`, bench-zoo's columns)."""
    import subprocess

    from tabulate import tabulate

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_zoo import best_speedup, speed_cells

    outputs = [folder / "default.tflite", folder / "default.onnx"]
    summary_path = folder / "default.summary.json"
    convert = Path(sys.executable).parent / "convert-model"
    subprocess.run([str(convert), str(model), *map(str, outputs), "--data", str(folder / "digits_train.npz"),
                    "--test-data", str(folder / "digits_test.npz"), "--overwrite", "--quiet", "--json",
                    str(summary_path)], check=True, stdout=subprocess.DEVNULL)  # its tables: not this Markdown's
    summary = json.loads(summary_path.read_text())
    totals = (summary.get("separation") or {}).get("totals", {})
    latency = ((summary.get("recovery") or {}).get("budget") or {}).get("latency")
    rows = []
    for artifact in summary["artifacts"]:
        row = {"exit": 0, "speed": artifact["speed"], "macs_before": totals.get("macs_before"),
               "macs_after": totals.get("macs_after"),
               "best_speedup": best_speedup(latency) if latency and artifact["format"] == latency["table"]["format"]
               else None}
        rows.append([Path(artifact["path"]).name, f"{artifact['format']} {artifact['quantize']}", *speed_cells(row)])
    return ("The default run (convert-model with every default, timed by convert-model itself, 1 thread):\n\n"
            + tabulate(rows, headers=["artifact", "format", "original p50 ms", "artifact p50 ms", "speed-up (95% CI)",
                                      "shipped", "MACs ratio", "table: plan / best at any accuracy",
                                      "measured / plan"], tablefmt="github", disable_numparse=True))


def build(folder: Path):
    """The eight artifacts (cached; demo.speed_artifacts, the ones scripts/demo's speed table uses)."""
    from sepconv.convert.demo import digits as demo

    model = Path("build/demo/digits_tutorial.h5")
    demo.demo_model(model, verbose=2)
    train, test = demo.save_split(demo.digits(), folder)
    return demo.speed_artifacts(model, folder, train, test), test


def profile_tables(paths, test) -> str:
    """bench-model --profile (sepconv.deploy.profile) of each artifact at 1 thread, on a test image: per layer and
    per op type, ONNX Runtime's profiler or a .tflite's prefixes."""
    from sepconv.deploy.bench import BenchOptions, benchmark, profile_table

    report = benchmark(paths, BenchOptions(min_seconds=1.0, inputs=str(test), profile=True),
                       progress=lambda message: print(f"  profile: {message}", file=sys.stderr, flush=True))
    return "\n\n".join(profile_table(case, markdown=True) for case in report.cases)


if __name__ == "__main__":
    sys.exit(main())
