"""`benchmark`: honest latency of .tflite and .onnx artifacts, with nothing but numpy and the runtimes.

For every (artifact, thread count) case: load and initialise the runtime (timed, resident memory before and after),
run once (the first inference, timed, memory after), warm up (a count and a time, both), then timed runs. The timed
runs of all cases are interleaved round after round, so that drift of a shared machine (frequency, other jobs,
heat) hits every case alike: in each round every case gets about the same slice of time (`round_seconds`; its runs per
round are that slice divided by its warm-up latency), so a 7 ms model and a 0.2 ms model progress through the
wall-clock run together instead of the slow one collecting all its samples in the first seconds. A case stops when it
has both `min_runs` runs and `min_seconds` of them, or after `max_seconds`. A timed run is one call that sets the
(already converted) inputs and invokes the model: no conversion, allocation or copy of outputs inside the timing, and
Python's garbage collector is off during the timed rounds (as `timeit` does). docs/bench.md says how this was checked.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np

from sepconv.deploy import context, logs
from sepconv.deploy.errors import ArtifactError, InputDataError, InvalidOptionError
from sepconv.deploy.files import sha256
from sepconv.deploy.preprocess import check_scale, from_pixels, guessed, preprocessing_for
from sepconv.deploy.profile import PREFIX_QUANTILE, profile_case
from sepconv.deploy.runtime import import_runtime, open_runtime
from sepconv.deploy.scores import class_labels, hit_rate, top1
from sepconv.deploy.stats import summarize

SCHEMA_VERSION = 1
HEADERS = ["model", "format", "threads", "size", "p50 ms", "p50 95% CI", "p90 ms", "p99 ms", "mean ± std ms", "runs",
           "memory", "speed-up", "accuracy"]  # the terminal table's columns (Case.row); memory: what loading the
# model and its first run added to the process's resident memory
CSV_COLUMNS = ("host", "model", "format", "threads", "bytes", "count", "mean_ms", "std_ms", "min_ms", "p50_ms",
               "ci95_low_ms", "ci95_high_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "inferences_per_second",
               "speedup", "load_ms", "first_ms", "accuracy", "error")  # --csv's columns (Case.csv_row)


@dataclass(frozen=True)
class BenchOptions:
    """threads: thread counts, each a separate case per artifact. warmup_runs / warmup_seconds: both must be met.
    min_runs / min_seconds: a case's timed runs stop when both are met, or at max_seconds. round_seconds: timed time
    per case per interleaved round (runs per round = round_seconds / warm-up latency, at least 1); 0 means a fixed
    `block` of runs per case per round instead. batch: rows per inference (where the model allows). inputs: an .npz
    with x (and y for accuracy); without it, seeded random data of each input's shape and type. scale: how integer
    (0..255) x becomes each model's input ('auto': as its manifest says, preprocess.py). xnnpack: LiteRT's
    default delegate. providers: ONNX Runtime's execution providers. profile: after the timed runs, where each case's
    time goes, per op and per Keras layer (profile.py)."""

    threads: tuple[int, ...] = (1,)
    warmup_runs: int = 10
    warmup_seconds: float = 0.5
    min_runs: int = 50
    min_seconds: float = 2.0
    max_seconds: float = 60.0
    block: int = 10
    round_seconds: float = 0.05
    batch: int = 1
    inputs: str | None = None
    scale: str = "auto"
    xnnpack: bool = True
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    seed: int = 0
    profile: bool = False

    def __post_init__(self):
        whole = [("warmup_runs", 0), ("min_runs", 1), ("block", 1), ("batch", 1)]
        for name, least in whole:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise InvalidOptionError(f"Unrecognized {name}={value!r}. Use a whole number >= {least}")
        for name in ("warmup_seconds", "min_seconds", "max_seconds", "round_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise InvalidOptionError(f"Unrecognized {name}={value!r}. Use a finite number of seconds >= 0")
        if self.max_seconds < self.min_seconds:
            raise InvalidOptionError(f"max_seconds={self.max_seconds} is below min_seconds={self.min_seconds}")
        check_scale(self.scale)
        if not self.threads or not all(isinstance(t, int) and t >= 1 for t in self.threads):
            raise InvalidOptionError(f"Unrecognized threads={self.threads!r}. Use whole numbers >= 1, e.g. (1, 2)")


@dataclass
class Case:
    """One artifact at one thread count, as measured."""

    model: str
    path: str
    format: str
    threads: int
    runtime: str
    artifact: dict
    load_ms: float
    first_ms: float
    warmup: dict
    memory: dict
    latency_ms: dict = field(default_factory=dict)
    samples_ms: list = field(default_factory=list)
    accuracy: dict | None = None
    speedup: float | None = None  # p50 of the first artifact at the same thread count / this p50
    stopped_by: str = ""  # "min_runs and min_seconds" or "max_seconds"
    runs_per_round: int = 0  # timed runs of this case in each interleaved round
    rounds: int = 0  # interleaved rounds this case took part in
    profile: dict | None = None  # with BenchOptions.profile: profile.Profile as a dict

    def row(self, flag: str = "") -> list:
        """Its row of the table (HEADERS); `flag` follows the accuracy."""
        lat = self.latency_ms
        accuracy = self.accuracy["top1"] if self.accuracy else None
        grown = [self.memory.get(key) for key in ("load_growth_bytes", "first_run_growth_bytes")]
        memory = "" if None in grown else f"+{sum(grown) / 2 ** 20:,.1f} MiB"
        if accuracy is not None and (self.artifact.get("input_preprocessing") or {}).get("guessed"):
            flag = " (scaled as unit: no manifest)" + flag
        return [self.model, self.format, self.threads, f"{self.artifact['bytes'] / 1024:,.0f} KiB", f"{lat['p50']:.3f}",
                f"{lat['ci95_p50'][0]:.3f}-{lat['ci95_p50'][1]:.3f}", f"{lat['p90']:.3f}", f"{lat['p99']:.3f}",
                f"{lat['mean']:.3f} ± {lat['std']:.3f}", lat["count"], memory, f"{self.speedup:.2f}x",
                ("" if accuracy is None else f"{accuracy:.2%}") + flag]

    def csv_row(self, host: str) -> list:
        """Its --csv row (CSV_COLUMNS) for `host`."""
        lat = self.latency_ms
        return [host, self.model, self.format, self.threads, self.artifact["bytes"], lat["count"], lat["mean"],
                lat["std"], lat["min"], lat["p50"], lat["ci95_p50"][0], lat["ci95_p50"][1], lat["p90"], lat["p95"],
                lat["p99"], lat["max"], lat["inferences_per_second"], self.speedup, self.load_ms, self.first_ms,
                (self.accuracy or {}).get("top1"), ""]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BenchReport:
    """What `benchmark` measured: the machine (`context`), the options as run, one Case per artifact and thread count
    (in the order measured: artifacts, then thread counts), the process's peak memory and the wall-clock time.
    `to_dict()` is the JSON report of docs/bench.md (schema SCHEMA_VERSION); `from_dict` reads one back (a device's);
    `table()` is bench-model's terminal table."""

    schema: int
    context: dict
    options: dict
    cases: tuple[Case, ...]
    peak_rss_bytes: int | None
    seconds: float

    def to_dict(self) -> dict:
        return {**asdict(self), "cases": [case.to_dict() for case in self.cases]}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, report: dict) -> BenchReport:
        """A report as `to_dict()` (bench-model --json) wrote it, e.g. on a device."""
        def known(kind, values: dict) -> dict:
            names = {f.name for f in fields(kind)}
            return {key: value for key, value in values.items() if key in names}

        return cls(**{**known(cls, report), "cases": tuple(Case(**known(Case, case)) for case in report["cases"])})

    def table(self, *, markdown: bool = False, mismatches=()) -> str:
        """The readable table (per case p50 [95% CI], p90, mean +- std, runs, speed-up, size, accuracy), then a line
        on the machine; a case in `mismatches` ((model, threads) pairs) is flagged DIFFERS FROM LOCAL."""
        from tabulate import tabulate

        table = tabulate(self.rows(mismatches), headers=HEADERS, tablefmt="github" if markdown else "simple",
                         disable_numparse=True)
        profiles = "".join("\n\n" + profile_table(case, markdown) for case in self.cases if case.profile)
        return table + "\n" + context_line(self.context) + profiles

    def rows(self, mismatches=()) -> list[list]:
        """The table's rows (HEADERS), one per case."""
        return [case.row(" DIFFERS FROM LOCAL" if (case.model, case.threads) in mismatches else "")
                for case in self.cases]


