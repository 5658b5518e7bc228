"""The first speed table: the digits demo's original and separated (K = 1, refined) models, float32 and int8, as
TFLite and ONNX, at 1 and 2 threads, with sizes and test accuracy, measured by bench-model's harness in one
interleaved run; then a per-op-type profile (ONNX Runtime's profiler) of the separated int8 model against the
original int8 one, to show where time goes.

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
    from sepconv.deploy.cli import cases_table

    artifacts, test = build(args.out)
    threads = tuple(int(t) for t in args.threads.split(","))
    report = benchmark(artifacts, threads=threads, inputs=str(test), min_seconds=args.min_time, min_runs=100,
                       progress=lambda message: print(f"  {message}", file=sys.stderr, flush=True)).to_dict()
    (args.out / "speed.json").write_text(json.dumps(report, indent=2))
    print(cases_table(report, markdown=True))
    print()
    print(profile_table([args.out / "original_int8.onnx", args.out / "separated_k1_int8.onnx"], test))
    return 0


def build(folder: Path):
    """The eight artifacts (cached): original = --no-separate; separated = --rank 1 --refine (no fine-tuning)."""
    from sepconv.convert import convert_model, demo

    folder.mkdir(parents=True, exist_ok=True)
    model = Path("build/demo/digits_tutorial.h5")
    demo.demo_model(model, verbose=2)
    train, test = demo.save_split(demo.digits(), folder)
    paths = []
    for kind, separation in (("original", dict(separate=False)),
                             ("separated_k1", dict(rank=1, refine=True, epochs=0, recalibrate_bn=False))):
        for precision, quantize in (("fp32", "none"), ("int8", "int8")):
            targets = [folder / f"{kind}_{precision}.tflite", folder / f"{kind}_{precision}.onnx"]
            if not all(t.exists() for t in targets):
                convert_model(model, targets, quantize=quantize, data=str(train), test_data=str(test),
                              overwrite=True, **separation)
            paths += targets
    order = [p for fmt in (".tflite", ".onnx") for p in paths if p.suffix == fmt]
    return order, test


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
