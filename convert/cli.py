"""Command-line entry points. They parse arguments, call one API function each and print; nothing else.

TensorFlow is imported only after the arguments are parsed, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_ERROR = 1


def _quiet_tensorflow(debug: bool) -> None:
    """Import TensorFlow with its C++ start-up chatter (oneDNN, CUDA probing) kept off the user's terminal.

    TensorFlow 2.21 logs these through absl before TF_CPP_MIN_LOG_LEVEL applies, so the process's stderr is pointed
    at /dev/null while TensorFlow imports and initialises its devices; --debug keeps everything.
    """
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if debug:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                import tensorflow as tf

                tf.config.list_logical_devices()
                tf.get_logger().setLevel("ERROR")  # e.g. retracing notices when several models are evaluated
            except ImportError:
                pass  # reported where a function needs TensorFlow, with the install hint
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def run(prog: str, body, args: argparse.Namespace) -> int:
    """Run `body(args)`; a sepconv error becomes one line on stderr and exit status 1 (a traceback with --debug)."""
    _quiet_tensorflow(args.debug)
    from sepconv.convert.errors import SepconvError

    try:
        return body(args) or 0
    except SepconvError as error:
        if args.debug:
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sepconv-demo",
        description="Train the tutorial network on scikit-learn's bundled digits (once; cached as an .h5), load it "
                    "back as a user's file would be, separate it at K=1 and with the default energy policy, and "
                    "print each separation report with test accuracy. Nothing is downloaded.")
    parser.add_argument("--out", type=Path, default=Path("build/demo"),
                        help="directory for the demo model and reports (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of the original (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and training (default: %(default)s)")
    parser.add_argument("--retrain", action="store_true", help="train again even if the cached model exists")
    parser.add_argument("--json", action="store_true", help="print one JSON summary instead of tables")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _demo(args) -> int:
    from sepconv.convert import DEFAULT_ENERGY, demo, separate

    started = time.perf_counter()
    model_path = args.out / "digits_tutorial.h5"
    trained = args.retrain or not model_path.exists()
    if not args.json:
        print(f"{'training' if trained else 'loading'} the demo model {model_path} ...", flush=True)
    model = demo.demo_model(model_path, epochs=args.epochs, seed=args.seed, retrain=args.retrain,
                            verbose=0 if args.json else 2)
    split = demo.digits(seed=args.seed)
    baseline = demo.accuracy(model, split.x_test, split.y_test)
    summary = {"model": str(model_path), "test_images": int(len(split.y_test)), "original": {
        "params": model.count_params(), "test_accuracy": baseline}, "separations": []}
    if not args.json:
        print(f"original: {model.count_params():,} parameters, test accuracy {baseline:.2%} "
              f"on {len(split.y_test)} held-out digits\n")
    for label, options in (("K=1 on every Conv2D", {"rank": 1}),
                           (f"default policy (energy={DEFAULT_ENERGY})", {})):
        separated, report = separate(model, **options)
        score = demo.accuracy(separated, split.x_test, split.y_test)
        summary["separations"].append({"label": label, "options": options, "test_accuracy": score,
                                       "report": report.to_dict()})
        (args.out / f"report_{'k1' if options else 'default'}.json").write_text(report.to_json(indent=2))
        if not args.json:
            print(f"== {label} (no fine-tuning)\n{report}\n"
                  f"test accuracy: {score:.2%} (original {baseline:.2%})\n")
    summary["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"reports written to {args.out}/report_*.json ({summary['seconds']} s)")
    return 0


def demo_main(argv=None) -> int:
    args = demo_parser().parse_args(argv)
    return run("sepconv-demo", _demo, args)


if __name__ == "__main__":
    sys.exit(demo_main())
