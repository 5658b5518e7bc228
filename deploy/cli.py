"""The device side's commands, `bench-model` and `deploy-model` (the kit both sides' commands share is clikit.py,
bench-model's flags are flags.py).

Each command parses its flags, calls one API function (`benchmark`, `deploy`) and prints; nothing else. Nothing
here imports TensorFlow: these commands run on a Raspberry Pi.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from sepconv.deploy.clikit import (
    EXIT_ERROR,
    EXIT_SOME_HOSTS_FAILED,
    JSON_HELP,
    Parser,
    check_output_file,
    check_output_folder,
    check_report_outputs,
    progress_printer,
    report_flags,
    run,
    verbosity_flags,
    version_flag,
    write_html_report,
    write_output,
)
from sepconv.deploy.flags import DEPLOY_BENCH_FLAGS, bench_argv, bench_flags, bench_options, positive

if TYPE_CHECKING:  # numpy and the runtimes load when a command runs, not for --help
    from sepconv.deploy.bench import BenchReport

# ---------------------------------------------------------------------------------------------------- bench-model

def _output_flags(parser):
    """The last flags of both commands' parsers; returns the parser."""
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json / --csv file")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    verbosity_flags(parser)
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
    bench_flags(parser, ("providers", "seed", "profile"))
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

    report = benchmark(args.models, bench_options(args))  # its progress: the sepconv.bench logger, which run prints
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
    parser.add_argument("hosts", help="an ssh host: an alias of your ssh config, host or user@host, with :port if "
                        "not 22 (ssh itself takes -p PORT); several comma-separated for a fleet (benchmarked "
                        "concurrently)")
    parser.add_argument("models", nargs="*", metavar="artifact", help=".tflite or .onnx files (their manifests "
                        "travel with them)")
    parser.add_argument("--hosts", dest="hosts_file", metavar="FILE", help="the fleet's hosts from FILE, one a line "
                        "(# comments and blank lines ignored), instead of the HOST argument: deploy-model --hosts "
                        "FILE ARTIFACT...")
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


def read_hosts(path) -> list[str]:
    """The hosts of a fleet file: one a line, `#` starts a comment, blank lines ignored; each checked as ssh takes it
    (ssh.parse_target), so a bad line is one error naming the file and the line."""
    from sepconv.deploy.errors import InvalidOptionError
    from sepconv.deploy.ssh import parse_target

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidOptionError(f"--hosts {path}: cannot be read ({getattr(error, 'strerror', None) or error}); "
                                 f"give a text file with one host a line") from None
    hosts = []
    for number, line in enumerate(lines, 1):
        host = line.split("#", 1)[0].strip()
        if not host:
            continue
        try:
            parse_target(host)
        except InvalidOptionError as error:
            raise InvalidOptionError(f"--hosts {path}, line {number}: {error}") from None
        hosts.append(host)
    if not hosts:
        raise InvalidOptionError(f"--hosts {path}: no host in it; give one host a line")
    return hosts


def _deploy_outputs(args) -> None:
    if args.hosts_file and not getattr(args, "hosts_read", False):  # the HOST argument was the first artifact
        args.models, args.hosts = [args.hosts, *args.models], ",".join(read_hosts(args.hosts_file))
        args.hosts_read = True
    protected = [*args.models, args.inputs]
    check_output_file("--json", args.json, protected=protected, overwrite=args.overwrite)
    check_output_file("--csv", args.csv, protected=[*protected, args.json], overwrite=args.overwrite)
    check_output_folder("--reports", args.reports)
    check_report_outputs(args, protected=[*protected, args.json, args.csv])


def _deploy(args) -> int:
    from sepconv.deploy.remote import deploy, prediction_mismatches

    say = progress_printer("deploy")
    hosts = [h for h in args.hosts.split(",") if h]
    results = deploy(hosts, args.models, deploy_options(args))  # its progress: "HOST: ..." lines on sepconv.deploy
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
    parser = deploy_parser()
    args = parser.parse_args(argv)
    if not args.models and not args.hosts_file:
        parser.error("the following arguments are required: artifact")
    return run("deploy-model", _deploy, args, outputs=_deploy_outputs)


def bench_main(argv=None) -> int:
    args = bench_parser().parse_args(argv)
    return run("bench-model", _bench, args, outputs=_bench_outputs)


if __name__ == "__main__":
    sys.exit(bench_main())
