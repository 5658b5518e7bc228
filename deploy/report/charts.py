"""The report's charts, drawn with matplotlib from the tools' JSON (convert-model, bench-model, deploy-model).

Each function takes the saved JSON (plain dicts) and returns a `Chart` (an SVG string for the HTML page and PNG bytes
for --report-dir), or None when the JSON holds nothing to draw. matplotlib is imported on first use, through its
object API (`matplotlib.figure.Figure`, no pyplot state), and only here: `sepconv.deploy` imports this module lazily,
so a device never needs matplotlib, and nothing here imports TensorFlow.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from sepconv.deploy.choices import SPATIAL, choice_columns, choice_label, choice_order, spatial_rank
from sepconv.deploy.errors import RuntimeMissingError

MISSING = ("Drawing the report's charts needs matplotlib, which is not installed: pip install 'sepconv[report]' "
           "(or pip install matplotlib)")
COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")


@dataclass(frozen=True)
class Chart:
    name: str  # a file name stem: the PNG of --report-dir is <name>.png
    title: str
    caption: str
    svg: str
    png: bytes


def require_matplotlib() -> None:
    """Raise RuntimeMissingError (with the pip command) when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeMissingError(MISSING) from None


def _figure(width: float, height: float, ncols: int = 1, **kwargs):
    require_matplotlib()
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(1, ncols, squeeze=False, **kwargs)[0]
    return figure, axes


def _chart(figure, name: str, title: str, caption: str) -> Chart:
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "sepconv"}):  # text stays text
        svg, png = io.StringIO(), io.BytesIO()
        figure.savefig(svg, format="svg", metadata={"Date": None})
        figure.savefig(png, format="png", dpi=110, metadata={"Software": None})
    text = svg.getvalue()
    return Chart(name, title, caption, text[text.index("<svg"):], png.getvalue())


# -------------------------------------------------------------------------------------------------- convert-model

def sensitivity_heatmap(run: dict, name: str) -> Chart | None:
    """Points lost per layer and K (the budget's measurement), the chosen K outlined."""
    budget = (run.get("recovery") or {}).get("budget")
    if not budget or not budget.get("layers"):
        return None
    import numpy as np

    layers = budget["layers"]
    columns = choice_columns([[c["rank"] for c in layer["candidates"]] for layer in layers])
    drops = np.full((len(layers), len(columns)), np.nan)
    picked = [[pick([c["rank"] for c in layer["candidates"]]) for _, pick in columns] for layer in layers]
    for i, layer in enumerate(layers):
        by_choice = {str(c["rank"]): c["drop"] for c in layer["candidates"]}
        for j, found in enumerate(picked[i]):
            if found is not None:
                drops[i, j] = by_choice[str(found)]
    figure, (axis,) = _figure(1.6 + 0.9 * len(columns), 1.2 + 0.4 * len(layers))
    limit = max(1.0, float(np.nanmax(np.abs(drops))) if np.isfinite(drops).any() else 1.0)
    image = axis.imshow(drops, cmap="RdYlGn_r", vmin=-limit, vmax=limit, aspect="auto")
    for i, layer in enumerate(layers):
        for j, found in enumerate(picked[i]):
            if np.isfinite(drops[i, j]):
                r = spatial_rank(found)
                axis.text(j, i, f"{drops[i, j]:+.2f}" + (f"\nr={r}" if r else ""), ha="center", va="center",
                          fontsize=7 if r else 8)
        chosen = budget["ranks"].get(layer["path"])
        if chosen is not None and chosen in picked[i]:
            j = picked[i].index(chosen)
            axis.add_patch(_rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.5))
    axis.set_xticks(range(len(columns)), [header for header, _ in columns])
    axis.set_yticks(range(len(layers)), [layer["path"] for layer in layers])
    figure.colorbar(image, ax=axis, label=f"points of {budget['metric']} lost")
    caption = (f"Points of {budget['metric']} lost when only that layer is separated at K (depthwise-separable) or "
               f"r (spatially separable) (on {budget['samples']} validation samples); outlined: the form and rank "
               f"chosen for a budget of {budget['max_drop']} points "
               f"(predicted {budget['predicted_drop']:.2f}, measured after recovery "
               f"{budget.get('measured_drop', float('nan')):.2f}). Layers kept as they are have no outline.")
    return _chart(figure, name, "Per-layer sensitivity and the chosen form and rank", caption)


