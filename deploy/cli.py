"""The device side's commands, `bench-model` and `deploy-model`, and the argument helpers both sides' CLIs share.

Each command parses its flags, calls one API function (`benchmark`, `deploy`) and prints; nothing else. Nothing
here imports TensorFlow: these commands run on a Raspberry Pi.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


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


def run(prog: str, body, args: argparse.Namespace) -> int:
    """Run `body(args)`; a sepconv error becomes one line on stderr and its exit status (a traceback with --debug)."""
    from sepconv.deploy.errors import SepconvError

    try:
        return body(args) or 0
    except SepconvError as error:
        if args.debug:
            raise
        status = getattr(error, "exit_status", EXIT_ERROR)
        print(f"{prog}: {'error: ' if status == EXIT_ERROR else ''}{error}", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`bench-model ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        return EXIT_ERROR


def progress_printer(args, started: float):
    def say(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say


# ---------------------------------------------------------------------------------------------------- bench-model

def _stop_flags(parser) -> None:
    """When a case's timed runs stop: the same flags, meaning and defaults in bench-model and deploy-model."""
    parser.add_argument("--min-runs", type=positive, default=50, help="(default: %(default)s)")
    parser.add_argument("--min-time", type=seconds, default=2.0, help="seconds of timed runs per case, at least "
                        "(default: %(default)s)")
    parser.add_argument("--max-time", type=seconds, default=60.0, help="seconds of timed runs per case, at most "
                        "(default: %(default)s)")


def _output_flags(parser):
    """The last flags of both commands' parsers; returns the parser."""
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
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
    parser.add_argument("--threads", type=thread_list, default=(1,), help="thread counts, e.g. 1,2,4 (default: 1)")
    parser.add_argument("--batch", type=positive, default=1, help="rows per inference where the model allows "
                        "(default: %(default)s)")
    parser.add_argument("--input", help="an .npz with x (inputs) and optionally y (labels: top-1 accuracy is "
                        "reported); default: seeded random data of each input's shape and type")
    _stop_flags(parser)
    parser.add_argument("--warmup-runs", type=count, default=10, help="(default: %(default)s)")
    parser.add_argument("--warmup-time", type=seconds, default=0.5, help="(default: %(default)s s)")
    parser.add_argument("--round-time", type=seconds, default=0.05, help="timed seconds per case per interleaved "
                        "round; each case's runs per round follow from its warm-up latency (default: %(default)s)")
    parser.add_argument("--block", type=positive, default=10, help="with --round-time 0: a fixed number of timed "
                        "runs per case per round (default: %(default)s)")
    parser.add_argument("--no-xnnpack", action="store_true", help="LiteRT's built-in kernels without XNNPACK")
    parser.add_argument("--providers", default="CPUExecutionProvider",
                        help="ONNX Runtime execution providers, comma-separated (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: %(default)s)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE", help="the full report as JSON, with the raw "
                        "samples (to FILE, or stdout without one)")
    parser.add_argument("--csv", metavar="FILE", help="one row per case as CSV ('-' for stdout)")
    return _output_flags(parser)


def bench_options(args):
    from sepconv.deploy.bench import BenchOptions

    return BenchOptions(threads=args.threads, warmup_runs=args.warmup_runs, warmup_seconds=args.warmup_time,
                        min_runs=args.min_runs, min_seconds=args.min_time, max_seconds=args.max_time,
                        block=args.block, round_seconds=args.round_time, batch=args.batch, inputs=args.input,
                        xnnpack=not args.no_xnnpack,
                        providers=tuple(p for p in args.providers.split(",") if p), seed=args.seed)


def _bench(args) -> int:
    from sepconv.deploy.bench import benchmark

    started = time.perf_counter()
    report = benchmark(args.models, bench_options(args), progress=progress_printer(args, started)).to_dict()
    quiet_stdout = args.json == "-" or args.csv == "-"
    if args.json:
        _write(args.json, json.dumps(report, indent=2))
    if args.csv:
        _write(args.csv, cases_csv(report["cases"]))
    if not quiet_stdout:
        print(cases_table(report, markdown=args.markdown))
    return 0


def _write(target: str, text: str) -> None:
    if target == "-":
        print(text)
        return
    path = Path(target)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text + ("" if text.endswith("\n") else "\n"))
    tmp.replace(path)


