"""The first speed table: the digits demo's original and separated (K = 1, refined) models, float32 and int8, as
TFLite and ONNX, at 1 and 2 threads, with sizes and test accuracy, measured by bench-model's harness in one
interleaved run; then the default run (`convert-model` with the demo's data and every default, int8 TFLite and ONNX)
as convert-model timed it against the original converted the same way (issue 23: p50s, speed-up with its interval,
MAC ratio, the latency table's predicted speed-up); then where time goes: a per-op profile of the separated int8
TFLite model (prefix truncation, scripts/tflite_profile.py: LiteRT ships no op profiler) and a per-op-type profile
(ONNX Runtime's profiler) of the separated int8 ONNX model against the original int8 one.

usage: scripts/bench-speed [--out build/speed] [--threads 1,2] [--min-time 2]   Prints Markdown for docs/benchmarks.md.
"""

import argparse
import collections
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
    print(profile_table([args.out / "original_int8.onnx", args.out / "separated_k1_int8.onnx"], test))
    print()
    print(tflite_profile_table(args.out / "separated_k1_int8.tflite", args.out / "profile_separated_k1_int8.json"))
    return 0


def tflite_profile_table(model: Path, save: Path) -> str:
    """Marginal p50 of every op of `model` at 1 thread, XNNPACK on (see scripts/tflite_profile.py)."""
    from tflite_profile import markdown, profile

    result = profile(model, threads=1, min_seconds=1.0,
                     progress=lambda message: print(f"  profile: {message}", file=sys.stderr, flush=True))
    save.write_text(json.dumps(result, indent=2))
    return markdown(result)


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


def profile_table(paths, test) -> str:
    """Per op type: share of the model's time in ONNX Runtime's profile (1 thread, 200 runs on test images)."""
    import numpy as np
    import onnxruntime
    from tabulate import tabulate

    x = np.load(test)["x"][:1].astype(np.float32)
    shares = {}
    for path in paths:
        options = onnxruntime.SessionOptions()
        options.enable_profiling = True
        options.intra_op_num_threads = 1
        options.profile_file_prefix = str(path.with_suffix(""))
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for _ in range(200):
            session.run(None, {name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
        total = collections.Counter()
        for event in events:
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                total[event["args"].get("op_name", "?")] += event["dur"]
        runs_us = sum(total.values()) / 200
        shares[path.name] = (runs_us, {op: us / 200 for op, us in total.items()})
    ops = sorted({op for _, per in shares.values() for op in per},
                 key=lambda op: -max(per.get(op, 0) for _, per in shares.values()))
    rows = [[op] + [f"{per.get(op, 0):.1f} ({per.get(op, 0) / total:.0%})" for total, per in shares.values()]
            for op in ops]
    rows.append(["total kernel time"] + [f"{total:.1f}" for total, _ in shares.values()])
    return ("ONNX Runtime profile, 1 thread, microseconds per inference by op type (share):\n\n" +
            tabulate(rows, headers=["op type", *shares], tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    sys.exit(main())