def _rectangle(*args, **kwargs):
    from matplotlib.patches import Rectangle

    return Rectangle(*args, **kwargs)


def layer_costs(run: dict, name: str) -> Chart | None:
    """Parameters and MACs per layer, before and after separation (log scale)."""
    layers = [row for row in (run.get("separation") or {}).get("layers", []) if row.get("params_before")]
    if not layers:
        return None
    import numpy as np

    figure, axes = _figure(10, 1.0 + 0.35 * len(layers), ncols=2, sharey=True)
    y = np.arange(len(layers))
    for axis, key, label in ((axes[0], "params", "parameters"), (axes[1], "macs", "MACs per sample")):
        before = [row.get(f"{key}_before") or 0 for row in layers]
        after = [row.get(f"{key}_after") or 0 for row in layers]
        axis.barh(y - 0.2, before, 0.4, label="original", color=COLORS[7])
        axis.barh(y + 0.2, after, 0.4, label="separated", color=COLORS[0])
        _log_axis(axis.xaxis)
        smallest = min([v for v in before + after if v > 0] or [1])
        axis.set_xlim(left=10 ** np.floor(np.log10(smallest)))  # bars start at a power of ten, not at the data
        axis.set_xlabel(f"{label} (log scale)")
        axis.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncols=2, fontsize=8, frameon=False)  # off the bars
    axes[0].set_yticks(y, [_layer_label(row) for row in layers])
    axes[0].invert_yaxis()
    totals = run["separation"].get("totals", {})
    caption = (f"Per convolution layer; model parameters {totals.get('model_params_before', 0):,} -> "
               f"{totals.get('model_params_after', 0):,} ({totals.get('params_ratio', 1):.2f}x smaller). "
               f"A layer kept as it is has the same bar twice.")
    return _chart(figure, name, "Parameters and MACs per layer, before and after", caption)


def _layer_label(row: dict) -> str:
    if not row.get("rank"):
        return f"{row['path']} ({row['status']})"
    return f"{row['path']} ({'spatial r' if row.get('form') == SPATIAL else 'K'}={row['rank']})"


def stage_scores(run: dict, name: str) -> Chart | None:
    """Validation accuracy, test accuracy and agreement with the original after each recovery stage (and each
    further output's validation agreement, for a model with several outputs)."""
    stages = (run.get("recovery") or {}).get("stages")
    if not stages:
        return None
    import numpy as np

    series = [("validation accuracy", "val_accuracy"), ("validation agreement", "val_agreement"),
              ("test accuracy", "accuracy"), ("test agreement w/ original", "agreement")]
    series = [(label, key) for label, key in series if any(s.get(key) is not None for s in stages)]
    heads = max((len(s.get("val_outputs") or ()) for s in stages), default=0)  # a model with several outputs
    series += [(f"validation agreement, output {head}", head) for head in range(1, heads)]
    figure, (axis,) = _figure(max(6, 1.4 * len(stages) + 2), 3.6)
    x = np.arange(len(stages))
    width = 0.8 / len(series)
    for index, (label, key) in enumerate(series):
        values = [100 * ((s.get("val_outputs") or [0] * heads)[key] if isinstance(key, int) else (s.get(key) or 0))
                  for s in stages]
        bars = axis.bar(x + (index - (len(series) - 1) / 2) * width, values, width, label=label,
                        color=COLORS[index % len(COLORS)])
        for bar, stage in zip(bars, stages):
            if not stage["kept"]:
                bar.set_hatch("//")
                bar.set_alpha(0.45)
    axis.set_xticks(x, [s["name"] + ("" if s["kept"] else "\n(rejected)") for s in stages])
    axis.set_ylabel("%")
    axis.set_ylim(0, 100)  # shares: never above 100%
    axis.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=min(len(series), 3),
                frameon=False)  # above the axes, off the bars
    rejected = "; ".join(f"{s['name']}: {s['note']}" for s in stages if not s["kept"] and s.get("note"))
    judged = "; ".join(f"{s['name']}: {s['note']}" for s in stages if s["kept"] and s.get("note"))
    caption = ("Each recovery stage is kept only if the validation score does not fall"
               + (", unless it has a rule of its own" if judged else "") + "; test figures only report. "
               "Hatched: rejected stages." + (f" {rejected}." if rejected else "")
               + (f" Kept by its own rule: {judged}." if judged else ""))
    return _chart(figure, name, "Accuracy and agreement after each stage", caption)