CSV_COLUMNS = ("host", "model", "format", "threads", "bytes", "count", "mean_ms", "std_ms", "min_ms", "p50_ms",
               "ci95_low_ms", "ci95_high_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "inferences_per_second",
               "speedup", "load_ms", "first_ms", "accuracy")


def cases_csv(cases, host: str = "local") -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for case in cases:
        writer.writerow(_csv_row(case, host))
    return out.getvalue()


def _csv_row(case: dict, host: str) -> list:
    lat = case["latency_ms"]
    return [host, case["model"], case["format"], case["threads"], case["artifact"]["bytes"], lat["count"],
            lat["mean"], lat["std"], lat["min"], lat["p50"], lat["ci95_p50"][0], lat["ci95_p50"][1], lat["p90"],
            lat["p95"], lat["p99"], lat["max"], lat["inferences_per_second"], case["speedup"], case["load_ms"],
            case["first_ms"], (case["accuracy"] or {}).get("top1")]


HEADERS = ["model", "format", "threads", "size", "p50 ms", "p50 95% CI", "p90 ms", "mean ± std ms", "runs", "speed-up",
           "accuracy"]


def cases_table(report: dict, *, markdown: bool = False) -> str:
    """The readable table: per case p50 [95% CI], p90, mean +- std, runs, speed-up, size, accuracy; then context."""
    from tabulate import tabulate

    table = tabulate(case_rows(report), headers=HEADERS, tablefmt="github" if markdown else "simple",
                     disable_numparse=True)
    return table + "\n" + context_line(report["context"])


def case_rows(report: dict) -> list[list]:
    rows = []
    for case in report["cases"]:
        lat = case["latency_ms"]
        accuracy = case["accuracy"]["top1"] if case["accuracy"] else None
        rows.append([case["model"], case["format"], case["threads"], f"{case['artifact']['bytes'] / 1024:,.0f} KiB",
                     f"{lat['p50']:.3f}", f"{lat['ci95_p50'][0]:.3f}-{lat['ci95_p50'][1]:.3f}", f"{lat['p90']:.3f}",
                     f"{lat['mean']:.3f} ± {lat['std']:.3f}", lat["count"], f"{case['speedup']:.2f}x",
                     "" if accuracy is None else f"{accuracy:.2%}"])
    return rows


def context_line(ctx: dict) -> str:
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


# --------------------------------------------------------------------------------------------------- deploy-model

