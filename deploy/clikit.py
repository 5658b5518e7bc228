"""What both sides' commands share: the parser that reports a bad flag in one line, the exit statuses, running a
command body with one-line errors (a traceback only with --debug) and a JSON failure report, output paths checked
before any work, the report flags, progress lines. Only command modules (convert.cli, deploy.cli) import it."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

from sepconv.deploy import logs, report
from sepconv.deploy.files import write_atomic

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


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("sepconv")
    except PackageNotFoundError:
        return "unknown"


def version_flag(parser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s (sepconv) {version()}")


def run(prog: str, body, args: argparse.Namespace, outputs=None) -> int:
    """Check the output paths (`outputs(args)`, before any work), then run `body(args)`; a sepconv error becomes one
    line on stderr and its exit status (a traceback with --debug), and with --json a JSON {"error": ...} as well."""
    from sepconv.deploy.errors import SepconvError, Terminated

    checked = False
    level = logs.verbosity_level(getattr(args, "quiet", False), getattr(args, "verbose", False))
    try:
        with terminated_as_interrupt(), logs.cli_handler(time.perf_counter(), level):
            if outputs:
                outputs(args)
            checked = True
            return body(args) or 0
    except SepconvError as error:
        if args.debug:
            raise
        status = getattr(error, "exit_status", EXIT_ERROR)
        message = one_line(str(error))
        print(f"{prog}: {'error: ' if status == EXIT_ERROR else ''}{message}", file=sys.stderr)
        json_failure(args, prog, type(error).__name__, message, status, checked, getattr(error, "details", None),
                     unwritable=getattr(error, "unwritable", None))
        return status
    except Terminated as stop:
        print(f"{prog}: terminated ({stop.name})", file=sys.stderr)
        json_failure(args, prog, "Terminated", f"terminated ({stop.name})", 128 + stop.signum, checked)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        json_failure(args, prog, "KeyboardInterrupt", "interrupted", EXIT_INTERRUPTED, checked)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`bench-model ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        return EXIT_ERROR


@contextlib.contextmanager
def terminated_as_interrupt():
    """SIGTERM and SIGHUP raise errors.Terminated (a KeyboardInterrupt) for the duration, in the main thread (only it
    can own signals); the handlers before are put back after."""
    import signal
    import threading

    from sepconv.deploy.errors import TERMINATING, raise_terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, raise_terminated)
                for signum in (getattr(signal, name) for name in TERMINATING if hasattr(signal, name))}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def one_line(text: str) -> str:
    """`text` with its control characters escaped (a newline in a file name, a converter's multi-line message), so
    that an error stays one line."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


def json_failure(args, prog: str, kind: str, message: str, status: int, checked: bool, details=None,
                 unwritable: str | None = None) -> None:
    """With --json, a failure is JSON too: to stdout, or to the JSON file if its path passed the checks; `details`
    (an error's machine-readable extras, e.g. the int8 diagnosis table) go in error.details."""
    from sepconv.deploy.errors import SepconvError

    target = "-" if getattr(args, "json", None) is True else getattr(args, "json", None)
    if not target or (target != "-" and (not checked or str(Path(target)) == unwritable)):
        return  # a path not checked, or the very file that could not be written (the error said nothing was left)
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
        report.renderer()


def write_html_report(args, documents, *, title: str, target=None) -> None:
    """Draw the report of `documents` ([(label, JSON dict)]) to --report (or `target`) and --report-dir, if asked."""
    target = getattr(args, "report", None) if target is None else target
    if not (target or args.report_dir):
        return
    renderer = report.renderer()
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


def progress_printer(name: str):
    """A progress(message) callable for a command's stage-less lines, through the `sepconv.NAME` logger (the handler
    `run` installs prints them as `[  1.2s] message`, as -q / -v say)."""
    return logs.to_log_plain(name, "-")


def verbosity_flags(parser, *, quiet: str = "no progress lines on stderr (warnings still)",
                    verbose: str = "every progress line, those that only count items off too (each layer done, each "
                                   "timing round)") -> None:
    """-q and -v, as every command has them."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help=quiet)
    group.add_argument("-v", "--verbose", action="store_true", help=verbose)


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
        failed = OutputError(f"{path}: could not be written ({error.strerror or error}); nothing half-written was "
                             f"left")
        failed.unwritable = str(path)  # json_failure writes no failure record there either
        raise failed from None