FINE_TUNING_PASSES = (("finetune", "fine-tuned"), ("finetune_frozen", "fine-tuned, BatchNorm frozen"),
                      ("finetune_int8", "fine-tuned under int8 noise"))  # recovery keys, and their stages' names


def fine_tuning(run: dict, name: str) -> Chart | None:
    """Each fine-tuning pass epoch by epoch: the monitored validation score (and its training twin), the start it
    had to beat and the epoch kept (early stopping on validation)."""
    recovery = run.get("recovery") or {}
    passes = [(label, recovery[key]) for key, label in FINE_TUNING_PASSES
              if recovery.get(key) and (recovery[key].get("history") or {}).get(recovery[key].get("monitor"))]
    if not passes:
        return None
    from matplotlib.ticker import MaxNLocator

    figure, axes = _figure(max(6.0, 4.2 * len(passes)), 3.4, ncols=len(passes))
    for axis, (label, record) in zip(axes, passes):
        monitor = record["monitor"]
        share = not monitor.endswith("loss")  # accuracy / agreement: shown in %
        scale = 100 if share else 1
        values = record["history"][monitor]
        first = record["epochs_run"] - len(values) + 1  # a resumed run's history holds its own epochs only
        epochs = list(range(first, first + len(values)))
        axis.plot(epochs, [scale * v for v in values], marker="o", color=COLORS[0], label=monitor)
        training = record["history"].get(monitor.removeprefix("val_"))
        if training and len(training) == len(values):
            axis.plot(epochs, [scale * v for v in training], color=COLORS[1], linewidth=1, alpha=0.7,
                      label=monitor.removeprefix("val_") + " (training)")
        if record.get("initial_value") is not None:
            axis.axhline(scale * record["initial_value"], color=COLORS[7], linestyle="--", linewidth=1,
                         label="before the pass")
        if record.get("best_value") is not None:
            axis.plot([record["best_epoch"]], [scale * record["best_value"]], marker="*", markersize=14,
                      color=COLORS[3], linestyle="none",
                      label="kept: the start" if record["best_epoch"] == 0 else f"kept: epoch {record['best_epoch']}")
        axis.set_title(f"{label} ({record.get('mode', '')})".replace(" ()", ""), fontsize=9)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(f"{monitor} (%)" if share else monitor)
        axis.legend(fontsize=7, frameon=False)
    caption = ("Each fine-tuning pass, epoch by epoch, on the validation images: the weights of the best epoch are "
               "kept, the start's when no epoch beats it (dashed). Whether the pass is kept at all is the stage "
               "chart's decision.")
    return _chart(figure, name, "Fine-tuning, epoch by epoch", caption)


def artifact_sizes(run: dict, name: str) -> Chart | None:
    """The original file's size next to each artifact's, with its verification verdict."""
    artifacts = run.get("artifacts") or []
    if not artifacts:
        return None
    source = run.get("source") or {}
    labels = [f"original\n{Path(source.get('path', 'model')).name}"] if source.get("bytes") else []
    sizes = [source["bytes"] / 1024] if source.get("bytes") else []
    colors = [COLORS[7]] if sizes else []
    for artifact in artifacts:
        passed = artifact["verification"].get("passed")
        labels.append(f"{Path(artifact['path']).name}\n{artifact['format']} {artifact['quantize']}")
        sizes.append(artifact["bytes"] / 1024)
        colors.append(COLORS[2] if passed else COLORS[3])
    figure, (axis,) = _figure(max(5, 1.8 * len(sizes) + 1), 3.4)
    bars = axis.bar(range(len(sizes)), sizes, color=colors)
    axis.bar_label(bars, [f"{s:,.0f} KiB" for s in sizes], fontsize=8)
    axis.set_xticks(range(len(sizes)), labels, fontsize=8)
    axis.set_ylabel("KiB")
    return _chart(figure, name, "Artifact sizes", "Green: verification passed against the Keras model; red: failed.")


