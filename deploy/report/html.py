"""The HTML report: one self-contained page of charts and tables from the tools' JSON.

    from sepconv.deploy.report.html import load_runs, render, write_report
    runs = load_runs(["convert.json", "bench.json", "fleet.json"])   # kinds recognised, several side by side
    page = render(runs)                                               # charts drawn once: SVG inline, PNG kept
    write_report(page, "report.html", png_dir="charts/")             # written whole, or not at all

The page has no script and no link: its charts are inline SVG, so it opens anywhere without a network. Accepted JSON:
convert-model's `--json` summary, bench-model's `--json` report, deploy-model's `--json` ({host: report}) and its
per-host files in sepconv-reports/, and sepconv-demo's `--json` summary. Nothing here imports TensorFlow; matplotlib
is imported when a chart is drawn (charts.py).
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from sepconv.deploy.errors import OutputError, ReportInputError
from sepconv.deploy.files import write_atomic
from sepconv.deploy.report import charts
from sepconv.deploy.scores import percent

KINDS = ("convert-model's --json summary, bench-model's --json report, deploy-model's --json report or a "
         "per-host file of its sepconv-reports/, or sepconv-demo's --json summary")


@dataclass
class Runs:
    """What the JSON files hold, by kind, each with the label it is shown under."""

    converts: list = field(default_factory=list)  # [(label, convert-model summary)]
    benches: list = field(default_factory=list)  # [(label, bench-model report, device dict or None)]
    failed: list = field(default_factory=list)  # [(host, error message)] of a deploy-model fleet

    def add(self, other: Runs) -> None:
        self.converts += other.converts
        self.benches += other.benches
        self.failed += other.failed


@dataclass(frozen=True)
class Page:
    html: str
    charts: tuple  # charts.Chart, in page order


def load_runs(paths) -> Runs:
    """Read and classify every JSON file; the first bad one raises ReportInputError naming the file and the fix."""
    if not paths:
        raise ReportInputError(f"no JSON file given; pass one or more of: {KINDS}")
    runs = Runs()
    for path in map(Path, paths):
        runs.add(classify(_read(path), path.stem, str(path)))
    return runs


def _read(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportInputError(f"{path}: no such file; name a JSON report written with --json FILE") from None
    except IsADirectoryError:
        raise ReportInputError(f"{path}: is a directory; name a JSON report in it") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ReportInputError(f"{path}: cannot be read as text ({getattr(error, 'strerror', None) or error}); "
                               f"name a JSON report written with --json FILE") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ReportInputError(f"{path}: is not valid JSON ({error.msg} at line {error.lineno}); it may be truncated "
                               f"or not a report: write it again with --json FILE") from None
    except RecursionError:
        raise ReportInputError(f"{path}: is JSON nested deeper than any report; write it again with --json FILE"
                               ) from None


def classify(data, label: str = "run", source: str | None = None) -> Runs:
    """Runs from one parsed JSON document (see the module doc for the kinds); ReportInputError for anything else."""
    where = source or label
    runs = Runs()
    if isinstance(data, dict) and "error" in data and "tool" in data:
        raise ReportInputError(f"{where}: is the failure report of {data['tool']} ({data['error'].get('message')}); "
                               f"there is nothing to draw: run it again")
    if _is_bench(data):
        _check_bench(data, where)
        runs.benches.append((label, data, None))
    elif _is_host(data):
        _add_host(runs, data, where)
    elif isinstance(data, dict) and "artifacts" in data and "source" in data:
        runs.converts.append((label, data))
    elif isinstance(data, dict) and "conversion" in data:  # sepconv-demo --json
        runs.converts.append((f"{label}: conversion", data["conversion"]))
        if _is_bench(data.get("speed")):
            _check_bench(data["speed"], f"{where} (speed)")
            runs.benches.append((f"{label}: speed", data["speed"], None))
    elif isinstance(data, dict) and data and all(_is_host(v) for v in data.values()):  # deploy-model --json
        for report in data.values():
            _add_host(runs, report, where)
    else:
        raise ReportInputError(f"{where}: is JSON of an unknown kind; expected {KINDS}")
    return runs


def _is_bench(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("cases"), list) and "context" in data


def _is_host(data) -> bool:
    return isinstance(data, dict) and "host" in data and (_is_bench(data.get("benchmark")) or "error" in data)


def _add_host(runs: Runs, report: dict, where: str) -> None:
    host = report["host"]
    if not isinstance(host, str) or not host:
        raise ReportInputError(f"{where}: a host entry's 'host' is {type(host).__name__} {str(host)[:40]!r}, not a "
                               f"name; write the report again with deploy-model --json FILE")
    if "error" in report:
        error = report["error"]
        runs.failed.append((host, str(error.get("message", "failed")) if isinstance(error, dict) else str(error)))
    else:
        _check_bench(report["benchmark"], f"{where} ({host})")
        runs.benches.append((host, report["benchmark"], report.get("device")))


def _check_bench(report: dict, where: str) -> None:
    """A bench-model report whose JSON parses but whose values are not what bench-model writes (a case that is
    not an object, samples that are not finite positive numbers, latencies that are not numbers) is refused in one
    line naming the file, the case and the field, before anything is drawn."""
    def refuse(what: str):
        raise ReportInputError(f"{where}: {what}, not what bench-model writes; write the report again with "
                               f"bench-model --json FILE")

    if not isinstance(report.get("context"), dict):
        refuse("'context' is not an object")
    for number, case in enumerate(report["cases"], 1):
        if not isinstance(case, dict):
            refuse(f"case {number} is {type(case).__name__}, not an object")
        name = case.get("model")
        if not isinstance(name, str):
            refuse(f"case {number}'s 'model' is {type(name).__name__}")
        samples = case.get("samples_ms")
        if not isinstance(samples, list) or not samples or not all(_finite(v) and v > 0 for v in samples):
            refuse(f"case {number} ({name})'s 'samples_ms' is not a list of positive finite milliseconds")
        latency = case.get("latency_ms")
        if not isinstance(latency, dict) or not all(_finite(latency.get(key)) for key in ("p50", "p90", "p99")):
            refuse(f"case {number} ({name})'s 'latency_ms' has no finite p50, p90 and p99")
        if not isinstance(case.get("threads"), int):
            refuse(f"case {number} ({name})'s 'threads' is not a whole number")
        for key in ("memory", "accuracy", "warmup"):
            if case.get(key) is not None and not isinstance(case[key], dict):
                refuse(f"case {number} ({name})'s '{key}' is {type(case[key]).__name__}, not an object")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def render(runs: Runs, title: str = "sepconv report") -> Page:
    """Draw every chart the runs allow and lay out the page (ReportInputError when there is nothing at all)."""
    if not runs.converts and not runs.benches:
        raise ReportInputError("the JSON holds no run to draw (every host failed); run the benchmark again")
    charts.require_matplotlib()
    sections, drawn = [], []
    for index, (label, run) in enumerate(runs.converts):
        made = [chart for chart in (
            charts.sensitivity_heatmap(run, f"convert{index + 1}_sensitivity"),
            charts.layer_costs(run, f"convert{index + 1}_layers"),
            charts.stage_scores(run, f"convert{index + 1}_stages"),
            charts.fine_tuning(run, f"convert{index + 1}_finetune"),
            charts.artifact_sizes(run, f"convert{index + 1}_artifacts"),
            charts.quantization_errors(run, f"convert{index + 1}_int8"),
        ) if chart]
        drawn += made
        sections.append(_convert_section(label, run, made))
    tradeoff = charts.budget_tradeoff([(label, run) for label, run in runs.converts], "tradeoff_size")
    benches = [(label, bench) for label, bench, _ in runs.benches]
    bench_charts = [chart for chart in (
        charts.latency_distributions(benches, "latency"),
        charts.speedups(benches, "speedup"),
        charts.accuracy_latency(benches, "tradeoff_latency"),
        charts.memory(benches, "memory"),
        charts.time_shares(benches, "time_shares"),
    ) if chart]
    if runs.benches or runs.failed:
        sections.append(_bench_section(runs, bench_charts))
        drawn += bench_charts
    if tradeoff:
        sections.append(_section("Trade-off", [_figure(tradeoff)]))
        drawn.append(tradeoff)
    headline = _headline(runs)
    if headline:
        sections.insert(0, headline)
    page = _PAGE.format(title=html.escape(title), body="\n".join(sections))
    return Page(page, tuple(drawn))


def write_report(page: Page, html_path=None, png_dir=None, *, overwrite: bool = False) -> None:
    """Write the page and/or a PNG per chart (<chart name>.png); each file appears whole (a temporary name renamed)
    or not at all, and an existing file is replaced only with `overwrite` (checked for all before any is written)."""
    targets = [Path(png_dir) / f"{chart.name}.png" for chart in page.charts] if png_dir is not None else []
    existing = [str(path) for path in [*targets, *([Path(html_path)] if html_path else [])] if path.exists()]
    if existing and not overwrite:
        raise OutputError(f"{', '.join(existing)}: exists; pass --overwrite to replace it, or name another file or "
                          f"folder")
    if png_dir is not None:
        folder = Path(png_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"--report-dir {folder}: cannot be created ({error.strerror or error})") from None
        for chart, path in zip(page.charts, targets):
            _write_whole(path, chart.png)
    if html_path is not None:
        _write_whole(Path(html_path), page.html.encode("utf-8"))


def _write_whole(path: Path, data: bytes) -> None:
    try:
        write_atomic(path, data, sync=True)
    except OSError as error:
        raise OutputError(f"{path}: could not be written ({error.strerror or error}); nothing half-written was "
                          f"left") from None


# -------------------------------------------------------------------------------------------------------- layout

def _section(title: str, parts: list[str]) -> str:
    return f"<section><h2>{html.escape(title)}</h2>\n" + "\n".join(parts) + "\n</section>"


def _figure(chart) -> str:
    return (f'<figure id="{chart.name}"><figcaption><b>{html.escape(chart.title)}</b> '
            f"{html.escape(chart.caption)}</figcaption>\n{chart.svg}</figure>")


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _headline(runs: Runs) -> str:
    """The answer first: per converted artifact, how much smaller and faster than the original and what it costs in
    accuracy, with the device it was timed on; per benchmarked model, its p50 and speed-up, and the peak memory."""
    items = []
    for label, run in runs.converts:
        source = run.get("source") or {}
        for artifact in run.get("artifacts") or []:
            items.append(f"<li><b>{html.escape(Path(artifact['path']).name)}</b> ({html.escape(label)}): "
                         f"{html.escape(_artifact_headline(source, artifact))}</li>")
    for label, bench, device in runs.benches:
        machine = (device or {}).get("pi_model") or (device or {}).get("cpu") or \
            (bench.get("context") or {}).get("cpu") or "this machine"
        peak = bench.get("peak_rss_bytes")
        for case in bench["cases"]:
            latency = case["latency_ms"]
            low, high = latency.get("ci95_p50") or (latency["p50"], latency["p50"])
            accuracy = (case.get("accuracy") or {}).get("top1")
            items.append(f"<li><b>{html.escape(case['model'])}</b> ({html.escape(label)}, {case['threads']} "
                         f"thread(s), {html.escape(str(machine))}): p50 {latency['p50']:.3f} ms "
                         f"({low:.3f}-{high:.3f}), p99 {latency['p99']:.3f} ms"
                         + (f", {case['speedup']:.2f}x the first model" if case.get("speedup") else "")
                         + (f", accuracy {accuracy:.2%}" if accuracy is not None else "")
                         + (f"; the benchmark's peak memory {peak / 2 ** 20:,.0f} MiB" if peak else "") + "</li>")
    if not items:
        return ""
    return _section("The answer", ["<ul class=\"headline\">" + "\n".join(items) + "</ul>"])


def _artifact_headline(source: dict, artifact: dict) -> str:
    """One artifact of a conversion in words: size against the original file, measured speed-up with its interval
    and where, accuracy and agreement against the original, and whether it passed."""
    parts = [f"{artifact['format']} {artifact['quantize']}, {artifact['bytes'] / 1024:,.0f} KiB"]
    if source.get("bytes"):
        parts[0] += f", {source['bytes'] / max(artifact['bytes'], 1):.1f}x smaller than the original file"
    speed = artifact.get("speed")
    if speed:
        low, high = speed["speedup_ci95"]
        what = "the original itself, converted the same way" if speed["shipped"] == "original" else "separated"
        parts.append(f"{speed['speedup']:.2f}x as fast as the original ({low:.2f}-{high:.2f}, 95% interval) on "
                     f"{speed['where']} ({speed['device']}, {speed['runtime']}, {speed['threads']} thread(s)); "
                     f"shipped: {what}")
    else:
        parts.append("not timed")
    check = artifact.get("verification") or {}
    output = (check.get("outputs") or [{}])[0]
    if output.get("accuracy") is not None and check.get("original_accuracy") is not None:
        change = 100 * (output["accuracy"] - check["original_accuracy"])
        parts.append(f"accuracy {output['accuracy']:.2%} (the original's {check['original_accuracy']:.2%}; "
                     f"{change:+.2f} points)")
    elif output.get("accuracy") is not None:
        parts.append(f"accuracy {output['accuracy']:.2%}")
    if check.get("original_agreement") is not None:
        parts.append(f"the same top-1 answer as the original on {check['original_agreement']:.2%} of the test images")
    parts.append("verification passed" if check.get("passed") else "verification FAILED")
    return "; ".join(parts)


def _convert_section(label: str, run: dict, made: list) -> str:
    source = run.get("source") or {}
    plan = run.get("plan") or {}
    reason = str(run.get("quantize_reason") or "")
    chosen = ("chosen by --quantize auto because data was given" if "(data given)" in reason else
              "chosen by --quantize auto because no data was given" if "no data given" in reason else "as asked")
    facts = [["source", source.get("path")], ["quantize", f"{run.get('quantize')} ({chosen})"],
             ["data", (run.get("data") or {}).get("source") or "none (synthetic inputs)"],
             ["plan", _plan_words(plan)]]
    parts = [_table(["", label], facts), *map(_figure, made), "<h3>Artifacts</h3>", _artifact_table(run)]
    return _section(f"convert-model: {label}", parts)


def _plan_words(plan: dict) -> str:
    """convert-model's plan in words (its JSON's `plan`), e.g. "K per layer within a 1.0-point accuracy budget,
    chosen for measured latency; refinement; BatchNorm recalibration; fine-tuning, up to 10 epochs; int8"."""
    words = []
    if plan.get("max_accuracy_drop") is not None:
        words.append(f"K per layer within a {plan['max_accuracy_drop']:g}-point accuracy budget"
                     + (", chosen for measured latency" if plan.get("latency") else ""))
    words += [text for key, text in (("refine", "refinement"), ("recalibrate_bn", "BatchNorm recalibration"))
              if plan.get(key)]
    if plan.get("epochs"):
        words.append(f"fine-tuning, up to {plan['epochs']} epoch{'s' * (plan['epochs'] != 1)}")
    if plan.get("quantize"):
        words.append(f"{plan['quantize']} quantization" if plan["quantize"] != "none" else "no quantization")
    defaults = plan.get("defaults") or []
    return "; ".join(words) + (f" (defaults for the data given: {', '.join(defaults)})" if defaults else "")


