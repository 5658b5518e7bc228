"""bench-model's flags, declared once from BenchOptions: the argparse types they use, the flag table, adding them to a
parser, reading them back, and writing them out again as a device's bench-model command line. Library code may
import this module (deploy.timing does); it imports no CLI."""

from __future__ import annotations

import argparse

from sepconv.deploy.bench import BenchOptions
from sepconv.deploy.preprocess import AUTO, SCALES


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


seed = checked(int, lambda v: 0 <= v < 2 ** 32, "seed", "a whole number in [0, 2**32)")


thread_list = checked(lambda t: tuple(int(v) for v in t.split(",")), lambda v: all(t >= 1 for t in v),
                      "thread list", "comma-separated whole numbers >= 1, e.g. 1,2,4")


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
    "seed": ("--seed", seed, "seed of the random inputs"),
    "profile": ("--profile", None, "after the timed runs, where each case's time goes: per op (ONNX Runtime's "
                                   "profiler; a .tflite's prefixes timed one after the other) and per Keras layer, "
                                   "with each layer's share of the MACs"),
}


UNITS = {"warmup_seconds": " s"}  # after the default in the help


def bench_flags(parser, names, **helps) -> None:
    """Add bench-model's flags for the BenchOptions fields `names`, in that order, with the dataclass's defaults
    (and --scale's choices); `helps` replaces a flag's help text for this command (its default is still appended)."""
    from dataclasses import fields


    defaults = {f.name: f.default for f in fields(BenchOptions)}
    for name in names:
        flag, kind, text = BENCH_FLAGS[name]
        default = defaults[name]
        if isinstance(default, bool):  # a switch, off by default
            parser.add_argument(flag, dest=name, action="store_true", help=helps.get(name, text))
            continue
        shown = "" if default is None else f"(default: {_flag_text(default)}{UNITS.get(name, '')})"
        extra = {"choices": (AUTO, *SCALES)} if name == "scale" else {
            "metavar": flag[2:].upper().replace("-", "_"), **({"type": kind} if kind else {})}  # as if dest were flag's
        parser.add_argument(flag, dest=name, default=default,
                            help=" ".join(t for t in (helps.get(name, text), shown) if t) or None, **extra)


def bench_options(args, **overrides):
    """The BenchOptions of a parsed command line: every BENCH_FLAGS field its parser has (bench_flags), XNNPACK off
    only when asked (--no-xnnpack), the rest the dataclass's defaults; `overrides` last."""
    given = {name: getattr(args, name) for name in BENCH_FLAGS if hasattr(args, name)}
    if hasattr(args, "xnnpack"):
        given["xnnpack"] = args.xnnpack is not False  # deploy-model's None: as the device decides, on here
    return BenchOptions(**{**given, **overrides})


def bench_argv(options, names) -> tuple[str, ...]:
    """bench-model's flags giving `options`' fields `names` (deploy-model's command line on the device)."""
    argv = []
    for name in names:
        flag, value = BENCH_FLAGS[name][0], getattr(options, name)
        if value is True:  # a switch: the flag alone; off, nothing
            argv.append(flag)
        elif value is not False:
            argv.append(f"{flag}={_flag_text(value)}")
    return tuple(argv)


def _flag_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


# the bench-model flags deploy-model has (the device's bench-model gets them, and --compare-local's run here)
DEPLOY_BENCH_FLAGS = ("threads", "inputs", "scale", "batch", "min_runs", "min_seconds", "max_seconds", "warmup_runs",
                      "warmup_seconds", "providers", "seed", "profile")