Progress = Callable[[str], None]


def benchmark(paths, options: BenchOptions = BenchOptions(), *, progress: Progress | None = None,
              **kwargs) -> BenchReport:
    """Measure every artifact in `paths` at every thread count of `options` (see the module doc)."""
    if kwargs:
        options = BenchOptions(**{**asdict(options), **kwargs})
    say = progress or logs.to_log_plain("bench", "-")
    warn = (lambda message: progress(f"warning: {message}")) if progress else logs.to_log_plain("bench", "warning")
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise InvalidOptionError("No artifact given; name at least one .tflite or .onnx file")
    started = time.perf_counter()
    for path in paths:  # runtime libraries first: the first case's load_ms and memory must not include an import
        import_runtime(path)
    data = _load_inputs(options.inputs)
    machine = context.system()
    before = context.thermal()
    cases, runners = [], []
    for path in paths:
        for threads in options.threads:
            case, runner = _open_case(path, threads, data, options)
            _check_labels(runner["runtime"], data)
            cases.append(case)
            runners.append(runner)
            say(f"{case.model} @ {threads} thread(s): loaded in {case.load_ms:.1f} ms, first run "
                f"{case.first_ms:.2f} ms, warm-up {case.warmup['runs']} runs")
            if threads == options.threads[0] and runner["preprocessing"].get("guessed"):
                warn(f"{case.model}: no manifest beside it ({path.name}.json) says how its model takes pixels: the "
                     f"integer --input is scaled to [0, 1] (--scale unit), and its accuracy is wrong if the model "
                     f"rescales itself or takes [-1, 1]; pass --scale raw / symmetric / unit, or keep the manifest "
                     f"beside the artifact")
    _timed_rounds(cases, runners, options, say)
    for case, runner in zip(cases, runners):
        case.latency_ms = summarize(np.asarray(case.samples_ms) / 1000.0, batch=options.batch)
        if data is not None and data.get("y") is not None:
            case.accuracy = _accuracy(runner["runtime"], data, options.batch, runner["preprocessing"])
    _speedups(cases)
    if options.profile:
        inputs = [runner["inputs"] for runner in runners]  # what each case was timed on, profiled on the same
        runners.clear()  # the sessions: profiling opens its own
        for case, fed in zip(cases, inputs):
            say(f"{case.model} @ {case.threads} thread(s): profiling per op")
            case.profile = _profile(case, fed, options, say)
    return BenchReport(schema=SCHEMA_VERSION, context=dict(machine, before=before, after=context.thermal()),
                       options=asdict(options), cases=tuple(cases),
                       peak_rss_bytes=_status("VmHWM"), seconds=round(time.perf_counter() - started, 2))


