"""Per-layer latency tables measured where the model will run (the table that latency_choice.py chooses with).

For each layer the accuracy budget measured and each of its candidates (every K, and keeping it), a single-layer
model - an input of the layer's input shape, the layer as it is or as `separate` rewrites it at that K - is exported
as the run exports (format, quantization, I/O type) and timed with bench-model's harness (sepconv.deploy.timing) at the
run's thread count and XNNPACK setting, on this machine or on a device over deploy-model's SSH connection. The whole
original model and the model with every layer at its least K, exported the same way, are timed in the same
interleaved run: a plan's predicted latency is the table's sum for it on the line through those two
(latency_choice.WholeModel), and a target speed-up is against the original.

Latency depends on a layer's shapes, configuration and the quantization mode, not on its weights: the single-layer
models are calibrated on random inputs, and measurements are cached per device and runtime version (a JSON file per
device under `cache_dir`, default ~/.cache/sepconv/latency), keyed by the layer's configuration and input shape, K,
the export options, threads and XNNPACK; a second run on the same model and device times nothing.

Nothing cached is trusted blindly: a cache file that is not the cache's JSON is set aside (NAME.damaged) with one
line and rebuilt; an entry that is not a finite number of milliseconds in (MIN_MS, MAX_MS) is dropped and timed
again; and a cached single-layer entry slower than PLAUSIBLE times the whole original model it is part of (a timing
taken on a busy machine does that) is timed again, with the two whole models, in one fresh run. The plan the table
chose is then confirmed by timing the artifact itself (export/speed.py); a prediction that the artifact misses by
more than half sets the device's cache aside (`set_aside`) so that the next run times everything again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sepconv.convert.errors import InvalidOptionError
from sepconv.convert.export.onnx import OnnxOptions
from sepconv.convert.export.targets import registered_targets, target_of_exporter
from sepconv.convert.export.tflite import TFLiteOptions
from sepconv.convert.graph import leaf_layers
from sepconv.convert.recovery.budget import KEEP, plan_params
from sepconv.convert.recovery.latency_choice import (MIN_SPREAD, LatencyTarget, WholeModel, choose_for_latency,
                                                     rank_key)
from sepconv.convert.separation.policy import DEPTHWISE, SeparationOptions, choice_label, parse_choice
from sepconv.deploy.files import temporary_folder
from sepconv.deploy.timing import TimingOptions, describe_xnnpack, identify, time_artifacts

CALIBRATION_SAMPLES = 8  # random inputs that calibrate a single-layer int8 model: its ranges do not change its speed
MIN_MS, MAX_MS = 1e-4, 1e6  # a p50 outside (0.1 us, 17 min) is not a measurement of a model
PLAUSIBLE = 1.5  # a single layer, timed alone, cannot take longer than this times the whole model it is part of
ORIGINAL = "(the original model)"
LEAST = "(every layer at its least K)"


@dataclass(frozen=True)
class LatencyOptions:
    """target: a latency or speed-up the plan must reach (none: the fastest plan within the accuracy budget).
    where: None for this machine, or an SSH target as deploy-model takes it. timing: threads, XNNPACK, how long each
    case is timed, the SSH / device set-up. export: how the run exports (TFLiteOptions or OnnxOptions; the pipeline
    sets it from its first artifact). cache_dir: where measurements are kept (None: ~/.cache/sepconv/latency)."""

    target: LatencyTarget = field(default_factory=LatencyTarget)
    where: str | None = None
    timing: TimingOptions = field(default_factory=TimingOptions)
    export: TFLiteOptions | OnnxOptions = field(default_factory=lambda: TFLiteOptions(quantize="int8"))
    cache_dir: str | None = None

    def __post_init__(self):
        if not _timed(target_of_exporter(self.export)):
            allowed = " or ".join(f"{t.exporter_class.__name__}(...)" for t in registered_targets().values()
                                  if _timed(t))
            raise InvalidOptionError(f"Unrecognized export={self.export!r}. Use {allowed}")
        if self.where is not None and (not isinstance(self.where, str) or not self.where.strip()):
            raise InvalidOptionError(f"Unrecognized where={self.where!r}. Use None (this machine) or a host such as "
                                     f"pi@raspberrypi.local")

    @property
    def export_target(self):
        """The registered target (targets.py) whose exporter `export` configures."""
        return target_of_exporter(self.export)

    @property
    def suffix(self) -> str:
        return self.export_target.extension

    def describe(self) -> dict:
        return {"target": asdict(self.target), "where": self.where or "local", "threads": self.timing.threads,
                "xnnpack": self.timing.xnnpack, "format": self.suffix[1:], "export": asdict(self.export)}


def measure_table(model, layers, options: LatencyOptions, *, progress=None) -> dict:
    """The latency table of `layers` (budget.LayerSensitivity: each layer's path and candidate K) of `model`:
    {layers: {path: {"keep": ms, "1": ms, ...}}, forms: {path: {"2": form, ...}}, original_ms, raw_keep_sum_ms,
    whole_model (latency_choice.WholeModel as a dict, with the `least` plan, its `least_ms` and `least_sum_ms`), where,
    device, runtime, threads, xnnpack, format, quantize, measured, cached, seconds}. A K above 1 is timed in both
    separable forms (export/forms.py) and its entry is the faster one's, named in `forms`."""
    from sepconv.convert.export.forms import STANDARD, TILED

    say = progress or (lambda stage, message: None)
    started = time.perf_counter()
    leaves = _leaves(model)
    least = {layer.path: min((c for c in layer.candidates if c.rank != KEEP), key=lambda c: c.params).rank
             for layer in layers if any(c.rank != KEEP for c in layer.candidates)}
    wanted = [(ORIGINAL, KEEP, STANDARD)] + [(layer.path, c.rank, form) for layer in layers for c in layer.candidates
                                             for form in ((STANDARD, TILED) if has_forms(c.rank) else (STANDARD,))]
    specs = {path: _spec(leaves[path]) if path != ORIGINAL else _model_spec(model) for path, _, _ in wanted}
    entries = [_Entry(_form_spec(specs[path], form), rank, path + ("" if form == STANDARD else f" {form}"),
                      _builder(model, leaves, path, rank, form))
               for path, rank, form in wanted]
    if least:
        entries.append(_Entry(json.dumps({"least": least, "model": json.loads(specs[ORIGINAL])}, sort_keys=True),
                              KEEP, LEAST, lambda: _least_model(model, least)))
    pair = (0, len(wanted)) if least else ()  # the two whole models: timed in one run, or neither is read from the cache
    measured = _time_entries(entries, options, say, "single-layer and whole models", together=pair)
    doubtful = [index for index in measured.cached if index not in pair and index
                and measured.ms[index] > PLAUSIBLE * measured.ms[0]]
    if doubtful:
        first = doubtful[0]
        say("latency", f"{len(doubtful)} cached single-layer timing(s) exceed {PLAUSIBLE}x the whole model's "
                       f"{measured.ms[0]:.4f} ms (e.g. {entries[first].what}: {measured.ms[first]:.4f} ms): timing "
                       f"them and the whole models again")
        again_at = sorted(set(doubtful) | {0} | set(pair))
        again = _time_entries([entries[i] for i in again_at], options, say, "doubtful entries", fresh=True)
        for index, ms in zip(again_at, again.ms):
            measured.ms[index] = ms
        measured = measured._replace(timed=measured.timed + again.timed, cached=measured.cached - set(again_at))
    table, forms = {}, {}
    for (path, rank, form), ms in zip(wanted, measured.ms):
        if path == ORIGINAL:
            continue
        row, key = table.setdefault(path, {}), rank_key(rank)
        if key not in row or ms < row[key]:
            row[key] = round(ms, 5)
            if has_forms(rank):
                forms.setdefault(path, {})[key] = form
    identity = measured.identity
    original_ms = round(measured.ms[0], 5)
    keep_sum = sum(row["keep"] for row in table.values())
    least_sum = sum(row[rank_key(least.get(path, KEEP))] for path, row in table.items())
    least_ms = round(measured.ms[len(wanted)], 5) if least else None
    lowest = sum(min(row.values()) for row in table.values())
    whole = WholeModel.fit(keep_sum, original_ms, least_sum, least_ms, least_sum_ms=lowest)
    timed, cached = measured.timed, len(entries) - measured.timed
    if least and whole.method != "fitted" and keep_sum - least_sum > MIN_SPREAD * keep_sum:
        say("latency", f"the whole model at every layer's least K took {least_ms:.4f} ms against the original's "
                       f"{original_ms:.4f} ms where the table says {least_sum:.4f} against {keep_sum:.4f} ms: "
                       f"timing both again")
        again = _time_entries([entries[0], entries[-1]], options, say, "whole models", fresh=True)
        original_ms, least_ms = (round(ms, 5) for ms in again.ms)
        timed += again.timed
        cached -= sum(index in measured.cached for index in (0, len(entries) - 1))  # timed afresh: not cached now
        whole = WholeModel.fit(keep_sum, original_ms, least_sum, least_ms, least_sum_ms=lowest)
    return {"layers": table, "forms": forms, "original_ms": original_ms, "raw_keep_sum_ms": round(keep_sum, 5),
            "whole_model": dict(asdict(whole), least=least, least_ms=least_ms, least_sum_ms=round(least_sum, 5)),
            "where": identity["where"], "device": identity["device"], "runtime": identity["runtime"],
            "threads": options.timing.threads, "xnnpack": identity["xnnpack"], "format": options.suffix[1:],
            "quantize": options.export.quantize, "measured": timed, "cached": cached,
            "seconds": round(time.perf_counter() - started, 1)}


def has_forms(rank) -> bool:
    """A choice whose layer has two equivalent graph forms (export/forms.py): the depthwise form at K above 1."""
    form, value = parse_choice(rank)
    return form == DEPTHWISE and value > 1


def whole_model(table: dict) -> WholeModel | None:
    """The table's WholeModel (None for a table measured before it was kept)."""
    found = table.get("whole_model")
    return None if not found else WholeModel(scale=found["scale"], rest_ms=found["rest_ms"], method=found["method"])


def _least_model(model, least: dict):
    """`model` with every layer of `least` separated at its K (the SVD start, unrefined: weights do not change speed)."""
    from sepconv.convert.separation.walk import separate_with

    separated, _ = separate_with(model, SeparationOptions(ranks=least, include=tuple(least)))
    return separated


def fastest_forms(model, options: LatencyOptions, *, progress=None) -> dict:
    """The faster equivalent form (export/forms.py) of every SeparableConv2D of `model` with a depth multiplier above
    1, each form timed as a single-layer model exported as `options.export` says, where `options` say (cached like
    the table): {"forms": {path: form}, "ms": {path: {form: ms}}, "changed": ((path, form) of those not in the
    standard form: what export options' `forms` take), where, format, quantize, measured (not cached), seconds} ({}
    when the model has no such layer). A tie keeps the standard form."""
    import keras

    from sepconv.convert.export.forms import FORMS, STANDARD

    started = time.perf_counter()
    layers = [(path, layer) for path, layer in leaf_layers(model)
              if isinstance(layer, keras.layers.SeparableConv2D) and layer.depth_multiplier > 1]
    if not layers:
        return {}
    wanted = [(path, layer, form) for path, layer in layers for form in FORMS]
    entries = [_Entry(_form_spec(_spec(layer), form), KEEP, f"{path} as {form}",
                      _form_builder(layer, form)) for path, layer, form in wanted]
    say = progress or (lambda stage, message: None)
    measured = _time_entries(entries, options, say, "separable layers in each form")
    ms = {}
    for (path, _, form), value in zip(wanted, measured.ms):
        ms.setdefault(path, {})[form] = round(value, 5)
    chosen = {path: min(FORMS, key=lambda form: (times[form], form != STANDARD)) for path, times in ms.items()}
    return {"forms": chosen, "ms": ms, "changed": tuple(sorted((p, f) for p, f in chosen.items() if f != STANDARD)),
            "where": measured.identity["where"], "format": options.suffix[1:], "quantize": options.export.quantize,
            "measured": measured.timed, "seconds": round(time.perf_counter() - started, 1)}


@dataclass(frozen=True)
class _Entry:
    """One model to time: its cache key's spec and K, a label for the cache, and how to build it (Keras)."""

    spec: str
    rank: int | str  # K, KEEP or "s<r>" (policy.Choice)
    what: str
    build: object


class _Measured(NamedTuple):
    ms: list  # p50 per entry, in order
    identity: dict  # where, device, runtime, xnnpack
    timed: int  # entries not found in the cache
    cached: set = frozenset()  # the indices of entries read from the cache


def _time_entries(entries: list[_Entry], options: LatencyOptions, say, what: str, *, together=(),
                  fresh: bool = False) -> _Measured:
    """The p50 of every entry: from the device's cache, the rest exported and timed in one interleaved run (and
    cached). together: indices timed in one run or not at all (one missing from the cache: all timed); fresh: time
    every entry, whatever the cache has."""
    identity = identify(options.where, options.suffix, options.timing)
    cache = _Cache(options, identity, say)
    found = [None if fresh else cache.get(entry.spec, entry.rank, identity["runtime"]) for entry in entries]
    if any(found[index] is None for index in together):
        for index in together:
            found[index] = None
    missing = [index for index, ms in enumerate(found) if ms is None]
    if missing:
        say("latency", f"timing {len(missing)} {what} ({len(entries) - len(missing)} cached) "
                       f"{'on ' + identity['where'] if options.where else 'on this machine'}, "
                       f"{options.timing.threads} thread(s), {options.export.quantize} {options.suffix[1:]}")
        with temporary_folder("sepconv-latency-") as folder:
            paths = [_export(entries[index].build(), entries[index].what, Path(folder), number, options)
                     for number, index in enumerate(missing)]
            timing = time_artifacts(paths, options.where, options.timing,
                                    progress=lambda message: say("latency", message))
        identity = dict(identity, runtime=timing.runtime, xnnpack=timing.xnnpack, device=timing.device)
        for index, path in zip(missing, paths):
            found[index] = timing.p50_ms[str(path)]
            cache.put(entries[index].spec, entries[index].rank, identity["runtime"], found[index], entries[index].what)
        cache.save(identity)
    return _Measured(found, identity, len(missing), set(range(len(entries))) - set(missing))


def _form_spec(spec: str, form: str) -> str:
    """A cache spec for `form` of a layer (the standard form keeps the spec it always had)."""
    from sepconv.convert.export.forms import STANDARD

    return spec if form == STANDARD else json.dumps({"form": form, "layer": json.loads(spec)}, sort_keys=True)


def _builder(model, leaves: dict, path: str, rank, form: str):
    """How to build the Keras model of one table entry: the whole model, or a single-layer one in `form`."""
    from sepconv.convert.export.forms import with_forms

    def build():
        built = _candidate(model, leaves, path, rank)
        return with_forms(built, {leaves[path].name: form}) if path != ORIGINAL else built

    return build


def _form_builder(layer, form: str):
    """How to build a single-layer model of a SeparableConv2D `layer`, in `form`."""
    from sepconv.convert.export.forms import with_forms

    return lambda: with_forms(single_layer_model(layer, KEEP), {layer.name: form})


def plan_for_latency(model, plan, options: LatencyOptions, *, progress=None):
    """The accuracy budget's plan (budget.BudgetPlan) with each layer's K chosen again for speed on the target: the
    table measured (or read from the cache), then latency.choose_for_latency; the table and the choice are kept in the
    plan's `latency`."""
    from dataclasses import replace


    say = progress or (lambda stage, message: None)
    table = measure_table(model, plan.layers, options, progress=say)
    choice = choose_for_latency(plan.layers, table["layers"], plan.max_drop, original_ms=table["original_ms"],
                                target=options.target, whole=whole_model(table))
    slower = {row.path: list(row.slower) for row in choice.layers if row.slower}
    forms = {path: table["forms"][path][rank_key(rank)] for path, rank in choice.ranks.items() if has_forms(rank)}
    say("latency", f"chosen for speed on {_where(table)}: {choice.ranks or 'no layer'}"
                   + (f" (forms: {forms})" if forms else "") + "; predicted "
                   f"{choice.predicted_ms:.4f} ms against the original's {table['original_ms']:.4f} ms "
                   f"({table['original_ms'] / choice.predicted_ms:.2f}x), drop {choice.predicted_drop:.2f} points"
                   + (f"; target {options.target.describe()}: {choice.target_ms:.4f} ms" if options.target.given
                      else "") + (f"; never chosen, slower than keeping the layer: {slower}" if slower else ""))
    latency = {"options": options.describe(), "table": table, "choice": choice.to_dict(),
               "budget_ranks": plan.ranks, "forms": forms}
    return replace(plan, ranks=choice.ranks, predicted_drop=choice.predicted_drop,
                   params_after=plan_params(plan.layers, choice.ranks), latency=latency)


def for_export(options: LatencyOptions, outputs: list, quantize: str) -> LatencyOptions:
    """`options` timing what the run exports: the first of its outputs that a runtime times, in `quantize` mode.
    outputs: (targets.Target, its options) per output, in order."""
    from dataclasses import replace

    timed = next(((target, given) for target, given in outputs if _timed(target)), None)
    if timed is None:
        names = " or ".join(t.extension for t in registered_targets().values() if _timed(t))
        raise InvalidOptionError(f"latency is measured on a {names} artifact; name one among the outputs")
    target, given = timed
    return replace(options, export=target.export_options(given, quantize))


def _timed(target) -> bool:
    """A target whose artifacts bench-model's harness times (sepconv.deploy's runtimes), with its own options."""
    return target is not None and target.runtime


def _where(table: dict) -> str:
    device = table["device"]
    return (f"{table['where']} ({device.get('pi_model') or device.get('cpu')}, {table['runtime']}, "
            f"{table['threads']} thread(s), {describe_xnnpack(table['xnnpack'])}; "
            f"{table['measured']} timed, {table['cached']} cached)")


def single_layer_model(layer, rank=KEEP):
    """An input of `layer`'s input shape and a copy of the layer (with its weights), separated as `rank` says (K, or
    "s<r>" for the spatial form) unless it is KEEP; None when that separation would not rewrite the layer."""
    import keras

    from sepconv.convert.separation.walk import separate_with

    inputs = keras.Input(tuple(layer.input.shape[1:]), name="input")
    copy = layer.__class__.from_config(layer.get_config())
    model = keras.Model(inputs, copy(inputs))
    copy.set_weights(layer.get_weights())
    if rank == KEEP:
        return model
    separated, report = separate_with(model, SeparationOptions(ranks={layer.name: rank}, include=(layer.name,)))
    return separated if report.separated else None


def _export(model, name: str, folder: Path, number: int, options: LatencyOptions) -> Path:
    """`model` exported as the run exports, calibrated (int8) on random inputs."""
    shape = tuple(model.inputs[0].shape[1:])
    samples = np.random.default_rng(number).standard_normal((CALIBRATION_SAMPLES, *shape)).astype(np.float32)
    path = folder / f"{number:04d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}{options.suffix}"
    options.export_target.export(model, path, options.export, samples)
    return path


def _candidate(model, leaves: dict, path: str, rank):
    """The Keras model to time for one table entry: the whole model, or a single-layer one."""
    if path == ORIGINAL:
        return model
    single = single_layer_model(leaves[path], rank)
    if single is None:
        raise InvalidOptionError(f"{path}: separation at {choice_label(rank)} does not rewrite this layer; it "
                                 f"cannot be a candidate")
    return single


def _leaves(model) -> dict:
    return dict(leaf_layers(model))


def _spec(layer) -> str:
    config = dict(layer.get_config())
    config.pop("name", None)
    return json.dumps({"class": type(layer).__name__, "config": config,
                       "input": [int(d) if d is not None else None for d in layer.input.shape[1:]]},
                      sort_keys=True, default=str)


def _model_spec(model) -> str:
    return json.dumps({"model": json.loads(model.to_json())}, sort_keys=True, default=str)


class _Cache:
    """Measurements of one device (a JSON file per device): {key: {ms, what, measured_at}}. A key covers what the
    latency depends on: the layer (or model) spec, K, the export options, threads, XNNPACK and the runtime version."""

    def __init__(self, options: LatencyOptions, identity: dict, say=None):
        self.path = cache_path(options, identity)
        self.common = {"export": type(options.export).__name__, "options": asdict(options.export),
                       "threads": options.timing.threads, "xnnpack": identity["xnnpack"]}
        self.entries = self._read(say or (lambda stage, message: None))

    def _read(self, say) -> dict:
        """The file's valid entries: {} when there is none yet; a file that is not the cache's JSON is set aside with
        one line, an entry that is not a plausible measurement dropped (both are timed again and rewritten)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as error:
            return self._damaged(say, f"unreadable ({type(error).__name__})")
        try:
            content = json.loads(text)
        except (ValueError, RecursionError):
            return self._damaged(say, "not JSON")
        entries = content.get("entries") if isinstance(content, dict) else None
        if not isinstance(entries, dict):
            return self._damaged(say, "no {\"entries\": {...}} object")
        valid = {key: entry for key, entry in entries.items() if _valid_entry(entry)}
        if len(valid) < len(entries):
            say("latency", f"{self.path}: {len(entries) - len(valid)} of {len(entries)} cached timings are not a "
                           f"number of milliseconds in ({MIN_MS:g}, {MAX_MS:g}): dropped, timed again")
        return valid

    def _damaged(self, say, why: str) -> dict:
        aside = set_aside(self.path, ".damaged")
        say("latency", f"the latency cache {self.path} is damaged ({why}): "
                       + (f"set aside as {aside.name}, " if aside else "") + "timing everything again")
        return {}

    def key(self, spec: str, rank, runtime: str | None) -> str:
        return _digest(json.dumps(dict(self.common, spec=spec, rank=rank, runtime=runtime), sort_keys=True))

    def get(self, spec: str, rank, runtime: str | None) -> float | None:
        if runtime is None:  # a device without the runtime yet: nothing of it can be cached
            return None
        entry = self.entries.get(self.key(spec, rank, runtime))
        return None if entry is None else float(entry["ms"])  # valid: _read kept only those

    def put(self, spec: str, rank, runtime: str, ms: float, what: str) -> None:
        self.entries[self.key(spec, rank, runtime)] = {"ms": ms, "what": f"{what} {rank_key(rank)}",
                                                       "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                    time.gmtime())}

    def save(self, identity: dict) -> None:
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"device": identity, "entries": self.entries}, indent=1, default=str))
            partial.replace(self.path)
        except OSError:
            # a cache that cannot be written (a full disk, a folder in its place) only costs the next run its timing
            try:
                partial.unlink(missing_ok=True)
            except OSError:
                pass


def _valid_entry(entry) -> bool:
    ms = entry.get("ms") if isinstance(entry, dict) else None
    return isinstance(ms, (int, float)) and not isinstance(ms, bool) and MIN_MS < ms < MAX_MS


def cache_path(options: LatencyOptions, identity: dict) -> Path:
    """The cache file of the device `identity` describes (deploy.timing.identify)."""
    folder = Path(options.cache_dir) if options.cache_dir else _default_cache()
    device = json.dumps([identity["where"], identity["device"].get("cpu"), identity["device"].get("machine"),
                         identity["device"].get("pi_model")])
    return folder / f"{_digest(device)[:20]}.json"


def set_aside(path: Path, suffix: str) -> Path | None:
    """Rename a cache file to path + suffix (replacing an earlier one); None when it cannot be (then it is left)."""
    aside = path.with_name(path.name + suffix)
    try:
        if aside.is_dir() or path.is_dir():
            return None
        path.replace(aside)
        return aside
    except OSError:
        return None


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sepconv" / "latency"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
