"""Separate where it pays (issue 14): the latency-aware choice of K per layer against none separated and separated by
accuracy alone, at the same accuracy budget, timed side by side where the model runs.

On the digits demo model: each layer's sensitivity on validation digits (budget.plan_budget, refined candidates: the
accuracy budget's own measurement), then per quantization mode:
  1. the per-layer latency table (latency_table.measure_table: a single-layer model per layer and K, and the whole
     original, timed in one interleaved run here or on --where HOST, cached per device and runtime version);
  2. the plans: the original (none separated); "by accuracy alone" (budget.choose, the smallest model within the
     budget: what convert-model chose before); "all K=1" (every layer at K=1, whatever its drop); "latency-aware"
     (latency.choose_for_latency, no target) and, with --target-speedup, the least-loss plan that reaches it;
  3. every plan separated (SVD start, least-squares refinement on 200 training digits; no fine-tuning), exported in
     that mode, scored with LiteRT on the 450 test digits, and all of them timed in ONE interleaved run with the
     original, where the table was measured.
Reported per plan: conv MACs and their ratio to the original's, the table's plain sum, that sum scaled to the
original (the prediction before the table timed a second whole model), the prediction (latency_choice.WholeModel) and
the measured p50 with the prediction's error, the speed-up against the original, speed-up / MAC ratio, predicted drop
and test accuracy.

usage: scripts/bench-latency [--model build/zoo/NAME] [--quantize int8,none] [--max-drop 1.0] [--target-speedup X] [--where HOST
       --ssh-config FILE --wheels DIR] [--threads 1] [--min-time 2] [--out build/latency]   Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
NOISE = 0.03  # "never slower": within 3% of the faster of the two other plans (interleaved p50s on 2 shared cores)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/latency"))
    parser.add_argument("--model", type=Path, help="a bench-zoo folder (NAME/NAME.keras, train/validation/test.npz) "
                        "instead of the digits demo, e.g. build/zoo/resnet_bn")
    parser.add_argument("--quantize", default="int8,none", help="TFLite modes, comma-separated")
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--target-speedup", type=float)
    parser.add_argument("--where", help="an SSH host as deploy-model takes it (default: this machine)")
    parser.add_argument("--ssh-config")
    parser.add_argument("--wheels")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=2.0, help="timed seconds per whole-model artifact")
    parser.add_argument("--min-runs", type=int, default=100, help="timed runs per whole-model artifact, at least")
    parser.add_argument("--table-time", type=float, default=0.3, help="timed seconds per single-layer model")
    parser.add_argument("--cache", default=None, help="the latency cache folder (default: ~/.cache/sepconv/latency)")
    parser.add_argument("--table", action="store_true", help="print the Markdown of --out's last run again")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(json.loads((args.out / "latency.json").read_text())))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    say = lambda stage, message: print(f"  {stage}: {message}", file=sys.stderr, flush=True)  # noqa: E731
    model, data = model_and_data(args.model)
    plan = sensitivity(model, data, args.max_drop, say, args.out / "sensitivity.json")
    results = {"cpu": lscpu(), "where": args.where or "local", "max_drop": args.max_drop, "modes": {},
               "model": str(args.model or "digits demo")}
    for mode in args.quantize.split(","):
        results["modes"][mode] = run_mode(model, data, plan, mode, args, say)
    (args.out / "latency.json").write_text(json.dumps(results, indent=2, default=str))
    print(markdown(results))
    return 0


def model_and_data(folder: Path | None):
    """The digits demo model and split, or a bench-zoo folder's model (NAME/NAME.keras) and its train / validation /
    test .npz."""
    if folder is None:
        return demo_model_and_data()
    from sepconv.convert.loading import load

    model = load(folder / f"{folder.name}.keras")
    split = {name: np.load(folder / f"{name}.npz") for name in ("train", "validation", "test")}
    return model, {"x_train": split["train"]["x"], "x_val": split["validation"]["x"],
                   "y_val": split["validation"]["y"], "x_test": split["test"]["x"], "y_test": split["test"]["y"],
                   "x_calibration": split["train"]["x"][:200]}


def demo_model_and_data():
    from sepconv.convert.demo import digits as demo

    path = Path("build/demo/digits_tutorial.h5")
    model = demo.demo_model(path, verbose=2)
    split = demo.digits()
    validation = len(split.x_train) // 5  # as convert-model's --validation-fraction 0.2
    rng = np.random.default_rng(1)
    order = rng.permutation(len(split.x_train))
    train, val = order[validation:], order[:validation]
    return model, {"x_train": split.x_train[train], "x_val": split.x_train[val], "y_val": split.y_train[val],
                   "x_test": split.x_test, "y_test": split.y_test, "x_calibration": split.x_train[train][:200]}


def sensitivity(model, data, max_drop, say, saved: Path):
    """budget.plan_budget on the validation digits, kept in `saved` (the slow part: reused by the next run)."""
    from sepconv.convert.recovery.budget import BudgetOptions, BudgetPlan, Candidate, LayerSensitivity, plan_budget

    if saved.exists() and json.loads(saved.read_text())["max_drop"] == max_drop:
        found = json.loads(saved.read_text())
        layers = tuple(LayerSensitivity(layer["path"], layer["full_rank"], tuple(
            Candidate(**c) for c in layer["candidates"])) for layer in found["layers"])
        say("sensitivity", f"reused {saved}")
        return BudgetPlan(**dict(found, layers=layers))
    plan = plan_budget(model, data["x_val"], data["y_val"], data["x_calibration"], BudgetOptions(max_drop=max_drop),
                       progress=say)
    saved.write_text(json.dumps(plan.to_dict(), indent=1))
    return plan


def run_mode(model, data, plan, mode, args, say) -> dict:
    from sepconv.convert.recovery.budget import KEEP, choose
    from sepconv.convert.recovery.latency_choice import (LatencyTarget, LatencyTargetError, WholeModel,
                                                         choose_for_latency, predict_ms, rank_key)
    from sepconv.convert.recovery.latency_table import LatencyOptions, measure_table, whole_model
    from sepconv.convert.export.tflite import TFLiteOptions
    from sepconv.deploy.remote import DeployOptions
    from sepconv.deploy.ssh import SshOptions
    from sepconv.deploy.timing import TimingOptions, time_artifacts

    device = DeployOptions(wheels=args.wheels, ssh=SshOptions(config=args.ssh_config))
    options = LatencyOptions(where=args.where, export=TFLiteOptions(quantize=mode), cache_dir=args.cache,
                             timing=TimingOptions(threads=args.threads, min_seconds=args.table_time, deploy=device))
    table = measure_table(model, plan.layers, options, progress=say)
    fastest = choose_for_latency(plan.layers, table["layers"], plan.max_drop, original_ms=table["original_ms"],
                                 whole=whole_model(table))
    plans = {"none separated (original)": {},
             "by accuracy alone": choose(plan.layers, plan.max_drop)[0],
             "all K=1": {layer.path: 1 for layer in plan.layers},
             "latency-aware": fastest.ranks}
    unreachable = None
    if args.target_speedup:
        try:
            plans[f"latency-aware, target {args.target_speedup}x"] = choose_for_latency(
                plan.layers, table["layers"], plan.max_drop, original_ms=table["original_ms"],
                target=LatencyTarget(speedup=args.target_speedup), whole=whole_model(table)).ranks
        except LatencyTargetError as error:
            unreachable = str(error)
    folder = args.out / mode
    folder.mkdir(exist_ok=True)
    built = {name: build(model, ranks, plan, mode, folder / f"{index}.tflite", data, _forms(table, ranks))
             for index, (name, ranks) in enumerate(plans.items())}
    timing = time_artifacts([b["path"] for b in built.values()], args.where,
                            TimingOptions(threads=args.threads, min_seconds=args.min_time, min_runs=args.min_runs,
                                          deploy=device),
                            progress=lambda message: say("time", message))
    original_ms = timing.p50_ms[str(built["none separated (original)"]["path"])]
    rows = []
    for name, ranks in plans.items():
        item = built[name]
        measured = timing.p50_ms[str(item["path"])]
        predicted = predict_ms(table["layers"], ranks, table["original_ms"], whole_model(table))
        proportional = predict_ms(table["layers"], ranks, table["original_ms"])
        table_sum = sum(row[rank_key(ranks.get(path, KEEP))] for path, row in table["layers"].items())
        rows.append({"plan": name, "ranks": ranks, "macs": item["macs"], "measured_ms": measured,
                     "table_sum_ms": table_sum, "sum_error": (measured - table_sum) / measured,
                     "predicted_ms": predicted, "error": (measured - predicted) / measured,
                     "proportional_ms": proportional, "proportional_error": (measured - proportional) / measured,
                     "speedup": original_ms / measured,
                     "predicted_drop": sum(max(0.0, layer.candidate(ranks.get(layer.path, KEEP)).drop)
                                           for layer in plan.layers),
                     "accuracy": item["accuracy"]})
    macs = rows[0]["macs"]
    for row in rows:
        row["mac_ratio"] = macs / row["macs"]
        row["speedup_per_mac_ratio"] = row["speedup"] / row["mac_ratio"]
    least_sum = sum(min(row.values()) for row in table["layers"].values())
    possible = table["original_ms"] / (whole_model(table) or WholeModel.proportional(
        table["raw_keep_sum_ms"], table["original_ms"])).predict(least_sum)
    return {"table": table, "timing": asdict(timing), "rows": rows, "possible_speedup": possible,
            "target_speedup": args.target_speedup, "unreachable": unreachable}


def _forms(table: dict, ranks: dict) -> tuple:
    """The (path, form) pairs that export a plan's layers in the form the table timed for them (convert-model's
    export does the same: export/forms.py)."""
    from sepconv.convert.export.forms import STANDARD

    chosen = ((path, table["forms"].get(path, {}).get(str(rank), STANDARD)) for path, rank in ranks.items())
    return tuple(sorted((path, form) for path, form in chosen if form != STANDARD))


def build(model, ranks, plan, mode, path: Path, data, forms: tuple = ()) -> dict:
    """The plan separated (SVD start, refined), exported in `mode` with its layers in `forms`, its conv MACs and
    LiteRT test accuracy."""
    from sepconv.convert.separation.policy import SeparationOptions
    from sepconv.convert.recovery.refinement import refine
    from sepconv.convert.separation.walk import separate_with
    from sepconv.convert.export.tflite import TFLiteOptions, export_tflite
    from sepconv.deploy.runtime import open_runtime

    paths = tuple(layer.path for layer in plan.layers)
    separated, report = separate_with(model, SeparationOptions(ranks={p: ranks.get(p, 0) for p in paths},
                                                               include=paths))
    if report.separated:
        refine(model, separated, data["x_calibration"], report)
    export_tflite(separated, path, representative_data=data["x_calibration"],
                  options=TFLiteOptions(quantize=mode, forms=forms))
    runtime = open_runtime(path)
    predicted = np.argmax(runtime.run([data["x_test"]])[0], axis=-1)
    return {"path": path, "macs": report.totals["macs_after"],
            "accuracy": float(np.mean(predicted == data["y_test"]))}


def markdown(results: dict) -> str:
    from tabulate import tabulate

    from sepconv.deploy.timing import describe_xnnpack

    out = []
    for mode, result in results["modes"].items():
        table, rows = result["table"], result["rows"]
        verdict = _verdict(rows)
        out.append(f"### {mode}: on {table['where']} ({table['device'].get('pi_model') or table['device'].get('cpu')},"
                   f" {table['runtime']}, {table['threads']} thread(s), {describe_xnnpack(table['xnnpack'])})"
                   f"\n")
        body = [[r["plan"], _ranks(r["ranks"], table), f"{r['macs'] / 1e6:,.1f}M", f"{r['mac_ratio']:.2f}x",
                 f"{r['table_sum_ms']:.4f} ({r['sum_error']:+.0%})",
                 f"{r['proportional_ms']:.4f} ({r['proportional_error']:+.0%})" if "proportional_ms" in r else "",
                 f"{r['predicted_ms']:.4f}", f"{r['measured_ms']:.4f}", f"{r['error']:+.1%}", f"{r['speedup']:.2f}x",
                 f"{r['speedup_per_mac_ratio']:.0%}", f"{r['predicted_drop']:.2f}", f"{r['accuracy']:.2%}"]
                for r in rows]
        whole = table.get("whole_model") or {"method": "proportional"}
        out.append(tabulate(body, headers=["plan", "K per layer", "conv MACs", "MAC ratio", "table sum ms (error)",
                                           "scaled ms (error)", f"predicted ms ({whole['method']})",
                                           "measured ms", "error", "speed-up", "speed-up / MAC ratio",
                                           "predicted drop", "test accuracy"], tablefmt="github",
                            disable_numparse=True))
        out.append(f"\nlatency-aware not slower than none separated nor by accuracy alone: {verdict}; "
                   f"the table's best possible speed-up (every layer at its fastest option, accuracy aside): "
                   f"{result['possible_speedup']:.2f}x; table: {table['measured']} timed, {table['cached']} cached, "
                   f"{table['seconds']} s; raw sum of kept layers {table['raw_keep_sum_ms']:.4f} ms against the "
                   f"original's {table['original_ms']:.4f} ms"
                   + (f"; every layer at its least K {whole['least']}: {whole['least_ms']:.4f} ms whole, "
                      f"{whole['least_sum_ms']:.4f} ms in the table; whole model = {whole['rest_ms']:.4f} ms + "
                      f"{whole['scale']:.3f} x the table's sum ({whole['method']})" if "least" in whole else "")
                   + (f"; --target-speedup {result['target_speedup']}: {result['unreachable']}" if result["unreachable"]
                      else "") + "\n")
        out.append(tabulate([[path] + [f"{row[k] * 1000:.1f}" for k in sorted(row, key=_order)]
                             for path, row in table["layers"].items()],
                            headers=["layer (us)"] + [f"K={k}" if k != "keep" else "kept"
                                                      for k in sorted(next(iter(table["layers"].values())),
                                                                      key=_order)],
                            tablefmt="github", disable_numparse=True))
        out.append("")
    out.append(f"model: {results['model']}; budget {results['max_drop']} points; this machine's CPU (lscpu): "
               f"{results['cpu']}")
    return "\n".join(out)


def _verdict(rows: list[dict]) -> str:
    """Whether the latency-aware plan is at most NOISE slower than each of the two others; a plan with the same K
    everywhere is the same model, not a race between noisy timings of it."""
    aware = next(r for r in rows if r["plan"] == "latency-aware")
    said = []
    for other in (r for r in rows if r["plan"] in ("none separated (original)", "by accuracy alone")):
        if other["ranks"] == aware["ranks"]:
            said.append(f"the same plan as {other['plan']}")
        else:
            ratio = aware["measured_ms"] / other["measured_ms"]
            said.append(f"{'yes' if ratio <= 1 + NOISE else 'NO'} against {other['plan']} ({ratio:.2f}x its time)")
    return "; ".join(said) + f" (tolerance {NOISE:.0%})"


def _order(key: str):
    return (1, 0) if key == "keep" else (0, int(key))


def _ranks(ranks: dict, table: dict) -> str:
    return " ".join(str(ranks.get(path, "-")) for path in table["layers"])


def lscpu() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return ", ".join(f"{key} {fields[key].strip()}" for key in ("Model name", "Architecture", "CPU(s)") if key in fields)


if __name__ == "__main__":
    sys.exit(main())
