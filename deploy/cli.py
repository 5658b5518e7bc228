"""The device side's commands, `bench-model` and `deploy-model`, and the argument helpers both sides' CLIs share.

Each command parses its flags, calls one API function (`benchmark`, `deploy`) and prints; nothing else. Nothing
here imports TensorFlow: these commands run on a Raspberry Pi.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from sepconv.deploy.files import write_atomic

if TYPE_CHECKING:  # numpy and the runtimes load when a command runs, not for --help
    from sepconv.deploy.bench import BenchReport

EXIT_ERROR = 1  # a sepconv error (for deploy-model: every host failed, or nothing could start)
EXIT_BAD_FLAG = 2
EXIT_SOME_HOSTS_FAILED = 3  # deploy-model: some hosts failed, the others' results are reported
EXIT_INTERRUPTED = 130
# A report never replaces a model or data file (`bench-model a.tflite --json b.tflite` once overwrote b.tflite).
NOT_A_REPORT = (".tflite", ".onnx", ".npz", ".h5", ".keras", ".pb", ".whl")
JSON_HELP = ("as JSON to FILE, or to stdout with '-' or no FILE (a failure too: {\"error\": {...}}); FILE must not "
             "exist unless --overwrite, and is never a model or data file")


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (and exit status 2) instead of usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def checked(convert, valid, kind: str, allowed: str):
    """An argparse type: convert the text, check the value, or say which values are allowed."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"invalid {kind} {text!r}: use {allowed}")
        return value

    return parse


positive = checked(int, lambda v: v >= 1, "count", "a whole number >= 1")
count = checked(int, lambda v: v >= 0, "count", "a whole number >= 0")
seconds = checked(float, lambda v: v >= 0, "number of seconds", "seconds >= 0, e.g. 2.5")
thread_list = checked(lambda t: tuple(int(v) for v in t.split(",")), lambda v: all(t >= 1 for t in v),
                      "thread list", "comma-separated whole numbers >= 1, e.g. 1,2,4")


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("sepconv")
    except PackageNotFoundError:
        return "unknown"