def quantization_errors(run: dict, name: str) -> Chart | None:
    """Each layer's int8 error, alone and with every layer before it quantized too, for the artifacts whose int8 was
    diagnosed (a failed first attempt, or --explain-quantization), and for those that --quantize auto shipped in
    another mode when int8 failed (the int8's diagnosis, kept in its quantize_fallback); one panel per such
    artifact."""
    diagnosed = []
    for artifact in run.get("artifacts") or []:
        own = (artifact.get("quantization") or {}).get("diagnosis") or {}
        failed = (artifact.get("quantize_fallback") or {}).get("int8_diagnosis") or {}
        if own.get("layers"):
            diagnosed.append((artifact, own, ""))
        elif failed.get("layers"):
            mode = {"none": "float32"}.get(artifact.get("quantize"), artifact.get("quantize"))
            diagnosed.append((artifact, failed, f"; int8 failed, shipped {mode}"))
    if not diagnosed:
        return None
    import numpy as np

    most = max(len(diagnosis["layers"]) for _, diagnosis, _ in diagnosed)
    figure, axes = _figure(5.5 * len(diagnosed) + 2, 1.2 + 0.22 * most, ncols=len(diagnosed))
    for axis, (artifact, diagnosis, shipped) in zip(axes, diagnosed):
        rows = sorted(diagnosis["layers"], key=lambda row: row["order"])
        y = np.arange(len(rows))
        alone = [max(row["relative_error"], row.get("channel_relative_error") or 0.0) * 100 for row in rows]
        together = [(row.get("accumulated_relative_error") or np.nan) * 100 for row in rows]
        axis.barh(y - 0.2, alone, 0.4, label="this layer alone", color=COLORS[0])
        axis.barh(y + 0.2, together, 0.4, label="all layers up to it", color=COLORS[1])
        axis.axvline(diagnosis["alarm_relative_error"] * 100, color=COLORS[3], linestyle="--", linewidth=1,
                     label=f"alarm ({diagnosis['alarm_relative_error']:.0%})")
        axis.set_xscale("log")
        axis.set_yticks(y, [_quantized_layer(row) for row in rows], fontsize=7)
        axis.invert_yaxis()
        axis.set_xlabel("relative error, % of the float output's spread (log scale)")
        axis.set_title(f"{Path(artifact['path']).name} ({diagnosis['format']}{shipped})", fontsize=9)
        axis.legend(fontsize=7, loc="lower right")
    caption = ("Per quantized op, in graph order, named by its Keras layer: its int8 output error as RMSE over the "
               "float output's spread (the worse of the whole tensor and the mean over channels), alone (the op fed "
               "the int8 model's own input) and together (the int8 model's tensor against the float model's, every "
               "earlier error included). Where the bars of 'together' grow while 'alone' stays low, the error "
               "accumulates and no single layer is to blame.")
    return _chart(figure, name, "Where int8 loses precision", caption)


def _quantized_layer(row: dict) -> str:
    keras = row.get("keras") or []
    name = keras[0].rsplit("/", 1)[-1] if keras else row["layer"]
    return (name if len(name) <= 32 else name[:29] + "...") + f" ({row['op']})"