def _artifact_table(run: dict) -> str:
    rows = []
    for artifact in run.get("artifacts") or []:
        check = artifact["verification"]
        output = (check.get("outputs") or [{}])[0]
        rows.append([Path(artifact["path"]).name, f"{artifact['format']} {artifact['quantize']}",
                     f"{artifact['bytes'] / 1024:,.1f} KiB", percent(output.get("accuracy")),
                     percent(output.get("agreement")), percent(check.get("original_agreement")),
                     "passed" if check.get("passed") else "FAILED", output.get("criterion", ""),
                     ", ".join(_float_layers(artifact)) or "none", _speed(artifact.get("speed"))])
    return _table(["artifact", "format", "size", "accuracy", "agrees w/ separated", "agrees w/ original", "check",
                   "criterion", "layers kept in float", "speed-up against the original (95% CI)"], rows)


def _speed(speed: dict | None) -> str:
    """convert-model's measured speed of an artifact against the original converted the same way (its `speed`)."""
    if not speed:
        return "not timed"
    low, high = speed["speedup_ci95"]
    shipped = "; the separation was slower: the original shipped" if speed["shipped"] == "original" else ""
    return (f"{speed['speedup']:.2f}x ({low:.2f}-{high:.2f}), {speed['verdict']}: {speed['artifact_ms']:.4f} ms "
            f"against {speed['original_ms']:.4f} ms on {speed['where']} ({speed['device']}, {speed['threads']} "
            f"thread(s)){shipped}")


