"""Deploy to devices over SSH: probe, set up the runtime under one folder, copy artifacts by content hash, benchmark.

Everything sepconv puts on a device lives under one folder (default `~/.sepconv`, `remote_dir` to change it):

    .sepconv/venv/            a virtual environment with sepconv-deploy and the runtimes the artifacts need
    .sepconv/venv/.sepconv-deploy.json   what was installed (reused when it matches)
    .sepconv/artifacts/<sha256><suffix>  each artifact (and <...>.json, its manifest), named by content
    .sepconv/wheels/          wheels copied for an offline install (--wheels)

Nothing outside that folder is touched. Several hosts run concurrently, one thread each. Long remote steps (the
install, the benchmark) run under a watchdog: stopping them here (Ctrl-C) or a timeout kills them on the device too.

An emulated device (qemu: the probe's `emulated`) runs LiteRT without XNNPACK unless the caller insists
(`DeployOptions(xnnpack=True)`): qemu-user mis-executes XNNPACK's arm64 int8 kernels and gives wrong answers.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from sepconv.deploy import logs
from sepconv.deploy.bench import SCHEMA_VERSION, BenchReport
from sepconv.deploy.device_wheel import build
from sepconv.deploy.errors import (
    ArtifactError,
    InvalidOptionError,
    RemoteError,
    RemoteInstallError,
    RemoteRuntimeError,
    SepconvError,
    UnsupportedDeviceError,
)
from sepconv.deploy.files import sha256, temporary_folder
from sepconv.deploy.ssh import Connection, SshOptions, parse_target

DEFAULT_REMOTE_DIR = ".sepconv"
RUNTIME_PACKAGES = {".tflite": "ai-edge-litert", ".onnx": "onnxruntime"}
SUPPORTED_MACHINES = ("aarch64", "arm64", "x86_64", "amd64")
MIN_PYTHON = (3, 9)
INSTALL_SPACE = 400 * 1024 * 1024  # a venv with numpy and one or two runtimes, with room to spare
RECHECK_SECONDS = 2.0  # between the two connection checks after a benchmark killed by a signal (_benchmark_failure)

PROBE = r"""
import json, os, platform, shutil, sys
def read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None
cpu = model = None
for line in (read("/proc/cpuinfo") or "").splitlines():
    key = line.split(":")[0].strip().lower()
    if key in ("model name", "hardware", "cpu model") and cpu is None:
        cpu = line.split(":", 1)[1].strip()
    if line.split(":")[0].strip() == "Model" and model is None:  # Raspberry Pi OS names the board here
        model = line.split(":", 1)[1].strip()
memory = None
for line in (read("/proc/meminfo") or "").splitlines():
    if line.startswith("MemTotal:"):
        memory = int(line.split()[1]) * 1024
os_name = None
for line in (read("/etc/os-release") or "").splitlines():
    if line.startswith("PRETTY_NAME="):
        os_name = line.split("=", 1)[1].strip('"')
pi_model = read("/proc/device-tree/model") or model
emulated = os.path.exists("/etc/sepconv-emulated") or any(
    word in (text or "").lower() for text in (pi_model, cpu) for word in ("qemu", "emulated"))
root = sys.argv[1]
probe_dir = root if os.path.isdir(root) else os.path.dirname(os.path.abspath(root)) or "."
try:
    import venv, ensurepip  # noqa: F401
    has_venv = True
except ImportError:
    has_venv = False
print(json.dumps({"machine": platform.machine(), "system": platform.system(), "os": os_name or platform.platform(),
                  "python": platform.python_version(), "cpu": cpu, "cores": os.cpu_count(), "memory_bytes": memory,
                  "disk_free_bytes": shutil.disk_usage(probe_dir).free, "pi_model": pi_model,
                  "has_venv": has_venv, "home": os.path.expanduser("~"), "emulated": emulated}))