def budget_tradeoff(runs: list[tuple[str, dict]], name: str) -> Chart | None:
    """Accuracy versus parameters of the separable layers for every K measured, as the budget predicts it (the
    baseline less the sum of each layer's drop), one line per run; the chosen plan marked."""
    plotted = [(label, run["recovery"]["budget"]) for label, run in runs
               if (run.get("recovery") or {}).get("budget") and run["recovery"]["budget"].get("layers")]
    if not plotted:
        return None
    figure, (axis,) = _figure(7, 4)
    scores = []
    for index, (label, budget) in enumerate(plotted):
        points = tradeoff_points(budget)
        color = COLORS[index % len(COLORS)]
        axis.plot([p[1] for p in points], [p[2] for p in points], "o-", color=color, label=label)
        scores += [p[2] for p in points] + [budget["baseline"] - budget["predicted_drop"]]
        for number, (k, params, score) in enumerate(points):  # labels alternate above and below: never in one row
            axis.annotate(k, (params, score), textcoords="offset points", xytext=(4, 6 if number % 2 else -12),
                          fontsize=8)
        chosen = sum(_chosen(layer, budget["ranks"]).get("params", 0) for layer in budget["layers"])
        axis.plot([chosen], [budget["baseline"] - budget["predicted_drop"]], "*", markersize=14, color=color,
                  markeredgecolor="black", label=f"{label}: chosen per layer (predicted)")
        if budget.get("measured_drop") is not None:
            axis.plot([chosen], [budget["baseline"] - budget["measured_drop"]], "D", markersize=8, color=color,
                      markeredgecolor="black", label=f"{label}: chosen, measured after recovery")
    _log_axis(axis.xaxis)
    lowest = min(scores)
    margin = max(0.5, 0.1 * (100.0 - lowest))
    axis.set_ylim(max(0.0, lowest - margin), 100.0 + margin / 4)  # zoomed to the data, a share: never past 100%
    axis.set_xlabel("parameters of the separable layers (log scale)")
    axis.set_ylabel(f"{plotted[0][1]['metric']} on the validation data (%)")
    axis.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)  # above the axes, off the line
    caption = ("The budget's measurements summed: the same K on every layer (keep: the layers as they are), the "
               "score predicted as the original's less the sum of each layer's drop, on the validation samples; the "
               "star is the per-layer choice as predicted, the diamond the same model measured after recovery.")
    return _chart(figure, name, "Accuracy versus size for the K choices measured", caption)


def tradeoff_points(budget: dict) -> list[tuple[str, int, float]]:
    """(K label, parameters of the separable layers, predicted score in %) for every K measured on all layers."""
    ranks = sorted({c["rank"] for layer in budget["layers"] for c in layer["candidates"]}, key=choice_order)
    points = []
    for rank in ranks:
        params, drop = 0, 0.0
        for layer in budget["layers"]:
            found = [c for c in layer["candidates"] if c["rank"] == rank] or [_keep(layer)]
            params += found[0]["params"]
            drop += found[0]["drop"]
        points.append(("keep" if rank == 0 else choice_label(rank), params, budget["baseline"] - drop))
    return sorted(points, key=lambda point: point[1])


def _keep(layer: dict) -> dict:
    return [c for c in layer["candidates"] if c["rank"] == 0][0] if any(
        c["rank"] == 0 for c in layer["candidates"]) else max(layer["candidates"], key=lambda c: c["params"])


def _chosen(layer: dict, ranks: dict) -> dict:
    rank = ranks.get(layer["path"], 0)
    return next((c for c in layer["candidates"] if c["rank"] == rank), _keep(layer))


# ---------------------------------------------------------------------------------------- bench-model, deploy-model

def latency_distributions(benches: list[tuple[str, dict]], name: str) -> Chart | None:
    """Box plots of every timed run's latency, per model and thread count; one panel per host or run."""
    benches = [(label, b) for label, b in benches if any(c.get("samples_ms") for c in b["cases"])]
    if not benches:
        return None
    widest = max(len(b["cases"]) for _, b in benches)
    figure, axes = _figure(max(6, (0.9 * widest + 1.5) * len(benches)), 4.2, ncols=len(benches))
    for axis, (label, bench) in zip(axes, benches):
        cases = [c for c in bench["cases"] if c.get("samples_ms")]
        models = list(dict.fromkeys(c["model"] for c in cases))
        boxes = axis.boxplot([c["samples_ms"] for c in cases], patch_artist=True, showfliers=True, whis=(1, 99),
                             flierprops={"markersize": 2, "alpha": 0.4}, medianprops={"color": "black"})
        for patch, case in zip(boxes["boxes"], cases):
            patch.set_facecolor(COLORS[models.index(case["model"]) % len(COLORS)])
        axis.set_xticks(range(1, len(cases) + 1), [f"{c['model']}\n{c['threads']} thr" for c in cases],
                        rotation=30, ha="right", fontsize=7)
        _log_axis(axis.yaxis)
        axis.set_ylabel("latency per inference (ms, log scale)")
        axis.set_title(label, fontsize=9)
    caption = ("Every timed run: the box spans p25 to p75 with the median inside, whiskers p1 and p99, dots beyond. "
               "Hosts and runs side by side, each on its own scale.")
    return _chart(figure, name, "Latency distributions per model and thread count", caption)