def _float_layers(artifact: dict) -> list[str]:
    """Layers a quantized artifact keeps in float, where the JSON records them (absent: none recorded)."""
    for holder in (artifact.get("quantization") or {}, artifact, artifact.get("verification") or {}):
        for key in ("float_layers", "kept_float", "layers_in_float"):
            if holder.get(key):
                return [str(v if isinstance(v, str) else v.get("layer") or v.get("path") or v.get("name") or v)
                        for v in holder[key]]
    return []


def _bench_section(runs: Runs, made: list) -> str:
    rows = []
    for label, bench, _ in runs.benches:
        for case in bench["cases"]:
            lat = case["latency_ms"]
            rows.append([label, case["model"], case["format"], case["threads"],
                         f"{case['artifact']['bytes'] / 1024:,.0f} KiB", f"{lat['p50']:.3f}",
                         f"{lat['ci95_p50'][0]:.3f}-{lat['ci95_p50'][1]:.3f}", f"{lat['p90']:.3f}", lat["count"],
                         f"{case['speedup']:.2f}x" if case.get("speedup") else "",
                         percent((case.get("accuracy") or {}).get("top1"))])
    table = _table(["host / run", "model", "format", "threads", "size", "p50 ms", "p50 95% CI", "p90 ms", "runs",
                    "speed-up", "accuracy"], rows)
    parts = [*map(_figure, made), "<h3>Cases</h3>", table, "<h3>Devices</h3>", _context_table(runs)]
    if runs.failed:
        parts.append(_table(["failed host", "error"], [[h, m] for h, m in runs.failed]))
    return _section("bench-model / deploy-model", parts)