def version_flag(parser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s (sepconv) {version()}")


def run(prog: str, body, args: argparse.Namespace, outputs=None) -> int:
    """Check the output paths (`outputs(args)`, before any work), then run `body(args)`; a sepconv error becomes one
    line on stderr and its exit status (a traceback with --debug), and with --json a JSON {"error": ...} as well."""
    from sepconv.deploy.errors import SepconvError

    checked = False
    try:
        if outputs:
            outputs(args)
        checked = True
        return body(args) or 0
    except SepconvError as error:
        if args.debug:
            raise
        status = getattr(error, "exit_status", EXIT_ERROR)
        print(f"{prog}: {'error: ' if status == EXIT_ERROR else ''}{error}", file=sys.stderr)
        json_failure(args, prog, type(error).__name__, str(error), status, checked, getattr(error, "details", None))
        return status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        json_failure(args, prog, "KeyboardInterrupt", "interrupted", EXIT_INTERRUPTED, checked)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`bench-model ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        return EXIT_ERROR


def json_failure(args, prog: str, kind: str, message: str, status: int, checked: bool, details=None) -> None:
    """With --json, a failure is JSON too: to stdout, or to the JSON file if its path passed the checks; `details`
    (an error's machine-readable extras, e.g. the int8 diagnosis table) go in error.details."""
    from sepconv.deploy.errors import SepconvError

    target = "-" if getattr(args, "json", None) is True else getattr(args, "json", None)
    if not target or (target != "-" and not checked):
        return
    error = {"type": kind, "message": message, **({"details": details} if details else {})}
    text = json.dumps({"error": error, "exit_status": status, "tool": prog}, indent=2, default=str)
    with contextlib.suppress(SepconvError):  # the file cannot be written either: the line on stderr says enough
        write_output(target, text)


def check_output_file(flag: str, target, *, protected=(), overwrite: bool = False) -> None:
    """Refuse, before any work, an output path that cannot or must not be written: its folder missing or not
    writable, a directory, a model or data file, a file this run reads, or an existing file without --overwrite."""
    from sepconv.deploy.errors import OutputError

    if target in (None, "-", True):
        return
    path = Path(target)
    if path.suffix.lower() in NOT_A_REPORT:
        suffix = {"--json": ".json", "--csv": ".csv"}.get(flag, ".html")
        raise OutputError(f"{flag} {target}: a report would replace a {path.suffix} file; name the report "
                          f"e.g. {path.with_suffix(suffix).name}")
    for other in protected:
        if other is not None and _same_file(path, Path(other)):
            raise OutputError(f"{flag} {target}: is also an input of this run; name another file for the report")
    if path.is_dir():
        raise OutputError(f"{flag} {target}: is a directory; name a file in it, e.g. {path / 'report.json'}")
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"{flag} {target}: the folder {folder} does not exist; create it or name another")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {target}: the folder {folder} is not writable; name another")
    if path.exists() and not overwrite:
        raise OutputError(f"{flag} {target}: exists; pass --overwrite to replace it, or name another file")


def check_output_folder(flag: str, target) -> None:
    """A folder that will be created (with its parents) at the end: refuse now what cannot be."""
    from sepconv.deploy.errors import OutputError

    path = Path(target)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {target}: is a file, not a folder; name a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {target}: {existing} is not a folder; name another")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {target}: {existing} is not writable; name another folder")


REPORT_HELP = ("an HTML report with charts to FILE (one self-contained page: inline SVG, no script, opens without a "
               "network); needs the plotting extra: pip install 'sepconv[report]'")
REPORT_DIR_HELP = ("a PNG of each chart in DIR (created if missing; existing PNGs of the same name are replaced only "
                   "with --overwrite)")


def report_flags(parser) -> None:
    """--report FILE and --report-dir DIR: the same flags in convert-model, bench-model and deploy-model."""
    parser.add_argument("--report", metavar="FILE", help=REPORT_HELP)
    parser.add_argument("--report-dir", metavar="DIR", help=REPORT_DIR_HELP)


def check_report_outputs(args, *, protected=(), flag: str = "--report", target=None) -> None:
    """Before any work: the report's paths can be written and the plotting extra is installed."""
    from sepconv.deploy.errors import OutputError

    target = getattr(args, "report", None) if target is None else target
    if target == "-":
        raise OutputError(f"{flag} -: the HTML report goes to a file; name one, e.g. report.html")
    check_output_file(flag, target, protected=protected, overwrite=args.overwrite)
    if args.report_dir:
        check_output_folder("--report-dir", args.report_dir)
    if target or args.report_dir:
        html_renderer()


def html_renderer():
    """sepconv.convert.html_report, imported now (lazily: never at import time), or the install hint in one line.

    It needs matplotlib, not TensorFlow; a device's sepconv-deploy wheel has neither, so the report is drawn on the
    workstation, from the JSON the device wrote, with sepconv-report."""
    from sepconv.deploy.errors import RuntimeMissingError

    try:
        from sepconv.convert import charts, html_report
    except ImportError:
        raise RuntimeMissingError("The HTML report needs the workstation side of sepconv with matplotlib: "
                                  "pip install 'sepconv[report]'") from None
    charts.require_matplotlib()
    return html_report


def write_html_report(args, documents, *, title: str, target=None) -> None:
    """Draw the report of `documents` ([(label, JSON dict)]) to --report (or `target`) and --report-dir, if asked."""
    target = getattr(args, "report", None) if target is None else target
    if not (target or args.report_dir):
        return
    renderer = html_renderer()
    runs = renderer.Runs()
    for label, document in documents:
        runs.add(renderer.classify(document, label))
    page = renderer.render(runs, title=title)
    renderer.write_report(page, target, args.report_dir, overwrite=args.overwrite)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b) or a.resolve() == b.resolve()
    except OSError:
        return False


def progress_printer(args, started: float):
    def say(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say


# ---------------------------------------------------------------------------------------------------- bench-model

# bench-model's flags, one per BenchOptions field: (flag, argparse type, help). Defaults and choices are the
# dataclass's (BenchOptions, preprocess.SCALES): bench-model and deploy-model add them with bench_flags, read them back
# with bench_options, and deploy-model passes them on to the device's bench-model with bench_argv.
BENCH_FLAGS = {
    "threads": ("--threads", thread_list, "thread counts, e.g. 1,2,4"),
    "batch": ("--batch", positive, "rows per inference where the model allows"),
    "inputs": ("--input", None, "an .npz with x (inputs) and optionally y (labels: top-1 accuracy is reported); "
                                "default: seeded random data of each input's shape and type"),
    "scale": ("--scale", None, "map integer --input pixels to [0, 1], [-1, 1] or leave them; auto: as the manifest "
                               "beside each artifact says (convert-model records it), else [0, 1]; float inputs are "
                               "taken as preprocessed"),
    "min_runs": ("--min-runs", positive, ""),  # when a case's timed runs stop: both met, or max_seconds
    "min_seconds": ("--min-time", seconds, "seconds of timed runs per case, at least"),
    "max_seconds": ("--max-time", seconds, "seconds of timed runs per case, at most"),
    "warmup_runs": ("--warmup-runs", count, ""),
    "warmup_seconds": ("--warmup-time", seconds, ""),
    "round_seconds": ("--round-time", seconds, "timed seconds per case per interleaved round; each case's runs per "
                                               "round follow from its warm-up latency"),
    "block": ("--block", positive, "with --round-time 0: a fixed number of timed runs per case per round"),
    "providers": ("--providers", lambda text: tuple(p for p in text.split(",") if p),
                  "ONNX Runtime execution providers, comma-separated"),
    "seed": ("--seed", int, "seed of the random inputs"),
}
UNITS = {"warmup_seconds": " s"}  # after the default in the help


def bench_flags(parser, names, **helps) -> None:
    """Add bench-model's flags for the BenchOptions fields `names`, in that order, with the dataclass's defaults
    (and --scale's choices); `helps` replaces a flag's help text for this command (its default is still appended)."""
    from dataclasses import fields

    from sepconv.deploy.bench import BenchOptions
    from sepconv.deploy.preprocess import AUTO, SCALES

    defaults = {f.name: f.default for f in fields(BenchOptions)}
    for name in names:
        flag, kind, text = BENCH_FLAGS[name]
        default = defaults[name]
        shown = "" if default is None else f"(default: {_flag_text(default)}{UNITS.get(name, '')})"
        extra = {"choices": (AUTO, *SCALES)} if name == "scale" else {
            "metavar": flag[2:].upper().replace("-", "_"), **({"type": kind} if kind else {})}  # as if dest were flag's
        parser.add_argument(flag, dest=name, default=default,
                            help=" ".join(t for t in (helps.get(name, text), shown) if t) or None, **extra)


def bench_options(args, **overrides):
    """The BenchOptions of a parsed command line: every BENCH_FLAGS field its parser has (bench_flags), XNNPACK off
    only when asked (--no-xnnpack), the rest the dataclass's defaults; `overrides` last."""
    from sepconv.deploy.bench import BenchOptions

    given = {name: getattr(args, name) for name in BENCH_FLAGS if hasattr(args, name)}
    if hasattr(args, "xnnpack"):
        given["xnnpack"] = args.xnnpack is not False  # deploy-model's None: as the device decides, on here
    return BenchOptions(**{**given, **overrides})


def bench_argv(options, names) -> tuple[str, ...]:
    """bench-model's flags giving `options`' fields `names` (deploy-model's command line on the device)."""
    return tuple(f"{BENCH_FLAGS[name][0]}={_flag_text(getattr(options, name))}" for name in names)


def _flag_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _output_flags(parser):
    """The last flags of both commands' parsers; returns the parser."""
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json / --csv file")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    version_flag(parser)
    return parser


def bench_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="bench-model",
        description="Measure the latency of .tflite (LiteRT) and .onnx (ONNX Runtime) artifacts side by side: load "
                    "time, first run, warm-up, then timed runs interleaved across models and thread counts until "
                    "both a minimum count and a minimum time are met. Prints a table (p50 with its 95%% confidence "
                    "interval, p90, mean, speed-up against the first model); --json / --csv / --markdown for "
                    "machines and docs. Needs only numpy and the runtimes.",
        epilog="example: bench-model original.tflite small_int8.tflite small_int8.onnx --threads 1,2 --json out.json")
    parser.add_argument("models", nargs="+", metavar="artifact", help=".tflite or .onnx files; the first is the "
                        "baseline of the speed-up column")
    bench_flags(parser, ("threads", "batch", "inputs", "scale", "min_runs", "min_seconds", "max_seconds",
                         "warmup_runs", "warmup_seconds", "round_seconds", "block"))
    parser.add_argument("--no-xnnpack", dest="xnnpack", action="store_false",
                        help="LiteRT's built-in kernels without XNNPACK")
    bench_flags(parser, ("providers", "seed"))
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE", help="the full report, with the raw samples, "
                        + JSON_HELP)
    parser.add_argument("--csv", metavar="FILE", help="one row per case as CSV ('-' for stdout; the same rules as "
                        "--json's FILE)")
    report_flags(parser)
    return _output_flags(parser)


def _bench_outputs(args) -> None:
    protected = [*args.models, args.inputs]
    check_output_file("--json", args.json, protected=protected, overwrite=args.overwrite)
    check_output_file("--csv", args.csv, protected=[*protected, args.json], overwrite=args.overwrite)
    check_report_outputs(args, protected=[*protected, args.json, args.csv])


def _bench(args) -> int:
    from sepconv.deploy.bench import benchmark

    started = time.perf_counter()
    report = benchmark(args.models, bench_options(args), progress=progress_printer(args, started))
    quiet_stdout = args.json == "-" or args.csv == "-"
    if args.json:
        write_output(args.json, json.dumps(report.to_dict(), indent=2))
    if args.csv:
        write_output(args.csv, cases_csv(report.cases))
    write_html_report(args, [("local", report.to_dict())],
                      title="bench-model: " + ", ".join(Path(m).name for m in args.models))
    if not quiet_stdout:
        print(report.table(markdown=args.markdown))
    return 0


def write_output(target: str, text: str) -> None:
    """`text` to stdout ('-') or whole to a file (a temporary name renamed at the end); a failed write (disk full)
    is one OutputError and leaves neither the temporary file nor a half-written one."""
    from sepconv.deploy.errors import OutputError

    if target == "-":
        print(text)
        return
    path = Path(target)
    try:
        write_atomic(path, text + ("" if text.endswith("\n") else "\n"), sync=True)
    except OSError as error:
        raise OutputError(f"{path}: could not be written ({error.strerror or error}); nothing half-written was "
                          f"left") from None


def cases_csv(cases, host: str = "local") -> str:
    """One row per Case (bench.CSV_COLUMNS), with a header row."""
    from sepconv.deploy.bench import CSV_COLUMNS

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for case in cases:
        writer.writerow(case.csv_row(host))
    return out.getvalue()


# --------------------------------------------------------------------------------------------------- deploy-model

# the bench-model flags deploy-model has (the device's bench-model gets them, and --compare-local's run here)
DEPLOY_BENCH_FLAGS = ("threads", "inputs", "scale", "min_runs", "min_seconds", "max_seconds")


def deploy_parser() -> argparse.ArgumentParser:
    from sepconv.deploy.remote import DeployOptions
    from sepconv.deploy.ssh import SshOptions

    parser = Parser(
        prog="deploy-model",
        description="Benchmark artifacts on devices over SSH (a Raspberry Pi, a fleet of them): probe each device, set "
                    "up the runtime in a virtual environment under one folder there (~/.sepconv, reused later), copy "
                    "the artifacts by content hash (skipping what is there), run bench-model on the device and bring "
                    "the report back. Uses your OpenSSH client, config, keys and known_hosts; never accepts an "
                    "unknown host key.",
        epilog="examples:\n  deploy-model pi@raspberrypi.local model_int8.tflite model_int8.onnx --threads 1,4\n"
               "  deploy-model pi1,pi2,pi3 model.tflite --compare-local --json fleet.json\n"
               "  deploy-model pi@10.0.0.7:2222 model.tflite --wheels wheels-aarch64/   # offline device\n\n"
               "exit status:\n  0    every host benchmarked\n  1    every host failed, or nothing could start (a "
               "bad artifact, an output path)\n  2    a bad flag\n  3    some hosts failed; the others' results are "
               "reported (--json / --csv keep a row with each failed host's error)\n  130  interrupted (Ctrl-C): "
               "the remote steps are stopped\n\nAn emulated device (qemu) runs without XNNPACK unless --xnnpack; "
               "its timings are meaningless. With --compare-local and a labelled --input, a device whose predictions "
               "differ from this machine's is flagged DIFFERS FROM LOCAL in the table, with a warning.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hosts", help="what you type after ssh: an alias, host, user@host or user@host:port; several "
                        "comma-separated for a fleet (benchmarked concurrently)")
    parser.add_argument("models", nargs="+", metavar="artifact", help=".tflite or .onnx files (their manifests "
                        "travel with them)")
    bench_flags(parser, DEPLOY_BENCH_FLAGS, threads="thread counts, e.g. 1,4",
                inputs="an .npz with x (and y for accuracy) to benchmark on; copied to the device")
    xnnpack = parser.add_mutually_exclusive_group()
    xnnpack.add_argument("--no-xnnpack", dest="xnnpack", action="store_false", default=None,
                         help="LiteRT's built-in kernels without XNNPACK, on the devices (and here with "
                         "--compare-local); the default on an emulated device")
    xnnpack.add_argument("--xnnpack", dest="xnnpack", action="store_true", default=None,
                         help="XNNPACK on even on an emulated device (default: on, except under emulation)")
    parser.add_argument("--compare-local", action="store_true", help="also benchmark here with the same options and "
                        "show it beside the devices")
    parser.add_argument("--remote-dir", default=DeployOptions.remote_dir, help="the one folder sepconv uses on the "
                        "device, relative to the remote home or absolute (default: %(default)s)")
    parser.add_argument("--wheels", help="a local folder of wheels for the device (offline install with --no-index)")
    parser.add_argument("--index-url", help="another package index for the device's pip")
    parser.add_argument("--ssh-config", help="an ssh_config file instead of ~/.ssh/config")
    parser.add_argument("--identity", help="a private key file for ssh")
    parser.add_argument("--connect-timeout", type=positive, default=SshOptions.connect_timeout,
                        help="(default: %(default)s s)")
    parser.add_argument("--timeout", type=positive, default=DeployOptions.timeout, help="seconds for any remote "
                        "step, installs included (default: %(default)s)")
    parser.add_argument("--reports", default="sepconv-reports", help="folder for one JSON report per host that "
                        "succeeded, created with a .gitignore so it never dirties a git checkout (default: "
                        "%(default)s)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE", help="{host: report or {host, error}} for "
                        "every host " + JSON_HELP)
    parser.add_argument("--csv", metavar="FILE", help="one row per host and case, one with the error for a failed "
                        "host, as CSV ('-' for stdout; the same rules as --json's FILE)")
    report_flags(parser)
    return _output_flags(parser)


def deploy_options(args):
    from sepconv.deploy.remote import DeployOptions
    from sepconv.deploy.ssh import SshOptions

    bench = bench_options(args)  # threads, inputs and XNNPACK are DeployOptions' own: the rest go as flags
    bench_args = bench_argv(bench, [name for name in DEPLOY_BENCH_FLAGS if name not in ("threads", "inputs")])
    return DeployOptions(threads=bench.threads, remote_dir=args.remote_dir, wheels=args.wheels,
                         index_url=args.index_url, inputs=bench.inputs, bench_args=bench_args, timeout=args.timeout,
                         xnnpack=args.xnnpack,
                         ssh=SshOptions(connect_timeout=args.connect_timeout, config=args.ssh_config,
                                        identity=args.identity))


def _deploy_outputs(args) -> None:
    protected = [*args.models, args.inputs]
    check_output_file("--json", args.json, protected=protected, overwrite=args.overwrite)
    check_output_file("--csv", args.csv, protected=[*protected, args.json], overwrite=args.overwrite)
    check_output_folder("--reports", args.reports)
    check_report_outputs(args, protected=[*protected, args.json, args.csv])


def _deploy(args) -> int:
    from sepconv.deploy.remote import deploy, prediction_mismatches

    started = time.perf_counter()
    say = progress_printer(args, started)
    hosts = [h for h in args.hosts.split(",") if h]
    results = deploy(hosts, args.models, deploy_options(args), progress=lambda host, message: say(f"{host}: {message}"))
    benched = [Benched(r.host, r.report.benchmark, r.report.device) for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    warnings = []
    if args.compare_local:
        from sepconv.deploy.bench import benchmark

        say("local: benchmarking here with the same options")
        local = benchmark(args.models, bench_options(args))
        benched = [b._replace(mismatch=prediction_mismatches(local, b.benchmark)) for b in benched]
        warnings = [f"WARNING: {b.host}: {m['model']} at {m['threads']} thread(s) predicts other classes than this "
                    f"machine on the same --input (top-1 {m['device_top1']:.2%} there, {m['local_top1']:.2%} here): "
                    f"the device's figures are not the model's" for b in benched for m in b.mismatch]
        benched.insert(0, Benched("local", local))
    everything = _save_reports(args, results, benched, failed)
    if benched:  # hosts side by side; failed hosts are listed with their error
        write_html_report(args, [("deploy-model", everything)],
                          title=f"deploy-model: {', '.join(r.host for r in results)}")
    if benched and args.json != "-" and args.csv != "-":
        print(deploy_table(benched, markdown=args.markdown) + "".join(f"\n{w}" for w in warnings))
    for line in warnings:
        print(f"deploy-model: {line}", file=sys.stderr)
    for result in failed:
        print(f"deploy-model: error: {result.error}", file=sys.stderr)
    if not failed:
        return 0
    return EXIT_SOME_HOSTS_FAILED if len(failed) < len(results) else EXIT_ERROR


class Benched(NamedTuple):
    """A row group of deploy-model's table: a host's (or, with --compare-local, this machine's) benchmark, the device
    the probe found (None here) and, with --compare-local, the cases whose predictions differ from this machine's."""

    host: str
    benchmark: BenchReport
    device: dict | None = None
    mismatch: list | None = None


def _save_reports(args, results, benched: list[Benched], failed: list) -> dict:
    """Write one JSON per benchmarked host to --reports, and --json / --csv; returns the --json document: {host:
    report} (this machine first with --compare-local, each device's with its prediction_mismatch), then each failed
    host's {host, error}."""
    from sepconv.deploy.bench import CSV_COLUMNS

    reports = {r.host: r.to_dict() for r in results if r.ok}
    for entry in benched:
        if entry.device is None:
            reports = {entry.host: {"host": entry.host, "benchmark": entry.benchmark.to_dict()}, **reports}
        elif entry.mismatch is not None:
            reports[entry.host]["prediction_mismatch"] = entry.mismatch
    if any(host != "local" for host in reports):
        folder = Path(args.reports)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / ".gitignore").exists():  # reports are results, not sources (as .pytest_cache does)
                (folder / ".gitignore").write_text("# written by deploy-model: its reports stay out of git\n*\n")
        except OSError as error:
            from sepconv.deploy.errors import OutputError

            raise OutputError(f"--reports {folder}: cannot be created ({error.strerror or error})") from None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for host, report in reports.items():
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in host)
            write_output(str(folder / f"{safe}-{stamp}.json"), json.dumps(report, indent=2))
    everything = {**reports, **{r.host: r.to_dict() for r in failed}}

    if args.json:
        write_output(args.json, json.dumps(everything, indent=2))
    if args.csv:
        rows = "".join(cases_csv(entry.benchmark.cases, entry.host).split("\n", 1)[1] for entry in benched)
        errors = io.StringIO()
        for result in failed:
            csv.writer(errors).writerow([result.host, *[""] * (len(CSV_COLUMNS) - 2), str(result.error)])
        write_output(args.csv, ",".join(CSV_COLUMNS) + "\n" + rows + errors.getvalue())
    return everything


def deploy_table(benched: list[Benched], *, markdown: bool = False) -> str:
    """One table for all hosts (bench-model's columns with the host in front), then a line per host: the device and
    its context. Speed-ups are within each host (against its first artifact)."""
    from tabulate import tabulate

    from sepconv.deploy.bench import HEADERS, context_line

    rows = [[entry.host, *row] for entry in benched
            for row in entry.benchmark.rows({(m["model"], m["threads"]) for m in entry.mismatch or ()})]
    table = tabulate(rows, headers=["host", *HEADERS], tablefmt="github" if markdown else "simple",
                     disable_numparse=True)
    lines = []
    for entry in benched:
        device = entry.device or {}
        name = entry.host if entry.device is None else \
            f"{entry.host} ({device.get('machine')}, {device.get('pi_model') or device.get('cpu')})"
        notes = ["EMULATED: timings are meaningless"] if device.get("emulated") else []
        if not entry.benchmark.options.get("xnnpack", True):
            notes.append("XNNPACK off")
        lines.append(f"{name}: {'; '.join([*notes, context_line(entry.benchmark.context)])}")
    return table + "\n" + "\n".join(lines)


def deploy_main(argv=None) -> int:
    args = deploy_parser().parse_args(argv)
    return run("deploy-model", _deploy, args, outputs=_deploy_outputs)


def bench_main(argv=None) -> int:
    args = bench_parser().parse_args(argv)
    return run("bench-model", _bench, args, outputs=_bench_outputs)


if __name__ == "__main__":
    sys.exit(bench_main())
