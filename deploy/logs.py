"""sepconv's progress lines as Python logging, so that a program embedding the API can route or silence them.

Every stage reports through a `progress(stage, message)` callable (the API's `progress=` argument). Without one, the
API logs to the `sepconv` logger's children (`sepconv.convert`, `sepconv.bench`, `sepconv.deploy`), each record
carrying its `stage`: warnings at WARNING, lines that only count items off at DEBUG, the rest at INFO. Python shows
WARNING and above on stderr when nothing is configured, so an embedding program sees the warnings and nothing else
until it configures logging (`logging.getLogger("sepconv").setLevel(logging.INFO)` and a handler). The commands
install `cli_handler`, which prints today's `[  12.3s] stage: message` lines on stderr: INFO by default, WARNING with
-q, DEBUG with -v.

A detail line (DEBUG) is one that only counts items: "[3/9] block_3_bn" (a layer done, nothing measured in it),
"[2/3] conv: refined" (its measurement is in the stage's summary line), "round 6: 1,035,311 timed runs so far".
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time

ROOT = "sepconv"
# (a device's lines come prefixed by deploy-model: "pi4: device: round 6: ...")
_DETAIL = re.compile(r"^(?:[^\s:]+: )*"  # prefixes
                     r"(\[\d+/\d+\] [^:\s]+(: (refined|skipped[^;]*))?|round \d+: .* timed runs so far.*)$")


def logger(name: str) -> logging.Logger:
    """The `sepconv.NAME` logger."""
    return logging.getLogger(f"{ROOT}.{name}")


def level_of(stage: str, message: str) -> int:
    if stage == "warning":
        return logging.WARNING
    return logging.DEBUG if _DETAIL.match(message) else logging.INFO


def is_detail(stage: str, message: str) -> bool:
    """A line that only counts items off (shown with -v)."""
    return level_of(stage, message) == logging.DEBUG


def to_log(name: str, level: int | None = None):
    """A progress(stage, message) callable logging to `sepconv.NAME` (at `level`, or the module doc's levels)."""
    log = logger(name)

    def progress(stage: str, message: str) -> None:
        log.log(level or level_of(stage, message), message, extra={"stage": stage})

    return progress


def to_log_plain(name: str, stage: str, level: int | None = None):
    """A progress(message) callable (bench-model's and deploy-model's form) logging to `sepconv.NAME` as `stage`."""
    progress = to_log(name, level)
    return lambda message: progress(stage, message)


class _Callback(logging.Handler):
    def __init__(self, on_record):
        super().__init__(logging.DEBUG)
        self.on_record = on_record

    def emit(self, record: logging.LogRecord) -> None:
        self.on_record(record)


class _Lines(logging.Formatter):
    def __init__(self, started: float):
        super().__init__()
        self.started = started

    def format(self, record: logging.LogRecord) -> str:
        stage = getattr(record, "stage", None)
        prefix = f"{stage}: " if stage and stage != "-" else ""
        return f"[{time.perf_counter() - self.started:6.1f}s] {prefix}{record.getMessage()}"


def verbosity_level(quiet: bool, verbose: bool) -> int:
    return logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO


@contextlib.contextmanager
def cli_handler(started: float, level: int, on_record=None):
    """While the block runs, `sepconv` log records at `level` and above are printed on stderr as progress lines
    (started: the command's perf_counter at start); on_record(record), if given, sees every record first (the
    convert worker tells its parent which stage it is in)."""
    root = logging.getLogger(ROOT)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Lines(started))
    handler.setLevel(level)
    handlers = [handler] + ([_Callback(on_record)] if on_record is not None else [])
    saved = root.level, root.propagate
    for each in handlers:
        root.addHandler(each)
    root.setLevel(logging.DEBUG if on_record is not None else level)
    root.propagate = False  # the lines are printed once, here, whatever the program's root logger does
    try:
        yield handler
    finally:
        for each in handlers:
            root.removeHandler(each)
        root.setLevel(saved[0])
        root.propagate = saved[1]