def _profile(case: Case, inputs: list[np.ndarray], options: BenchOptions, say) -> dict:
    """The case's profile (profile.py) on the `inputs` it was timed on: ONNX Runtime's profiler, or the .tflite's
    prefixes timed in one run here."""
    path = Path(case.path)

    def time_models(paths):
        # one run of each prefix per round (round_seconds 0, block 1) and the 10th percentile: another job's burst
        # then slows every prefix alike and the quantile sits below it (profile.py's module doc says what was measured)
        quiet = replace(options, threads=(case.threads,), inputs=None, profile=False, min_runs=50,
                        min_seconds=max(0.2, options.min_seconds / 4), warmup_runs=3, warmup_seconds=0.05,
                        round_seconds=0.0, block=1)
        report = benchmark(paths, quiet, progress=lambda message: None)
        return ([float(np.percentile(c.samples_ms, PREFIX_QUANTILE)) for c in report.cases],
                min(c.latency_ms["count"] for c in report.cases))

    found = profile_case(path, case.threads, inputs, time_models, measured_ms=case.latency_ms["p50"],
                         providers=options.providers, layer_names=_manifest_layers(path))
    top = ", ".join(f"{layer.layer} {layer.share:.0%}" for layer in found.layers[:3])
    say(f"{case.model} @ {case.threads} thread(s): {len(found.ops)} ops, {found.total_ms:.3f} ms ({found.method}); "
        f"most time: {top}")
    return found.to_dict()


