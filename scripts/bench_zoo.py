"""convert-model on the model zoo (convert/demo/zoo.py), as a user runs it: one subprocess per model and mode.

Modes (every run writes an int8 TFLite artifact, or fails with one line and writes nothing):
- default:  `convert-model MODEL out.tflite --data train.npz --validation-data validation.npz --test-data test.npz`
            (budget 1 point, refine, BatchNorm recalibration, fine-tuning, int8: every default with data);
- k1-labels: the same with `--rank 1` (every separable layer at K=1, fine-tuned with labels);
- k1-distill: `--rank 1` with the training and validation images only (no labels: distillation from the original,
            choices by agreement with it);
- nodata:   `convert-model MODEL out.tflite` (no data: energy 0.9, dynamic-range int8, synthetic verification).
Speed: each run's manifest holds the artifact timed against the original converted the same way (int8 TFLite, 1
thread, one interleaved bench-model run by convert-model itself: convert/export/speed.py); the table shows both
p50s, the speed-up with its interval, which model shipped, the MAC ratio, and for the default runs the latency table's
predicted speed-up of the chosen plan (the fastest within the accuracy budget) beside its best at any accuracy (every
layer at its fastest option), and the share of the plan's prediction that the artifact reached (measured / plan).
The artifact's accuracy is measured here, with LiteRT, on the test digits that no run chose with; every choice
(the budget's sensitivity, early stopping, stages kept, int8 repair) is made on validation digits that the model was
not trained on either (zoo.py: the digits' test split, halved). Peak memory is the run's maximum resident set (wait4), seconds wall-clock;
this process never imports TensorFlow (the zoo is read and trained in a child), since Linux passes a parent's peak on to
the children it starts. The table also shows a quantized artifact against the original model in float32
(--quantize auto's check: the manifest's `speed_float32`).

A second table lists per run (but nodata, which is dynamic-range) what shipped, int8 or the fallback and why, the
int8 repair steps tried with their agreement on the validation images, the verification on the test images, and the
repair's seconds (the manifest's `repair_seconds`) with what they add to the rest of the run (issue 24: at most 50%),
and the first attempt's diagnosis (`diagnosis_seconds`, which a failing int8 costs as well) with what both add.

usage: scripts/bench-zoo [--models a,b] [--modes default,nodata] [--out build/zoo]   (OUT/bench-zoo.json, rewritten
after every run, keeps the rows of earlier invocations for the models and modes not run again)
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

MODES = ("default", "k1-labels", "k1-distill", "nodata")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated zoo names (default: all)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {','.join(MODES)}")
    parser.add_argument("--out", type=Path, default=Path("build/zoo"))
    parser.add_argument("--table", action="store_true", help="only print the table of OUT/bench-zoo.json")
    args = parser.parse_args(argv)
    if args.table:
        saved = json.loads((args.out / "bench-zoo.json").read_text())
        for row in saved["rows"]:  # rows written before the report had these columns: read them off the manifest
            manifest = args.out / row["model"] / "runs" / f"{row['mode']}.tflite.json"
            if row["exit"] == 0 and "fallback" not in row and manifest.is_file():
                recorded = json.loads(manifest.read_text())
                row["fallback"] = (recorded.get("quantize_fallback") or {}).get("reason")
                row["float_layers"] = [f["layer"] for f in (recorded.get("quantization") or {}).get("float_layers", [])]
                row["keras_test_drop"] = ((recorded.get("recovery") or {}).get("budget") or {}).get("test_drop")
        print(f"{saved['cpu']}\n\n{table(saved['rows'])}\n\n{int8_table(saved['rows'])}")
        return 0
    names = zoo_names()
    rows = []
    report = args.out / "bench-zoo.json"
    previous = {(r["model"], r["mode"]): r for r in json.loads(report.read_text())["rows"]} if report.exists() else {}
    for name in (args.models or ",".join(names)).split(","):
        entry = trained(name, args.out)
        print(f"{name}: {entry.params:,} parameters, test accuracy {entry.accuracy:.2%}", flush=True)
        for mode in args.modes.split(","):
            rows.append(run(entry, mode, args.out / name / "runs"))
            previous[(name, mode)] = rows[-1]
            print(f"  {mode}: {summary(rows[-1])}", flush=True)
            merged = sorted(previous.values(), key=lambda r: (names.index(r["model"]), MODES.index(r["mode"])))
            report.write_text(json.dumps({"cpu": cpu(), "rows": merged}, indent=2))  # after every run
    print(f"\n{cpu()}\n")
    ordered = sorted(previous.values(), key=lambda r: (names.index(r["model"]), MODES.index(r["mode"])))
    print(table(ordered))
    print(f"\n{int8_table(ordered)}")
    return 0


def zoo_names() -> list[str]:
    """The zoo's model names, read in a child process: importing the zoo imports TensorFlow (646 MiB resident here),
    and a child's peak resident set starts at its parent's (exec keeps the larger), so a parent with TensorFlow in
    it puts a floor under every run's peak (a /bin/true started by such a parent reported 646 MiB)."""
    code = "import json; from sepconv.convert.demo import zoo; print(json.dumps(list(zoo.ZOO)))"
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def trained(name: str, folder: Path) -> SimpleNamespace:
    """zoo.entry(name, folder) (name, model, train, test, accuracy, params, validation), trained once, in a child
    process so that this one stays small (zoo_names)."""
    code = ("import dataclasses, json, sys; from sepconv.convert.demo import zoo; "
            "print(json.dumps(dataclasses.asdict(zoo.entry(sys.argv[1], sys.argv[2])), default=str))")
    done = subprocess.run([sys.executable, "-c", code, name, str(folder)], check=True, capture_output=True, text=True)
    fields = json.loads(done.stdout.strip().splitlines()[-1])
    return SimpleNamespace(**{key: Path(value) if key in ("model", "train", "test", "validation") and value else value
                              for key, value in fields.items()})