def deploy_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="deploy-model",
        description="Benchmark artifacts on devices over SSH (a Raspberry Pi, a fleet of them): probe each device, set "
                    "up the runtime in a virtual environment under one folder there (~/.sepconv, reused later), copy "
                    "the artifacts by content hash (skipping what is there), run bench-model on the device and bring "
                    "the report back. Uses your OpenSSH client, config, keys and known_hosts; never accepts an "
                    "unknown host key.",
        epilog="examples:\n  deploy-model pi@raspberrypi.local model_int8.tflite model_int8.onnx --threads 1,4\n"
               "  deploy-model pi1,pi2,pi3 model.tflite --compare-local --json fleet.json\n"
               "  deploy-model pi@10.0.0.7:2222 model.tflite --wheels wheels-aarch64/   # offline device",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hosts", help="what you type after ssh: an alias, host, user@host or user@host:port; several "
                        "comma-separated for a fleet (benchmarked concurrently)")
    parser.add_argument("models", nargs="+", metavar="artifact", help=".tflite or .onnx files (their manifests "
                        "travel with them)")
    parser.add_argument("--threads", type=thread_list, default=(1,), help="thread counts, e.g. 1,4 (default: 1)")
    parser.add_argument("--input", help="an .npz with x (and y for accuracy) to benchmark on; copied to the device")
    _stop_flags(parser)
    parser.add_argument("--no-xnnpack", action="store_true", help="LiteRT's built-in kernels without XNNPACK, on the "
                        "devices (and here with --compare-local)")
    parser.add_argument("--compare-local", action="store_true", help="also benchmark here with the same options and "
                        "show it beside the devices")
    parser.add_argument("--remote-dir", default=".sepconv", help="the one folder sepconv uses on the device, relative "
                        "to the remote home or absolute (default: %(default)s)")
    parser.add_argument("--wheels", help="a local folder of wheels for the device (offline install with --no-index)")
    parser.add_argument("--index-url", help="another package index for the device's pip")
    parser.add_argument("--ssh-config", help="an ssh_config file instead of ~/.ssh/config")
    parser.add_argument("--identity", help="a private key file for ssh")
    parser.add_argument("--connect-timeout", type=positive, default=15, help="(default: %(default)s s)")
    parser.add_argument("--timeout", type=positive, default=1800, help="seconds for any remote step, installs "
                        "included (default: %(default)s)")
    parser.add_argument("--reports", default="sepconv-reports", help="folder for one JSON report per host "
                        "(default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="all hosts' reports in one JSON file ('-' for stdout)")
    parser.add_argument("--csv", metavar="FILE", help="one row per host and case as CSV ('-' for stdout)")
    return _output_flags(parser)


def deploy_options(args):
    from sepconv.deploy.remote import DeployOptions
    from sepconv.deploy.ssh import SshOptions

    bench_args = ("--min-runs", str(args.min_runs), "--min-time", str(args.min_time), "--max-time", str(args.max_time),
                  *(["--no-xnnpack"] if args.no_xnnpack else []))
    return DeployOptions(threads=args.threads, remote_dir=args.remote_dir, wheels=args.wheels,
                         index_url=args.index_url, inputs=args.input, bench_args=bench_args, timeout=args.timeout,
                         ssh=SshOptions(connect_timeout=args.connect_timeout, config=args.ssh_config,
                                        identity=args.identity))


def _deploy(args) -> int:
    from sepconv.deploy.errors import SepconvError
    from sepconv.deploy.remote import deploy

    started = time.perf_counter()
    say = progress_printer(args, started)
    options = deploy_options(args)
    hosts = [h for h in args.hosts.split(",") if h]
    results = deploy(hosts, args.models, options, progress=lambda host, message: say(f"{host}: {message}"))
    reports = {host: r.to_dict() for host, r in results.items() if not isinstance(r, SepconvError)}
    if args.compare_local:
        from sepconv.deploy.bench import benchmark

        say("local: benchmarking here with the same options")
        local = benchmark(args.models, threads=args.threads, inputs=args.input, min_runs=args.min_runs,
                          min_seconds=args.min_time, max_seconds=args.max_time, xnnpack=not args.no_xnnpack).to_dict()
        reports = {"local": {"host": "local", "benchmark": local}, **reports}
    _save_reports(args, reports)
    if reports and args.json != "-" and args.csv != "-":
        print(deploy_table(reports, markdown=args.markdown))
    failed = [r for r in results.values() if isinstance(r, SepconvError)]
    for error in failed:
        print(f"deploy-model: error: {error}", file=sys.stderr)
    return EXIT_ERROR if failed else 0


def _save_reports(args, reports: dict) -> None:
    if reports:
        folder = Path(args.reports)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for host, report in reports.items():
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in host)
            _write(str(folder / f"{safe}-{stamp}.json"), json.dumps(report, indent=2))
    if args.json:
        _write(args.json, json.dumps(reports, indent=2))
    if args.csv:
        rows = "".join(cases_csv(r["benchmark"]["cases"], host).split("\n", 1)[1] for host, r in reports.items())
        _write(args.csv, ",".join(CSV_COLUMNS) + "\n" + rows)


def deploy_table(reports: dict, *, markdown: bool = False) -> str:
    """One table for all hosts (bench-model's columns with the host in front), then a line per host: the device and
    its context. Speed-ups are within each host (against its first artifact)."""
    from tabulate import tabulate

    rows = [[host, *row] for host, report in reports.items() for row in case_rows(report["benchmark"])]
    table = tabulate(rows, headers=["host", *HEADERS], tablefmt="github" if markdown else "simple",
                     disable_numparse=True)
    lines = []
    for host, report in reports.items():
        device = report.get("device") or {}
        name = host if host == "local" else f"{host} ({device.get('machine')}, {device.get('pi_model') or device.get('cpu')})"
        lines.append(f"{name}: {context_line(report['benchmark']['context'])}")
    return table + "\n" + "\n".join(lines)


def deploy_main(argv=None) -> int:
    args = deploy_parser().parse_args(argv)
    return run("deploy-model", _deploy, args)


def bench_main(argv=None) -> int:
    args = bench_parser().parse_args(argv)
    return run("bench-model", _bench, args)


if __name__ == "__main__":
    sys.exit(bench_main())