def _manifest_layers(path: Path) -> list[str]:
    """The Keras layer paths the artifact's manifest lists (its separation rows), or none."""
    try:
        manifest = json.loads(path.with_name(path.name + ".json").read_text())
        return [row["path"] for row in (manifest.get("separation") or {}).get("layers", []) if row.get("path")]
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def profile_table(case: Case, markdown: bool = False, limit: int = 12) -> str:
    """Per Keras layer of a profiled case: time, its share, its share of the MACs (the largest `limit`, the rest in
    one row)."""
    from tabulate import tabulate

    profile = case.profile
    layers, overhead = profile["layers"][:-1], profile["layers"][-1]  # the overhead row is last, shown last

    def row(layer, name=None):
        return [name or layer["layer"], layer["ops"] or "", f"{layer['ms']:.4f}", f"{layer['share']:.0%}",
                "" if layer["mac_share"] is None else f"{layer['mac_share']:.0%}"]

    shown = layers if len(layers) <= limit + 1 else layers[:limit]
    rest = layers[len(shown):]
    rows = [row(layer) for layer in shown]
    if rest:
        rows.append([f"({len(rest)} more layers)", sum(layer["ops"] for layer in rest),
                     f"{sum(layer['ms'] for layer in rest):.4f}", f"{sum(layer['share'] for layer in rest):.0%}",
                     ""])
    rows.append(row(overhead))
    types = "; ".join(f"{kind['layer']} {kind['share']:.0%}" + ("" if kind["mac_share"] is None else
                                                                f" (MACs {kind['mac_share']:.0%})")
                      for kind in profile["op_types"][:-1][:5])
    head = (f"where the time goes: {case.model} @ {case.threads} thread(s), {profile['method']} "
            f"({len(profile['ops'])} ops, {profile['total_ms']:.4f} ms"
            + (f": the p50 split by the profile's shares; profiled, it took {profile['raw_total_ms']:.4f} ms"
               if profile["scale"] != 1 else "") + ")")
    return (head + "\n" + tabulate(rows, headers=["layer", "ops", "ms", "time", "MACs"],
                                    tablefmt="github" if markdown else "simple", disable_numparse=True)
            + f"\nby op type: {types}")


def context_line(ctx: dict) -> str:
    """The machine a report was measured on, in one line (a report's `context`)."""
    parts = [f"{ctx.get('cpu') or ctx.get('machine')} ({ctx.get('machine')}, {ctx.get('cores')} cores)",
             ctx.get("os"), f"Python {ctx.get('python')}",
             ", ".join(f"{k} {v}" for k, v in ctx.get("libraries", {}).items() if k != "sepconv")]
    if ctx.get("governor"):
        parts.append(f"governor {ctx['governor']}")
    if ctx.get("pi_model"):
        parts.append(ctx["pi_model"])
    after = ctx.get("after") or {}
    if after.get("temperature_c") is not None:
        parts.append(f"SoC {ctx['before'].get('temperature_c')} -> {after['temperature_c']} °C")
    if after.get("throttled"):
        parts.append(after["throttled"])
    return "; ".join(p for p in parts if p) + "; speed-up: p50 of the first model / p50, at the same thread count"


def _open_case(path: Path, threads: int, data, options: BenchOptions):
    rss_before = _status("VmRSS")
    began = time.perf_counter()
    runtime = open_runtime(path, threads=threads, xnnpack=options.xnnpack, providers=options.providers)
    load_ms = (time.perf_counter() - began) * 1000
    rss_loaded = _status("VmRSS")
    preprocessing = preprocessing_for(path, options.scale)
    if data is not None:
        preprocessing["guessed"] = guessed(preprocessing, data["x"])
    inputs = _inputs(runtime, data, options, path, preprocessing)
    invoke = runtime.prepare(inputs)
    began = time.perf_counter()
    invoke()
    first_ms = (time.perf_counter() - began) * 1000
    rss_first = _status("VmRSS")
    runs, began = 0, time.perf_counter()
    while runs < options.warmup_runs or time.perf_counter() - began < options.warmup_seconds:
        invoke()
        runs += 1
    warm_seconds = time.perf_counter() - began
    memory = {"rss_before_load_bytes": rss_before, "rss_after_load_bytes": rss_loaded,
              "rss_after_first_run_bytes": rss_first, "load_growth_bytes": _diff(rss_loaded, rss_before),
              "first_run_growth_bytes": _diff(rss_first, rss_loaded)}
    case = Case(model=path.name, path=str(path), format=runtime.format, threads=threads,
                runtime=f"{runtime.runtime_name} {next(iter(runtime.versions().values()))}",
                artifact=_artifact(path, runtime), load_ms=round(load_ms, 3), first_ms=round(first_ms, 3),
                warmup={"runs": runs, "seconds": round(warm_seconds, 3)}, memory=memory,
                runs_per_round=runs_per_round(warm_seconds / runs if runs else first_ms / 1000, options))
    case.artifact["input_preprocessing"] = preprocessing if data is not None else None  # what scaled --input
    return case, {"runtime": runtime, "invoke": invoke, "inputs": inputs, "timed": 0.0, "preprocessing": preprocessing}