"""


@dataclass(frozen=True)
class DeployOptions:
    """threads: thread counts benchmarked on the device. remote_dir: the one folder sepconv uses there (relative to
    the remote home, or absolute). wheels: a local folder of wheels for an offline device (installed with --no-index);
    index_url: another package index. bench_args: extra bench-model flags. timeout: seconds for any remote step.
    xnnpack: LiteRT's XNNPACK delegate on the device; None: on, except on an emulated device (qemu gives wrong int8
    answers with it)."""

    threads: tuple[int, ...] = (1,)
    remote_dir: str = DEFAULT_REMOTE_DIR
    wheels: str | None = None
    index_url: str | None = None
    inputs: str | None = None  # an .npz for bench-model --input (copied like an artifact)
    bench_args: tuple[str, ...] = ()
    ssh: SshOptions = field(default_factory=SshOptions)
    timeout: int = 1800
    xnnpack: bool | None = None

    def __post_init__(self):
        if not self.threads or not all(isinstance(t, int) and t >= 1 for t in self.threads):
            raise InvalidOptionError(f"Unrecognized threads={self.threads!r}. Use whole numbers >= 1, e.g. (1, 4)")
        if not isinstance(self.remote_dir, str) or not self.remote_dir.strip() or "\0" in self.remote_dir:
            raise InvalidOptionError(f"Unrecognized remote_dir={self.remote_dir!r}. Use a folder name such as .sepconv")
        if self.inputs is not None and not Path(self.inputs).is_file():
            raise InvalidOptionError(f"inputs={self.inputs!r}: no such file; pass an .npz with x (and y)")
        if self.wheels is not None and not Path(self.wheels).is_dir():
            raise InvalidOptionError(f"wheels={self.wheels!r}: no such folder; pass a folder of .whl files")


@dataclass(frozen=True)
class HostReport:
    host: str
    device: dict  # what the probe found
    runtime: dict  # {"reused": bool, "packages": [...], "seconds": float}
    artifacts: list  # [{"local": path, "remote": path, "sha256": ..., "bytes": ..., "copied": bool}]
    benchmark: BenchReport  # bench-model's report from the device, each case named by its local file
    seconds: float

    def to_dict(self) -> dict:
        """The JSON report (docs/deploy.md): the device's bench-model report, each case with its `remote_path`."""
        benchmark = self.benchmark.to_dict()
        for case in benchmark["cases"]:
            case["remote_path"] = case["path"]  # the device ran them under their hash names
        return {"host": self.host, "device": self.device, "runtime": self.runtime, "artifacts": self.artifacts,
                "benchmark": benchmark, "seconds": self.seconds}


@dataclass(frozen=True)
class HostResult:
    """One host's outcome: its HostReport, or the error that stopped it (one host's failure does not stop the
    others). `to_dict()` is its entry in deploy-model's --json: the report, or {host, error: {type, message}}."""

    host: str  # the host as given (user@host:port, an alias)
    report: HostReport | None = None
    error: SepconvError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        if self.ok:
            return self.report.to_dict()
        return {"host": self.host, "error": {"type": type(self.error).__name__, "message": str(self.error)}}


Progress = Callable[[str, str], None]


def deploy(hosts, artifacts, options: DeployOptions = DeployOptions(), *, progress: Progress | None = None
           ) -> tuple[HostResult, ...]:
    """Deploy and benchmark `artifacts` on every host at once. Returns a HostResult per host, in the order given:
    its HostReport, or the SepconvError that stopped it (one host's failure does not stop the others)."""
    targets = [parse_target(h) for h in ([hosts] if isinstance(hosts, str) else hosts)]
    if not targets:
        raise InvalidOptionError("No host given; name at least one, e.g. pi@raspberrypi.local")
    paths = _check_artifacts(artifacts)
    say = progress or (lambda host, message, log=logs.to_log_plain("deploy", "-"): log(f"{host}: {message}"))
    with temporary_folder("sepconv-deploy-") as tmp:
        wheel = build(Path(tmp))
        connections = [Connection(t, options.ssh) for t in targets]
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(targets))) as pool:
            futures = {c.target.spec: pool.submit(_deploy_one, c, paths, wheel, options, say) for c in connections}
            results = []
            try:
                for spec, future in futures.items():
                    try:
                        results.append(HostResult(spec, report=future.result()))
                    except SepconvError as error:
                        results.append(HostResult(spec, error=error))
            except BaseException:  # Ctrl-C: stop every host's remote step now instead of waiting for it
                for conn in connections:
                    conn.abort()
                raise
    return tuple(results)


def _check_artifacts(artifacts) -> list[Path]:
    paths = [Path(a) for a in ([artifacts] if isinstance(artifacts, (str, Path)) else artifacts)]
    if not paths:
        raise InvalidOptionError("No artifact given; name at least one .tflite or .onnx file")
    for path in paths:
        if path.suffix.lower() not in RUNTIME_PACKAGES:
            raise ArtifactError(f"{path}: unrecognized artifact extension {path.suffix!r}; deploy .tflite or .onnx "
                                f"files")
        if not path.is_file():
            raise ArtifactError(f"{path}: no such file; check the path")
        if path.stat().st_size == 0:
            raise ArtifactError(f"{path}: the file is empty (0 bytes); export it again")
    return paths


