"""Sweep the separation policy on the digits demo model: size, MACs and test accuracy before any fine-tuning.

The "+ refine" rows refit each separated layer by least squares on 300 training images (refinement.py).

usage: scripts/bench-separation [--out build/demo]   (trains the demo model first if it is not cached)
Prints a Markdown table for docs/benchmarks.md.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/demo"))
    args = parser.parse_args(argv)
    from tabulate import tabulate

    from sepconv.convert import separate

    from sepconv.convert.demo import digits as demo
    from sepconv.convert.recovery.refinement import refine

    model = demo.demo_model(args.out / "digits_tutorial.h5", verbose=2)
    split = demo.digits()
    baseline = demo.accuracy(model, split.x_test, split.y_test)
    rows = [["original", "", f"{model.count_params():,}", "1.00x", "", f"{baseline:.2%}"]]
    policies = [("rank", 1), ("rank", 2), ("rank", 4), ("rank", 6), ("rank", 8), ("rank", "full"),
                ("energy", 0.5), ("energy", 0.8), ("energy", 0.9), ("energy", 0.95)]
    for key, value in policies:
        new, report = separate(model, **{key: value})
        totals = report.totals
        ks = sorted({row.rank for row in report.separated})
        rows.append([f"{key}={value}", f"{totals['separated']}/{totals['layers']} (K={ks or '-'})",
                     f"{new.count_params():,}", f"{totals['params_ratio']:.2f}x",
                     f"{totals['macs_before'] / max(1, totals['macs_after']):.2f}x",
                     f"{demo.accuracy(new, split.x_test, split.y_test):.2%}"])
    for rank in (1, 2, 4):
        new, report = separate(model, rank=rank)
        refine(model, new, split.x_train[:300], report)
        totals = report.totals
        rows.append([f"rank={rank} + refine", f"{totals['separated']}/{totals['layers']} (K=[{rank}])",
                     f"{new.count_params():,}", f"{totals['params_ratio']:.2f}x",
                     f"{totals['macs_before'] / max(1, totals['macs_after']):.2f}x",
                     f"{demo.accuracy(new, split.x_test, split.y_test):.2%}"])
    headers = ["policy", "separated", "parameters", "smaller", "fewer conv MACs", "test accuracy (no fine-tuning)"]
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
