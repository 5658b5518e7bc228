"""Time a set of artifacts where a model will run, and say where that was: what convert-model's per-layer latency
tables are measured with (sepconv.convert.recovery.latency_table), with no TensorFlow.

`where` is None for this machine (bench-model's harness, in this process) or an SSH target as deploy-model takes it
(the same connection, runtime set-up and copy by content hash; the device runs bench-model). Either way every artifact
is timed in one interleaved run (bench.py), so that the machine's drift hits them alike. `identify` names the device
and its runtime version without timing anything: the key of a cache of such measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from sepconv.deploy.bench import BenchOptions, benchmark
from sepconv.deploy.context import system
from sepconv.deploy.errors import InvalidOptionError, RemoteRuntimeError
from sepconv.deploy.flags import bench_argv
from sepconv.deploy.remote import RUNTIME_PACKAGES, DeployOptions, deploy, device_xnnpack, probe
from sepconv.deploy.runtime import package_version
from sepconv.deploy.ssh import Connection, parse_target

LOCAL = "local"
DEVICE_KEYS = ("cpu", "machine", "cores", "pi_model", "emulated")  # what a Timing says of the device


@dataclass(frozen=True)
class TimingOptions:
    """threads: the one thread count timed. xnnpack: LiteRT's XNNPACK delegate (None: on, except on an emulated
    device). min_seconds / min_runs: a case's timed runs (both must be met). deploy: the SSH and device set-up when
    timing on a device (its threads, xnnpack and bench_args are set from these options)."""

    threads: int = 1
    xnnpack: bool | None = None
    min_seconds: float = 0.3
    min_runs: int = 30
    warmup_seconds: float = 0.05
    deploy: DeployOptions = field(default_factory=DeployOptions)

    def __post_init__(self):
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1:
            raise InvalidOptionError(f"Unrecognized threads={self.threads!r}. Use a whole number >= 1")
        if not isinstance(self.min_seconds, (int, float)) or not 0 <= self.min_seconds < 600:
            raise InvalidOptionError(f"Unrecognized min_seconds={self.min_seconds!r}. Use seconds in [0, 600)")


@dataclass(frozen=True)
class Timing:
    where: str  # "local" or the host's label
    device: dict  # cpu, machine, cores, pi_model, emulated
    runtime: str  # e.g. "ai-edge-litert 2.3.0", as the timed cases report it
    xnnpack: bool | None  # LiteRT's XNNPACK delegate; None for ONNX Runtime
    p50_ms: dict  # {path: p50 in ms}
    seconds: float
    ci95_ms: dict = field(default_factory=dict)  # {path: (low, high)}: the p50's 95% interval (stats.median_interval)


def identify(where: str | None, suffix: str, options: TimingOptions = TimingOptions()) -> dict:
    """{where, device: {cpu, machine, cores, pi_model, emulated}, runtime: "name version" or None when the device has
    no runtime installed yet, xnnpack} for artifacts with this `suffix` (".tflite" or ".onnx")."""
    package = _package(suffix)
    if where is None:
        version = package_version(package)
        return {"where": LOCAL, "device": _device(dict(system(), emulated=False)),
                "runtime": f"{package} {version}" if version else None,
                "xnnpack": _tflite_only(suffix, True if options.xnnpack is None else options.xnnpack)}
    target = parse_target(where)
    with Connection(target, options.deploy.ssh) as conn:
        found = probe(conn, options.deploy)
        done = conn.run([f"{options.deploy.remote_dir}/venv/bin/python", "-c", _VERSION, package], check=False,
                        timeout=60)
    version = done.stdout.decode(errors="replace").strip() if done.returncode == 0 else ""
    return {"where": target.label, "device": _device(found), "runtime": f"{package} {version}" if version else None,
            "xnnpack": _tflite_only(suffix, device_xnnpack(found, _deploy_options(options)))}


_VERSION = "import sys, importlib.metadata as m\ntry:\n    print(m.version(sys.argv[1]))\nexcept Exception:\n    pass\n"


def time_artifacts(paths, where: str | None, options: TimingOptions = TimingOptions(), *, progress=None) -> Timing:
    """The p50 latency of every artifact in `paths`, timed in one interleaved run here or on `where`."""
    paths = [Path(p) for p in paths]
    say = progress or (lambda message: None)
    if where is None:
        xnnpack = True if options.xnnpack is None else options.xnnpack
        report = benchmark(paths, threads=(options.threads,), min_seconds=options.min_seconds,
                           min_runs=options.min_runs, warmup_seconds=options.warmup_seconds, warmup_runs=3,
                           xnnpack=xnnpack, progress=say)
        device = identify(None, paths[0].suffix, options)["device"]
        return _timing(LOCAL, device, _tflite_only(paths[0].suffix, xnnpack), paths, report)

    deploy_options = _deploy_options(options)
    result, = deploy([where], paths, deploy_options, progress=lambda host, message: say(f"{host}: {message}"))
    if not result.ok:
        raise result.error
    host_report = result.report
    xnnpack = _tflite_only(paths[0].suffix, device_xnnpack(host_report.device, deploy_options))
    return _timing(host_report.host, _device(host_report.device), xnnpack, paths, host_report.benchmark)


def describe_xnnpack(xnnpack: bool | None) -> str:
    """How a Timing's (or identify's) `xnnpack` reads in a line."""
    return "ONNX Runtime" if xnnpack is None else f"XNNPACK {'on' if xnnpack else 'off'}"


def _device(found: dict) -> dict:
    """The device as a Timing records it (DEVICE_KEYS), from this machine's context.system() or a device's probe."""
    return {key: found.get(key) for key in DEVICE_KEYS}


def _tflite_only(suffix: str, xnnpack: bool) -> bool | None:
    """XNNPACK is LiteRT's delegate: None for ONNX Runtime artifacts."""
    return xnnpack if suffix.lower() == ".tflite" else None


def _deploy_options(options: TimingOptions) -> DeployOptions:
    stop = BenchOptions(min_runs=options.min_runs, min_seconds=options.min_seconds, warmup_runs=3,
                        warmup_seconds=options.warmup_seconds)
    flags = bench_argv(stop, ("min_runs", "min_seconds", "warmup_runs", "warmup_seconds")) + ("--quiet",)
    return replace(options.deploy, threads=(options.threads,), xnnpack=options.xnnpack, bench_args=flags)


def _timing(where: str, device: dict, xnnpack: bool | None, paths: list[Path], report) -> Timing:
    """report: the bench.BenchReport of `paths`, one case each."""
    if len(report.cases) != len(paths):
        raise RemoteRuntimeError(f"{where}: the benchmark timed {len(report.cases)} of {len(paths)} artifacts; "
                                 f"see its report: {report.to_json()[:200]}")
    runtimes = {case.runtime for case in report.cases}
    return Timing(where=where, device=device, runtime=sorted(runtimes)[0], xnnpack=xnnpack,
                  p50_ms={str(path): float(case.latency_ms["p50"]) for path, case in zip(paths, report.cases)},
                  seconds=float(report.seconds or 0.0),
                  ci95_ms={str(path): tuple(float(v) for v in case.latency_ms["ci95_p50"])
                           for path, case in zip(paths, report.cases)})


def _package(suffix: str) -> str:
    package = RUNTIME_PACKAGES.get(suffix.lower())
    if package is None:
        raise InvalidOptionError(f"Unrecognized artifact extension {suffix!r}; time .tflite or .onnx files")
    return package