def _deploy_one(conn: Connection, paths: list[Path], wheel: Path, options: DeployOptions, say) -> HostReport:
    started = time.perf_counter()
    target = conn.target
    with conn:
        device = probe(conn, options)
        say(target.label, f"{device['machine']}, {device['os']}, Python {device['python']}, "
                          f"{device['cores']} cores{', ' + device['pi_model'] if device.get('pi_model') else ''}")
        if device.get("emulated"):
            say(target.label, "EMULATED device: timings are meaningless; " + (
                "XNNPACK on as asked (qemu may give wrong int8 answers with it)" if options.xnnpack else
                "LiteRT runs without XNNPACK (qemu gives wrong int8 answers with it; --xnnpack to force it)"))
        runtime = ensure_runtime(conn, device, paths, wheel, options, say)
        copied = upload(conn, paths, options, say)
        inputs = upload(conn, [Path(options.inputs)], options, say)[0]["remote"] if options.inputs else None
        report = run_benchmark(conn, [c["remote"] for c in copied], options, say, inputs=inputs,
                               xnnpack=device_xnnpack(device, options))
    per_artifact = len(report.options.get("threads") or options.threads)
    cases = tuple(replace(case, model=Path(copied[index // per_artifact]["local"]).name)  # ran under hash names
                  for index, case in enumerate(report.cases))
    return HostReport(host=target.label, device=device, runtime=runtime, artifacts=copied,
                      benchmark=replace(report, cases=cases), seconds=round(time.perf_counter() - started, 1))


def device_xnnpack(device: dict, options: DeployOptions) -> bool:
    """XNNPACK on the device: as asked, else on except on an emulated device."""
    return options.xnnpack if options.xnnpack is not None else not device.get("emulated")


def probe(conn: Connection, options: DeployOptions) -> dict:
    """The device's architecture, OS, Python, CPU, memory, free disk and Pi model; refuses what cannot work."""
    done = conn.run(["python3", "-", options.remote_dir], stdin=PROBE.encode(), check=False, timeout=60)
    if done.returncode == 127:
        raise UnsupportedDeviceError(f"{conn.target.label}: no python3 on the device; install Python 3.9+ (on "
                                     f"Raspberry Pi OS: sudo apt install python3 python3-venv)")
    if done.returncode != 0:
        raise UnsupportedDeviceError(f"{conn.target.label}: probing the device failed: "
                                     f"{_tail(done.stderr, 1)}")
    device = json.loads(done.stdout.decode().strip().splitlines()[-1])
    version = tuple(int(p) for p in device["python"].split(".")[:2])
    if version < MIN_PYTHON:
        raise UnsupportedDeviceError(f"{conn.target.label}: Python {device['python']} is too old; the device side "
                                     f"needs Python 3.9+ (Raspberry Pi OS bookworm has 3.11)")
    if device["machine"].lower() not in SUPPORTED_MACHINES:
        raise UnsupportedDeviceError(f"{conn.target.label}: architecture {device['machine']} has no LiteRT / ONNX "
                                     f"Runtime wheels; use a 64-bit OS (64-bit Raspberry Pi OS: aarch64)")
    if not device["has_venv"]:
        raise UnsupportedDeviceError(f"{conn.target.label}: Python has no venv module; install it (sudo apt install "
                                     f"python3-venv)")
    return device


def ensure_runtime(conn: Connection, device: dict, paths: list[Path], wheel: Path, options: DeployOptions,
                   say) -> dict:
    """Create (or reuse) the virtual environment under remote_dir with sepconv-deploy and the runtimes needed."""
    started = time.perf_counter()
    root = options.remote_dir
    packages = sorted({RUNTIME_PACKAGES[p.suffix.lower()] for p in paths})
    wanted = {"wheel_sha256": sha256(wheel), "packages": packages}
    state = conn.run(["cat", "--", f"{root}/venv/.sepconv-deploy.json"], check=False).stdout.decode()
    try:
        current = json.loads(state) if state.strip() else None
    except json.JSONDecodeError:
        current = None
    if current and current.get("wheel_sha256") == wanted["wheel_sha256"] and set(packages) <= set(current["packages"]):
        say(conn.target.label, f"runtime reused ({', '.join(current['packages'])} in {root}/venv)")
        return {"reused": True, "packages": current["packages"], "seconds": round(time.perf_counter() - started, 1)}
    if device["disk_free_bytes"] < INSTALL_SPACE:
        raise UnsupportedDeviceError(f"{conn.target.label}: only {device['disk_free_bytes'] / 2**20:.0f} MiB free "
                                     f"where {root} lives; the runtime needs about {INSTALL_SPACE / 2**20:.0f} MiB: "
                                     f"free some space")
    say(conn.target.label, f"installing {', '.join(packages)} into {root}/venv "
                           f"({'from ' + options.wheels if options.wheels else 'from the package index'})")
    conn.run(["mkdir", "-p", "--", f"{root}/wheels"])
    remote_wheel = f"{root}/wheels/{wheel.name}"
    conn.put(wheel, remote_wheel)
    absolute = remote_wheel if remote_wheel.startswith("/") else f"{device['home']}/{remote_wheel}"
    requirement = f"sepconv-deploy @ file://{urllib.parse.quote(absolute)}"  # a bare path with '; ' reads as a marker
    install = ["-m", "pip", "install", "--disable-pip-version-check", "--no-input", requirement, *packages]
    if options.wheels:
        for local in sorted(Path(options.wheels).glob("*.whl")):
            conn.put(local, f"{root}/wheels/{local.name}")
        install += ["--no-index", f"--find-links={root}/wheels"]
    elif options.index_url:
        install += [f"--index-url={options.index_url}"]
    script = 'set -e; root=$1; shift; python3 -m venv -- "$root/venv"; "$root/venv/bin/python" "$@"'
    done = conn.run(["sh", "-c", script, "sh", root, *install], check=False, timeout=options.timeout, watch=True)
    if done.returncode != 0:
        raise RemoteInstallError(f"{conn.target.label}: installing the runtime failed (pip on the device said: "
                                 f"{_tail(done.stdout + done.stderr, 3)}); {_install_hint(done, device, options)}")
    conn.put(json.dumps(wanted).encode(), f"{root}/venv/.sepconv-deploy.json")
    return {"reused": False, "packages": packages, "seconds": round(time.perf_counter() - started, 1)}


def _install_hint(done, device: dict, options: DeployOptions) -> str:
    offline = (f"pass --wheels DIR with wheels for {device['machine']} and Python {device['python']}"
               + (" (scripts/pi-emulator downloads them: --wheels build/pi-emulator/wheels)" if device.get("emulated")
                  else ""))
    if b"CERTIFICATE_VERIFY_FAILED" in done.stdout + done.stderr or b"SSLCertVerificationError" in done.stderr:
        return (f"the device's pip could not verify the package index's TLS certificate (check the device's clock "
                f"and its ca-certificates package, and any proxy), or install offline: {offline}")
    return f"for an offline device {offline}"


def upload(conn: Connection, paths: list[Path], options: DeployOptions, say) -> list[dict]:
    """Copy each artifact (and its manifest) to remote_dir/artifacts/<sha256><suffix>, skipping those already there."""
    folder = f"{options.remote_dir}/artifacts"
    conn.run(["mkdir", "-p", "--", folder])
    present = set(conn.run(["ls", "-1", "--", folder]).stdout.decode().split())
    copied = []
    for path in paths:
        digest = sha256(path)
        name = f"{digest}{path.suffix.lower()}"
        item = {"local": str(path), "remote": f"{folder}/{name}", "sha256": digest, "bytes": path.stat().st_size,
                "copied": name not in present}
        if item["copied"]:
            _put_checked(conn, path, item["remote"])
            present.add(name)
        manifest = path.with_name(path.name + ".json")
        if manifest.is_file() and f"{name}.json" not in present:
            _put_checked(conn, manifest, f"{item['remote']}.json")
        say(conn.target.label, f"{path.name}: {'copied' if item['copied'] else 'already there'} as {name[:12]}...")
        copied.append(item)
    return copied


def _put_checked(conn: Connection, local: Path, remote: str) -> None:
    try:
        conn.put(local, remote)
    except RemoteError as error:
        conn.run(["rm", "-f", "--", f"{remote}.partial"], check=False)
        if "No space left" in str(error) or "Disk quota" in str(error):
            raise UnsupportedDeviceError(f"{conn.target.label}: the device's disk is full while copying "
                                         f"{local.name}; free some space (nothing half-written was left)") from None
        raise RemoteError(f"{conn.target.label}: copying {local.name} failed ({str(error).split(': ', 1)[-1]}); "
                          f"nothing half-written was left") from None


def bench_command(remote_paths: list[str], options: DeployOptions, *, inputs: str | None = None,
                  xnnpack: bool = True) -> list[str]:
    """bench-model's command line on the device: JSON on stdout, progress on stderr (every line, -v: which of them
    deploy-model shows is decided here, sepconv.deploy.logs); user paths after `--`."""
    # python -m rather than the bench-model script: pip writes a shell trampoline for scripts whose interpreter path
    # has spaces, and does not quote it for every character a folder name may hold
    return [f"{options.remote_dir}/venv/bin/python", "-m", "sepconv.deploy.cli", "--threads",
            ",".join(map(str, options.threads)), "--json=-", *_verbosity(options.bench_args),
            *([f"--input={inputs}"] if inputs else []),
            *([] if xnnpack else ["--no-xnnpack"]), *options.bench_args, "--", *remote_paths]


def _verbosity(bench_args) -> tuple[str, ...]:
    """-v, unless the caller's bench flags ask for quiet (the latency table's timing does)."""
    return () if {"-q", "--quiet"} & set(bench_args) else ("-v",)


def run_benchmark(conn: Connection, remote_paths: list[str], options: DeployOptions, say, *,
                  inputs: str | None = None, xnnpack: bool = True) -> BenchReport:
    """Run bench-model on the device (its progress lines passed on as they come) and bring its report back."""
    say(conn.target.label, f"benchmarking {len(remote_paths)} artifact(s) at threads "
                           f"{','.join(map(str, options.threads))}{'' if xnnpack else ', XNNPACK off'}")
    argv = bench_command(remote_paths, options, inputs=inputs, xnnpack=xnnpack)
    done = conn.run(argv, check=False, timeout=options.timeout, watch=True,
                    on_stderr=lambda line: say(conn.target.label, f"device: {line.split('] ', 1)[-1]}"))
    if done.returncode != 0:
        raise _benchmark_failure(conn, done)
    try:
        report = json.loads(done.stdout.decode())
    except json.JSONDecodeError:
        raise RemoteRuntimeError(f"{conn.target.label}: the benchmark's report was not JSON: "
                                 f"{_tail(done.stdout, 1)}") from None
    try:
        return BenchReport.from_dict(report)
    except (AttributeError, KeyError, TypeError) as error:
        raise RemoteRuntimeError(f"{conn.target.label}: the benchmark's report is not bench-model's (schema "
                                 f"{SCHEMA_VERSION}): {error!r}; reinstall the device's runtime (delete its "
                                 f"{options.remote_dir}/venv)") from None


def _benchmark_failure(conn: Connection, done) -> RemoteError:
    """The error for a benchmark that ended with a non-zero status. Killed by a signal, it may be the connection that
    went (sshd stopped, the device went away: its session's processes are killed with it) or the device that killed
    it (the out-of-memory killer): the connection is checked before the device is blamed, twice, RECHECK_SECONDS
    apart, since a device going away kills its processes before its sshd and network go (a shutdown does; the
    suite's dying sshd did, its listener still answering for an instant after the benchmark was killed)."""
    label = conn.target.label
    code = -done.returncode if done.returncode < 0 else done.returncode - 128
    if code <= 0:
        return RemoteRuntimeError(f"{label}: the benchmark failed on the device (status {done.returncode}): "
                                  f"{_tail(done.stderr, 2)}")
    try:
        conn.check()
        time.sleep(RECHECK_SECONDS)
        conn.check()
    except RemoteError as lost:
        return lost
    name = signal.Signals(code).name if code in signal.valid_signals() else f"signal {code}"
    hint = " (the out-of-memory killer does this: check `dmesg` on the device)" if name == "SIGKILL" else ""
    return RemoteRuntimeError(f"{label}: the benchmark was killed on the device by {name}{hint}: "
                              f"{_tail(done.stderr, 2)}")


def prediction_mismatches(local: BenchReport, device: BenchReport) -> list[dict]:
    """Cases (same artifact and thread count) where the device's top-1 predictions on the same labelled --input differ
    from this machine's (bench-model reports: their `predictions_sha256`). Whatever the cause, the device's figures
    are not the model's."""
    here = {(c.model, c.threads): c for c in local.cases}
    found = []
    for case in device.cases:
        other = here.get((case.model, case.threads))
        if not other or not case.accuracy or not other.accuracy:
            continue
        if case.accuracy["predictions_sha256"] != other.accuracy["predictions_sha256"]:
            found.append({"model": case.model, "threads": case.threads, "device_top1": case.accuracy["top1"],
                          "local_top1": other.accuracy["top1"]})
    return found


def _tail(data: bytes, lines: int) -> str:
    text = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    return " | ".join(text[-lines:]) if text else "no message"
