"""What turning TensorFlow's oneDNN kernels off costs convert-model (its default on x86, convert/supervise.py).

The zoo's tutorial network (no strided 1x1 convolution, so oneDNN does not crash on it) is converted with
`--rank 1 --epochs N --patience N --quantize int8` under TF_ENABLE_ONEDNN_OPTS=0 and =1, alternating (A B A B ...:
this machine is shared, so only ratios measured side by side mean anything). Reported: the fine-tuning seconds
(recovery.finetune.seconds), the export seconds and the whole command, median over rounds, and off/on ratios.

usage: scripts/bench-onednn [--rounds 2] [--epochs 3] [--out build/zoo]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_zoo import cpu  # noqa: E402


def main(argv=None) -> int:
    from sepconv.convert.demo import zoo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("build/zoo"))
    args = parser.parse_args(argv)
    entry = zoo.entry("tutorial", args.out)
    folder = args.out / "onednn"
    folder.mkdir(parents=True, exist_ok=True)
    runs = {"0": [], "1": []}
    for number in range(args.rounds):
        for setting in ("0", "1"):
            runs[setting].append(convert(entry, folder / f"{setting}_{number}.tflite", setting, args.epochs))
            print(f"round {number + 1} TF_ENABLE_ONEDNN_OPTS={setting}: {runs[setting][-1]}", flush=True)
    rows = []
    for key in ("finetune", "export", "command"):
        off, on = (statistics.median(r[key] for r in runs[s]) for s in ("0", "1"))
        rows.append([key, f"{off:.1f}", f"{on:.1f}", f"{off / on:.2f}x"])
    from tabulate import tabulate

    print(f"\n{cpu()}; median of {args.rounds} alternating rounds, seconds\n")
    print(tabulate(rows, headers=["stage", "oneDNN off (default)", "oneDNN on", "off / on"], tablefmt="github",
                   disable_numparse=True))
    (folder / "bench-onednn.json").write_text(json.dumps({"cpu": cpu(), "runs": runs}, indent=2))
    return 0


def convert(entry, target: Path, setting: str, epochs: int) -> dict:
    for leftover in (target, target.with_name(target.name + ".json")):
        leftover.unlink(missing_ok=True)
    started = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "convert-model"), str(entry.model), str(target), "--data",
                           str(entry.train), "--test-data", str(entry.test), "--rank", "1", "--epochs", str(epochs),
                           "--patience", str(epochs), "--json", "--quiet"], capture_output=True, text=True,
                          env=dict(os.environ, TF_ENABLE_ONEDNN_OPTS=setting))
    command = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"convert-model failed with TF_ENABLE_ONEDNN_OPTS={setting}: {done.stderr[-500:]}")
    result = json.loads(done.stdout)
    export = sum(v for k, v in result["seconds"].items() if k.startswith("export"))
    return {"finetune": result["recovery"]["finetune"]["seconds"], "export": round(export, 1),
            "command": round(command, 1)}


if __name__ == "__main__":
    raise SystemExit(main())