def runs_per_round(latency_seconds: float, options: BenchOptions) -> int:
    """How many timed runs a case makes per interleaved round: enough to fill `round_seconds` at its warm-up latency
    (so every case gets the same slice of wall-clock time per round), or the fixed `block` when round_seconds is 0."""
    if options.round_seconds == 0:
        return options.block
    return max(1, round(options.round_seconds / max(latency_seconds, 1e-9)))


def _timed_rounds(cases, runners, options: BenchOptions, say) -> None:
    collecting = gc.isenabled()
    gc.disable()  # a collection inside a timed run would be charged to the model (timeit does the same)
    try:
        _rounds(cases, runners, options, say)
    finally:
        if collecting:
            gc.enable()


def _rounds(cases, runners, options: BenchOptions, say) -> None:
    clock = time.perf_counter
    active = list(range(len(cases)))
    rounds, last_said = 0, clock()
    while active:
        rounds += 1
        for index in list(active):
            case, runner = cases[index], runners[index]
            invoke, samples = runner["invoke"], case.samples_ms
            case.rounds += 1
            for _ in range(case.runs_per_round):
                began = clock()
                invoke()
                elapsed = clock() - began
                samples.append(elapsed * 1000.0)
                runner["timed"] += elapsed
            if len(samples) >= options.min_runs and runner["timed"] >= options.min_seconds:
                case.stopped_by = "min_runs and min_seconds"
                active.remove(index)
            elif runner["timed"] >= options.max_seconds:
                case.stopped_by = "max_seconds"
                active.remove(index)
        if active and clock() - last_said >= 2.0:
            last_said = clock()
            runs = sum(len(c.samples_ms) for c in cases)
            say(f"round {rounds}: {runs:,} timed runs so far; {len(active)} of {len(cases)} case(s) still measuring")


def _speedups(cases) -> None:
    baseline = {}
    for case in cases:
        baseline.setdefault(case.threads, case.latency_ms["p50"])
        case.speedup = round(baseline[case.threads] / case.latency_ms["p50"], 3)