def _context_table(runs: Runs) -> str:
    rows = []
    for label, bench, device in runs.benches:
        ctx = bench.get("context") or {}
        device = device or {}
        after = ctx.get("after") or {}
        rows.append([label, device.get("pi_model") or ctx.get("pi_model") or ctx.get("cpu"),
                     ctx.get("machine"), ctx.get("cores"), ctx.get("os"), ctx.get("python"),
                     ", ".join(f"{k} {v}" for k, v in (ctx.get("libraries") or {}).items()),
                     ctx.get("governor"), after.get("temperature_c"), after.get("throttled"),
                     "yes: timings are meaningless" if device.get("emulated") else "",
                     "on" if (bench.get("options") or {}).get("xnnpack", True) else "off"])
    return _table(["host / run", "device", "machine", "cores", "OS", "Python", "libraries", "governor", "SoC °C after",
                   "throttled", "emulated", "XNNPACK"], rows)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="sepconv">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
h1 {{ font-size: 1.6em; }} h2 {{ border-bottom: 1px solid #ccc; padding-bottom: .2em; }}
figure {{ margin: 1.5em 0; }} figure svg {{ max-width: 100%; height: auto; }}
figcaption {{ font-size: .9em; color: #444; margin-bottom: .4em; }}
table {{ border-collapse: collapse; font-size: .85em; margin: .5em 0 1.5em; }}
th, td {{ border: 1px solid #ddd; padding: .25em .6em; text-align: left; }} th {{ background: #f3f3f3; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""