def speedups(benches: list[tuple[str, dict]], name: str) -> Chart | None:
    """The p50 speed-up of each model against the first one at the same thread count, per host and thread count."""
    groups = [(f"{label}, {t} thr" if len(benches) > 1 else f"{t} thread{'s' * (t > 1)}",
               {c["model"]: c.get("speedup") for c in bench["cases"] if c["threads"] == t})
              for label, bench in benches for t in dict.fromkeys(c["threads"] for c in bench["cases"])]
    models = list(dict.fromkeys(m for _, values in groups for m in values))
    if not models:
        return None
    import numpy as np

    figure, (axis,) = _figure(max(6, 0.7 * len(models) * len(groups) + 2), 3.8)
    x = np.arange(len(models))
    width = 0.8 / len(groups)
    for index, (label, values) in enumerate(groups):
        heights = [values.get(m) or 0 for m in models]
        bars = axis.bar(x + (index - (len(groups) - 1) / 2) * width, heights, width, label=label,
                        color=COLORS[index % len(COLORS)])
        axis.bar_label(bars, [f"{h:.2f}x" if h else "" for h in heights], fontsize=7)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xticks(x, models, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("speed-up (p50 of the first model / p50)")
    axis.legend(fontsize=8)
    return _chart(figure, name, "Speed-up against the first model",
                  "p50 latency of the first model divided by each model's, at the same thread count and host.")


def accuracy_latency(benches: list[tuple[str, dict]], name: str) -> Chart | None:
    """Top-1 accuracy against p50 latency (at each model's fastest thread count) and against size, per model and
    host (when the input had labels)."""
    fastest = {}
    for label, bench in benches:
        for case in bench["cases"]:
            key = (label, case["model"])
            if case.get("accuracy") and (key not in fastest or
                                         case["latency_ms"]["p50"] < fastest[key]["latency_ms"]["p50"]):
                fastest[key] = case
    if not fastest:
        return None
    figure, axes = _figure(12, 4.2, ncols=2, sharey=True)
    hosts = list(dict.fromkeys(label for label, _ in fastest))
    models = list(dict.fromkeys(model for _, model in fastest))
    markers = "os^Dv<>p"
    for (label, model), case in fastest.items():
        style = {"color": COLORS[models.index(model) % len(COLORS)], "marker": markers[hosts.index(label) % 8],
                 "linestyle": "none", "markersize": 8, "alpha": 0.85}
        y = 100 * case["accuracy"]["top1"]
        axes[0].plot(case["latency_ms"]["p50"], y, label=model if len(hosts) == 1 else f"{model} on {label}", **style)
        axes[1].plot(case["artifact"]["bytes"] / 1024, y, **style)
    _log_axis(axes[0].xaxis)
    _log_axis(axes[1].xaxis)
    axes[0].set_xlabel("p50 latency (ms, log scale), fastest thread count")
    axes[1].set_xlabel("artifact size (KiB, log scale)")
    axes[0].set_ylabel("top-1 accuracy (%)")
    figure.legend(loc="outside right upper", fontsize=7)
    return _chart(figure, name, "Accuracy versus latency and size",
                  "Top-1 accuracy on the labelled --input against p50 latency (at the model's fastest thread count) "
                  "and file size; a colour per model, a marker per host.")


def _log_axis(axis) -> None:
    """A log scale whose tick labels read as plain, compact numbers (0.01, 20, 3k, 50M), never run together: ticks
    at 1-2-5 steps on a range under two decades, at powers of ten (at most about eight of them) beyond."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if axis is axis.axes.xaxis:
        axis.axes.set_xscale("log")
    else:
        axis.axes.set_yscale("log")
    low, high = sorted(abs(v) for v in axis.get_data_interval())
    decades = math.log10(high / low) if low > 0 and math.isfinite(high / low) else 10.0
    axis.set_major_locator(LogLocator(subs=(1, 2, 5) if decades < 2 else (1,), numticks=9))
    axis.set_major_formatter(FuncFormatter(lambda value, _: _compact(value)))
    axis.set_minor_formatter(NullFormatter())


def _compact(value: float) -> str:
    """20, 3k, 1.5M, 2G; 0.01 stays 0.01."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:g}{suffix}"
    return f"{value:g}"


def memory(benches: list[tuple[str, dict]], name: str) -> Chart | None:
    """Resident memory each model added when loaded, per host or run."""
    rows = [(label, c) for label, bench in benches for c in bench["cases"] if _memory_mib(c) is not None]
    if not rows:
        return None
    seen = {}
    for label, case in rows:  # one bar per model and host: memory does not depend on the thread count much
        seen.setdefault((label, case["model"]), _memory_mib(case))
    figure, (axis,) = _figure(max(6, 0.6 * len(seen) + 2), 3.4)
    hosts = list(dict.fromkeys(label for label, _ in seen))
    bars = axis.bar(range(len(seen)), list(seen.values()),
                    color=[COLORS[hosts.index(h) % len(COLORS)] for h, _ in seen])
    axis.bar_label(bars, [f"{v:.1f}" for v in seen.values()], fontsize=7)
    axis.set_xticks(range(len(seen)), [m if len(hosts) == 1 else f"{h}\n{m}" for h, m in seen], rotation=20,
                    ha="right", fontsize=7)
    axis.set_ylabel("MiB")
    return _chart(figure, name, "Memory per model", "Resident memory the process grew by while loading the model "
                  "and running it once (its first thread count; /proc/self/status).")


def time_shares(benches: list[tuple[str, dict]], name: str, limit: int = 10) -> Chart | None:
    """Where the time goes (bench-model --profile): per Keras layer, its share of the time beside its share of the
    MACs, one panel per profiled case (the original beside the separated model when both were profiled)."""
    cases = [(label, case) for label, bench in benches for case in bench["cases"] if case.get("profile")]
    if not cases:
        return None
    import numpy as np

    cases = cases[:6]  # a page, not a wall: the first six profiled cases
    height = 1.0 + 0.3 * min(limit + 1, max(len(case["profile"]["layers"]) for _, case in cases))
    figure, axes = _figure(4.2 * len(cases), height, ncols=len(cases))
    for axis, (label, case) in zip(axes, cases):
        layers = case["profile"]["layers"][:limit]
        y = np.arange(len(layers))
        axis.barh(y - 0.2, [layer["share"] * 100 for layer in layers], 0.4, label="time", color=COLORS[1])
        axis.barh(y + 0.2, [(layer["mac_share"] or 0) * 100 for layer in layers], 0.4, label="MACs",
                  color=COLORS[7])
        axis.set_yticks(y, [layer["layer"] for layer in layers], fontsize=7)
        axis.invert_yaxis()
        axis.set_xlim(0, 100)
        axis.set_xlabel("% of the model")
        multi = len({lab for lab, _ in cases}) > 1
        axis.set_title(f"{(label + ': ') if multi else ''}{case['model']} @ {case['threads']}t", fontsize=8)
        axis.legend(fontsize=7, loc="lower right", frameon=False)
    caption = ("Each layer's share of the time (bench-model --profile: ONNX Runtime's profiler, or a .tflite's "
               "prefixes timed one after another) beside its share of the multiply-accumulates; a layer whose time "
               "share is far above its MAC share runs its operations slowly (depthwise convolutions on CPUs).")
    return _chart(figure, name, "Where the time goes, per layer", caption)


def _memory_mib(case: dict):
    memory = case.get("memory") or {}
    parts = [memory.get("load_growth_bytes"), memory.get("first_run_growth_bytes")]
    return None if parts[0] is None else sum(p or 0 for p in parts) / 2 ** 20