def _load_inputs(source):
    if source is None:
        return None
    path = Path(source)
    if not path.is_file():
        raise InputDataError(f"{path}: no such file; pass an .npz with an array x (and y for accuracy)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as error:
        raise InputDataError(f"{path}: not a readable .npz ({error}); save one with numpy.savez(path, x=..., y=...)"
                             ) from None
    if "x" not in arrays:
        raise InputDataError(f"{path}: no array 'x' (found {sorted(arrays)}); save inputs as x (and labels as y)")
    x, y = arrays["x"], arrays.get("y")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or x.ndim < 1:
        raise InputDataError(f"{path}: x is {x.dtype} of shape {x.shape}, not numbers; save the pixels as an "
                             f"array of numbers (N, ...)")
    width = None
    if y is not None:
        if not np.issubdtype(y.dtype, np.number) or y.ndim not in (1, 2):
            raise InputDataError(f"{path}: y is {y.dtype} of shape {y.shape}; save one class index per input (N,) "
                                 f"or one-hot rows (N, classes)")
        width = y.shape[1] if y.ndim == 2 and y.shape[1] > 1 else None
        y = class_labels(y)
        if len(y) != len(x):
            raise InputDataError(f"{path}: y has {len(y)} labels for {len(x)} inputs; give one label per input")
    return {"x": x, "y": y, "source": str(path), "classes": width}


def _inputs(runtime, data, options: BenchOptions, path: Path, preprocessing: dict) -> list[np.ndarray]:
    """One batch for each model input: rows of the .npz x, or seeded random data of the right type and shape."""
    specs = runtime.inputs
    if data is not None:
        if len(specs) != 1:
            raise InputDataError(f"{path}: the model has {len(specs)} inputs; an .npz x feeds one-input models only")
        x = data["x"]
        expected = tuple(specs[0].shape[1:])
        compatible = x.ndim == len(specs[0].shape) and all(e in (-1, a) for e, a in zip(expected, x.shape[1:]))
        if not compatible:
            raise InputDataError(f"{data['source']}: x has samples of shape {tuple(x.shape[1:])}, {path.name} "
                                 f"takes {expected}; save x as (N, {', '.join(map(str, expected))})")
        if len(x) < options.batch:
            raise InputDataError(f"{data['source']}: {len(x)} samples, fewer than --batch {options.batch}")
        return [from_pixels(x[:options.batch], preprocessing)]
    rng = np.random.default_rng(options.seed)
    batch = []
    for spec in specs:
        shape = [options.batch if i == 0 else d for i, d in enumerate(spec.shape)]
        if any(d == -1 for d in shape[1:]):
            raise InputDataError(f"{path}: input {spec.name!r} has a free size {tuple(spec.shape)}; pass --input "
                                 f"with real data")
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.integer) and spec.scale is None:
            info = np.iinfo(dtype)
            batch.append(rng.integers(max(info.min, -128), min(info.max, 127), size=shape).astype(dtype))
        else:
            batch.append(rng.random(shape, dtype=np.float32))  # float, or quantized (converted by the runtime)
    return batch


def _check_labels(runtime, data) -> None:
    """Labels that cannot be this model's (one-hot rows of another width, classes past its output): refused before
    any timing, not scored as a low accuracy."""
    if data is None or data.get("y") is None:
        return
    y, classes = data["y"], runtime.outputs[0].shape[-1]
    if classes < 2:  # not a classifier's scores (or a free size): nothing to hold the labels against
        return
    if data.get("classes") not in (None, classes):
        raise InputDataError(f"{data['source']}: y has one-hot rows of {data['classes']} classes, the model's output "
                             f"has {classes}; save labels for this model")
    if len(y) and (np.min(y) < 0 or np.max(y) >= classes):
        raise InputDataError(f"{data['source']}: y holds classes {int(np.min(y))}..{int(np.max(y))}, the model's "
                             f"output has {classes} (0..{classes - 1}); save labels for this model")


def _accuracy(runtime, data, batch: int, preprocessing: dict) -> dict:
    x, y = data["x"], data["y"]
    predictions = []
    for start in range(0, len(x), max(batch, 64)):
        predictions.append(top1(runtime.run([from_pixels(x[start:start + max(batch, 64)], preprocessing)])[0]))
    predicted = np.concatenate(predictions).astype(np.int64)
    return {"top1": hit_rate(predicted, y), "samples": int(len(y)), "source": data["source"],
            "predictions_sha256": hashlib.sha256(predicted.tobytes()).hexdigest()}


def _artifact(path: Path, runtime) -> dict:
    digest = sha256(path)
    info = {"path": str(path), "bytes": path.stat().st_size, "sha256": digest,
            "inputs": [s.to_dict() for s in runtime.inputs], "outputs": [s.to_dict() for s in runtime.outputs],
            "manifest": None}
    manifest = path.with_name(path.name + ".json")
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            raise ArtifactError(f"{manifest}: the manifest beside the artifact is not valid JSON; remove it or "
                                f"convert again") from None
        verification = data.get("verification") or {}
        info["manifest"] = {"quantize": data.get("quantize"), "sha256_matches": data.get("sha256") == digest,
                            "verification_passed": verification.get("passed"),
                            "accuracy": (verification.get("outputs") or [{}])[0].get("accuracy"),
                            "agreement": (verification.get("outputs") or [{}])[0].get("agreement"),
                            "original_agreement": verification.get("original_agreement")}
    return info


def _status(key: str) -> int | None:
    """A memory figure of this process from /proc/self/status, in bytes (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _diff(after, before):
    return None if after is None or before is None else after - before