def run(entry, mode: str, folder: Path) -> dict:
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{mode}.tflite"
    for leftover in (out, out.with_name(out.name + ".json")):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(out.with_name(out.name + ".checkpoints"), ignore_errors=True)  # kept by a run that failed
    args = [str(entry.model), str(out)]
    if mode != "nodata":
        train, validation = entry.train, entry.validation
        if mode == "k1-distill":  # no labels at all: distillation, and choices by agreement with the original
            train, validation = folder / "train_unlabelled.npz", folder / "validation_unlabelled.npz"
            np.savez(train, x=np.load(entry.train)["x"])
            np.savez(validation, x=np.load(entry.validation)["x"])
        args += ["--data", str(train), "--validation-data", str(validation), "--test-data", str(entry.test)]
    if mode.startswith("k1"):
        args += ["--rank", "1"]
    convert = Path(sys.executable).parent / "convert-model"
    summary_path = folder / f"{mode}.summary.json"
    summary_path.unlink(missing_ok=True)
    started = time.perf_counter()
    process = subprocess.Popen([str(convert), *args, "--quiet", "--json", str(summary_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)  # its usage includes its worker's (waited for by it)
    exit_code = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    row = {"model": entry.name, "mode": mode, "exit": exit_code, "seconds": round(seconds, 1),
           "peak_rss_mib": round(usage.ru_maxrss / 1024), "original_accuracy": entry.accuracy,
           "params_before": entry.params, "error": stderr.strip().splitlines()[-1] if exit_code else None}
    if exit_code == 0:
        row.update(scored(entry, out))
        row["latency_seconds"] = latency_seconds(json.loads(summary_path.read_text()),
                                                 json.loads(out.with_name(out.name + ".json").read_text()))
    return row


def latency_seconds(summary: dict, manifest: dict) -> float:
    """What measuring speed cost the run: the latency table, timing the separable forms, the artifact against the
    original (the run's `speed NAME` stage)."""
    table = (((manifest.get("recovery") or {}).get("budget") or {}).get("latency") or {}).get("table") or {}
    forms = manifest.get("forms") or {}
    speed = sum(seconds for stage, seconds in summary["seconds"].items() if stage.startswith("speed "))
    return round(table.get("seconds", 0.0) + forms.get("seconds", 0.0) + speed, 1)


def scored(entry, artifact: Path) -> dict:
    import numpy as np

    from sepconv.deploy import open_runtime

    manifest = json.loads(artifact.with_name(artifact.name + ".json").read_text())
    test = np.load(entry.test)
    x = test["x"].astype(np.float32)
    x = x[..., None] if x.ndim == 3 else x
    predicted = np.argmax(open_runtime(str(artifact)).run([x])[0], axis=1)
    separation = manifest.get("separation") or {}
    totals = separation.get("totals", {})
    recovery = manifest.get("recovery") or {}
    stages = recovery.get("stages", [])
    budget = recovery.get("budget") or {}
    quantization, fallback = manifest.get("quantization") or {}, manifest.get("quantize_fallback") or {}
    float_layers = [f["layer"] for f in quantization.get("float_layers", [])]
    attempts = quantization.get("attempts") or fallback.get("int8_attempts") or []
    repair = quantization.get("repair_seconds", fallback.get("int8_repair_seconds"))
    diagnosis = quantization.get("diagnosis_seconds", fallback.get("int8_diagnosis_seconds"))
    return {"int8_accuracy": float(np.mean(predicted == test["y"])), "bytes": manifest["bytes"],
            "fallback": fallback.get("reason"), "float_layers": float_layers,
            "int8_attempts": [f"{a['name']}: {a['agreement']:.2%}" if a.get("agreement") is not None else a["name"]
                              for a in attempts],
            "repair_seconds": repair, "diagnosis_seconds": diagnosis,
            "keras_test_drop": budget.get("test_drop"), "artifact_budget": manifest["verification"].get("budget"),
            "quantize": manifest["quantize"], "params_after": totals.get("model_params_after", entry.params),
            "macs_before": totals.get("macs_before"), "macs_after": totals.get("macs_after"),
            "separated": totals.get("separated", 0), "conv_layers": totals.get("layers", 0),
            "stages": [[s["name"], s["kept"]] for s in stages[2:]], "ranks": budget.get("ranks"),
            "verification": manifest["verification"]["outputs"][0]["criterion"], "speed": manifest.get("speed"),
            "speed_float32": manifest.get("speed_float32"),
            "quantize_fallback": {key: fallback[key] for key in ("from", "slower") if key in fallback} or None,
            "best_speedup": best_speedup(budget.get("latency"))}


def best_speedup(latency: dict | None) -> dict | None:
    """The latency table's speed-ups, predicted as the pipeline predicts (latency_choice.WholeModel on the table's
    sum): `any`, every layer at its fastest option whatever the accuracy; `plan`, the chosen plan (the fastest
    within the accuracy budget); `method`, how the whole model's latency follows from the table's sum."""
    from sepconv.convert.recovery.latency_choice import WholeModel

    if not latency:
        return None
    rows = latency["table"]["layers"]
    fastest = {layer["path"]: layer["fastest_rank"] for layer in latency["choice"]["layers"]}
    best = sum(row["keep" if fastest.get(path, 0) == 0 else str(fastest[path])] for path, row in rows.items())
    choice = latency["choice"]
    whole = WholeModel(**choice["whole_model"])
    return {"any": round(choice["original_ms"] / whole.predict(best), 3),
            "plan": round(choice["original_ms"] / choice["predicted_ms"], 3), "method": whole.method}


def summary(row: dict) -> str:
    if row["exit"]:
        return f"exit {row['exit']}: {row['error']} ({row['seconds']} s)"
    speed = row.get("speed")
    # "int8_accuracy" is the shipped artifact's test accuracy, whatever its mode (the key predates the fallbacks)
    return (f"{row.get('quantize', 'int8')} artifact {row['int8_accuracy']:.2%} (original "
            f"{row['original_accuracy']:.2%}), {row['params_before']:,} -> "
            f"{row['params_after']:,} parameters, "
            + (f"{speed['speedup']:.2f}x against the original (shipped: {speed['shipped']}), " if speed else "")
            + f"{row['seconds']} s, peak {row['peak_rss_mib']:,.0f} MiB")


def table(rows) -> str:
    from sepconv.convert.results import fallback_words

    lines = []
    for r in rows:
        ok = r["exit"] == 0
        drop = 100 * (r["original_accuracy"] - r["int8_accuracy"]) if ok else None
        macs = (f"{r['macs_before'] / 1e6:,.1f}M -> {r['macs_after'] / 1e6:,.1f}M" if ok and r.get("macs_before")
                else "")
        stages = ", ".join(f"{name} {'kept' if kept else 'REJECTED'}" for name, kept in r.get("stages") or []) if ok \
            else ""
        artifact = ""
        if ok:
            fallback = r.get("quantize_fallback") or ({"from": "int8"} if r.get("fallback") else None)
            artifact = r.get("quantize", "") + fallback_words(fallback) + (
                f" ({len(r['float_layers'])} float)" if r.get("float_layers") else "")
        lines.append([r["model"], r["mode"], f"exit {r['exit']}" if not ok else "0", artifact,
                      f"{r['params_before']:,} -> {r['params_after']:,}" if ok else f"{r['params_before']:,}", macs,
                      f"{r['original_accuracy']:.2%}", f"{r['int8_accuracy']:.2%}" if ok else "",
                      f"{drop:+.2f}" if ok else "",
                      f"{r['keras_test_drop']:+.2f}" if ok and r.get("keras_test_drop") is not None else "",
                      f"{r['artifact_budget']['drop']:+.2f}" if ok and r.get("artifact_budget") else "",
                      *speed_cells(r), float32_cell(r), stages or ("" if ok else (r["error"] or "")[:90]),
                      r["seconds"], f"{r['latency_seconds']:.1f}" if r.get("latency_seconds") is not None else "",
                      f"{r['peak_rss_mib']:,.0f}"])
    return github(lines, headers=["model", "mode", "exit", "artifact", "parameters", "conv MACs", "original",
                                  "artifact (test)", "drop", "budget: Keras drop (test)",
                                  "budget: artifact drop (validation)", "original p50 ms", "artifact p50 ms",
                                  "speed-up (95% CI)", "shipped", "MACs ratio", "table: plan / best at any accuracy",
                                  "measured / plan", "against the original in float32 (95% CI)",
                                  "stages (kept / rejected) or error", "seconds", "of which timing", "peak MiB"])


def int8_table(rows) -> str:
    """Per run: what shipped (int8, or the fallback and why), the int8 repair steps with their agreement on the
    validation images, the artifact's verification and accuracy on the test images, and the repair's seconds."""
    lines = [[r["model"], r["mode"], r.get("quantize", "") if r["exit"] == 0 else f"exit {r['exit']}",
              r.get("fallback") or "", "; ".join(r.get("int8_attempts") or []),
              r.get("verification", "") if r["exit"] == 0 else "",
              f"{r['int8_accuracy']:.2%}" if r["exit"] == 0 else "", repair_cell(r)]
             for r in rows if r.get("mode") != "nodata"]
    return github(lines, headers=["model", "mode", "shipped", "int8 fallback: why", "int8 repair steps "
                                  "(agreement with the Keras model, validation)", "verification (test)",
                                  "accuracy (test)", "repair seconds (added to the rest of the run)"])


def github(lines, headers) -> str:
    """A GitHub Markdown table; a "|" inside a cell (a fallback's reasons are joined by " | ") escaped, so that it
    stays one cell."""
    from tabulate import tabulate

    return tabulate([[str(cell).replace("|", "\\|") for cell in line] for line in lines], headers=headers,
                    tablefmt="github", disable_numparse=True)


def repair_cell(r: dict) -> str:
    """The int8 repair's seconds and what they add to the run without them (the issue's "at most 50%"); then the
    first attempt's diagnosis (which a failing int8 also costs) and what both add (runs recorded before it was
    timed: the repair alone)."""
    repair = r.get("repair_seconds") if r["exit"] == 0 else None
    if repair is None:
        return ""
    if not repair:
        return "0 (no repair needed)"
    cell = f"{repair:.1f} (+{repair / (r['seconds'] - repair):.0%})"
    diagnosis = r.get("diagnosis_seconds")
    if diagnosis:
        both = repair + diagnosis
        cell += f"; diagnosis {diagnosis:.1f}, both +{both / (r['seconds'] - both):.0%}"
    return cell


def float32_cell(r: dict) -> str:
    """The artifact against the original model in float32: --quantize auto's check of a quantized artifact
    (`speed_float32`), or the speed check itself when float32 shipped; empty when neither was timed."""
    if r["exit"]:
        return ""
    speed = r.get("speed_float32") or (r.get("speed") if r.get("quantize") == "none" else None)
    return interval(speed) if speed else ""


def interval(speed: dict) -> str:
    """A manifest's `speed` (or `speed_float32`) as convert-model words it: '2.81x (2.70-2.88)'."""
    from sepconv.convert.export.speed import Speed

    return Speed(**speed).interval()


def speed_cells(r: dict) -> list[str]:
    """original p50, artifact p50, speed-up (interval), shipped, MACs ratio, the table's best, share of it."""
    speed = r.get("speed") if r["exit"] == 0 else None
    macs = (f"{r['macs_before'] / r['macs_after']:.2f}x" if r["exit"] == 0 and r.get("macs_after") else "")
    if not speed:
        return ["", "", "", "", macs, "", ""]
    best = r.get("best_speedup")
    cells = [f"{speed['original_ms']:.4f}", f"{speed['artifact_ms']:.4f}", interval(speed), speed["shipped"], macs]
    if not best:
        return cells + ["", ""]
    return cells + [f"{best['plan']:.2f}x / {best['any']:.2f}x", f"{speed['speedup'] / best['plan']:.0%}"]


def cpu() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name}{isa()}, {os.cpu_count()} cores; Python {platform.python_version()}"


def isa() -> str:
    """' (AVX-512 VNNI)' or ' (AVX2)' on x86 (int8 kernels differ: docs/convert.md), else ''."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return " (AVX-512 VNNI)" if "avx512_vnni" in flags else " (AVX2, no VNNI)" if "avx2" in flags else ""


if __name__ == "__main__":
    raise SystemExit(main())
