"""Command-line entry points. They parse arguments, call one API function each and print; nothing else.

TensorFlow is imported only after the arguments are parsed, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from sepconv.convert.demo import QUICK_EPOCHS, QUICK_FILTERS, model_file
from sepconv.convert.supervise import die_with_parent, in_worker, report_stage, reported_as_interrupt, supervise
from sepconv.deploy import logs, report
from sepconv.deploy.choices import FORMS
from sepconv.deploy.clikit import (
    JSON_HELP,
    REPORT_DIR_HELP,
    Parser,
    check_output_file,
    check_report_outputs,
    json_failure,
    report_flags,
    verbosity_flags,
    version_flag,
    write_html_report,
    write_output,
)
from sepconv.deploy.clikit import run as run_command
from sepconv.deploy.flags import checked as _checked
from sepconv.deploy.flags import count as _count
from sepconv.deploy.flags import positive as _positive


def _quiet_tensorflow(debug: bool, devices: bool = True) -> None:
    """Import TensorFlow with its C++ start-up chatter (oneDNN, CUDA probing) kept off the user's terminal.

    TensorFlow 2.21 logs these through absl before TF_CPP_MIN_LOG_LEVEL applies, so the process's output is captured
    while TensorFlow imports and initialises its devices (not with devices=False: --strategy multi-worker must
    configure them itself, first); --debug keeps everything.
    """
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if debug:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from sepconv.deploy.quiet import captured_output

    with captured_output():
        try:
            import tensorflow as tf

            if devices:
                tf.config.list_logical_devices()
            tf.get_logger().setLevel("ERROR")  # e.g. retracing notices when several models are evaluated
        except ImportError:
            pass  # reported where a function needs TensorFlow, with the install hint


def run(prog: str, body, args: argparse.Namespace, outputs=None) -> int:
    """Import TensorFlow quietly, then run `body(args)` as every sepconv command does (sepconv.deploy.clikit.run): a
    sepconv error is one line on stderr and its exit status (a traceback with --debug)."""
    _quiet_tensorflow(args.debug, devices=getattr(args, "strategy", None) != "multi-worker")
    if not args.debug:  # Keras 3 warns on every call of a legacy (Keras 2) model saved with a list input; harmless
        import warnings

        warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match the expected structure")
    return run_command(prog, body, args, outputs)


_fraction = _checked(float, lambda v: 0 < v <= 1, "fraction", "a number in (0, 1]")
_points = _checked(float, lambda v: 0 <= v < 100, "number of points", "points of accuracy in [0, 100), e.g. 1.0")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "number", "a finite number > 0")
_weight = _checked(float, lambda v: v >= 0, "weight", "a number >= 0")
_share = _checked(float, lambda v: 0 <= v <= 1, "share", "a number in [0, 1]")
_open_fraction = _checked(float, lambda v: 0 < v < 1, "fraction", "a number in (0, 1)")
_confidence = _checked(float, lambda v: 0 <= v < 1, "confidence", "a number in [0, 1)")
_seed = _checked(int, lambda v: 0 <= v < 2 ** 32, "seed", "a whole number in [0, 2**32)")
_whole = _checked(int, lambda v: v >= 0, "size", "a whole number >= 0")
_rank = _checked(lambda t: t if t == "full" else int(t), lambda v: v == "full" or v >= 1, "rank",
                 "a whole number >= 1 or 'full'")


def _floats(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid list {text!r}: use comma-separated numbers, e.g. 0.485,0.456,0.406"
                                         ) from None


def convert_parser() -> argparse.ArgumentParser:
    from sepconv.convert.data import AUTO, SCALES, DataOptions
    from sepconv.convert.export.onnx import LAYOUTS, ONNX_MODES
    from sepconv.convert.export.quantization import QuantizationOptions
    from sepconv.convert.export.targets import OnnxOutputOptions, TFLiteOutputOptions, extensions_text, io_types
    from sepconv.convert.export.verification import Tolerance
    from sepconv.convert.options import DEFAULT_EPOCHS, DEFAULT_MAX_DROP, QUANTIZE_CHOICES, ConvertOptions
    from sepconv.convert.recovery.finetuning import (DEFAULT_LEARNING_RATE, NOISE_LEARNING_RATE, STRATEGIES,
                                                      FinetuneOptions)
    from sepconv.convert.separation.policy import DEFAULT_ENERGY
    from sepconv.deploy.remote import DEFAULT_REMOTE_DIR
    from sepconv.deploy.timing import TimingOptions

    # every flag's default (and choices) is its option's own: one source of truth
    run, data, fit, timing = ConvertOptions(), DataOptions(), FinetuneOptions(), TimingOptions()
    quantization, tolerance = QuantizationOptions(), Tolerance()

    parser = Parser(
        prog="convert-model",
        description="Separate a trained Keras CNN's Conv2D layers, export quantized TFLite / ONNX (or .keras), verify "
                    "every artifact against the Keras model on held-out inputs, and write each artifact with a JSON "
                    "manifest beside it (out.tflite.json). Nothing is written unless every artifact passes.",
        epilog="examples:\n  convert-model model.h5 model.tflite --data images/      # budget 1 point, refine, fine-tune, "
               "int8\n  convert-model model.h5 model.tflite model.onnx --data images/ --rank 1 --epochs 0\n"
               "  convert-model model.h5 model.tflite --data images/ --resume   # continue after Ctrl-C",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="the trained Keras model (.keras or .h5, Keras 3 or Keras 2)")
    parser.add_argument("outputs", nargs="+", metavar="output",
                        help=f"artifacts to write; the format follows the extension: "
                             f"{extensions_text().replace(' or ', ', ')}")
    group = parser.add_argument_group("data (calibration and verification)")
    group.add_argument("--data", help="an .npz with x (and y), or a folder of images (in class sub-folders for labels)")
    group.add_argument("--scale", choices=(AUTO, *SCALES), default=data.scale,
                       help="map 0..255 pixels to [0, 1], [-1, 1] or leave them; auto: leave them when the model "
                            "has its own Rescaling layer at the input, else [0, 1] (default: %(default)s); float .npz "
                            "arrays are taken as preprocessed")
    group.add_argument("--mean", type=_floats, help="per-channel mean subtracted after scaling, e.g. 0.485,0.456,0.406")
    group.add_argument("--std", type=_floats, help="per-channel std divided after the mean, e.g. 0.229,0.224,0.225")
    group.add_argument("--max-samples", type=_positive, help="read at most this many samples of each data file (a "
                       "seeded random choice), before the split: the test and validation samples shrink with it")
    group.add_argument("--data-cache-mb", type=_whole, default=data.cache_mb, metavar="MB",
                       help="a data file whose decoded images take at most this many MiB is read once into memory; a "
                       "larger one streams from disk in batches (memory stays flat at any size); 0 streams everything "
                       "(default: %(default)s)")
    group.add_argument("--test-data", help="test data (same forms as --data) for scoring and verification only, never "
                       "for choosing; default: --heldout-fraction of --data")
    group.add_argument("--validation-data", help="validation data (same forms as --data) that makes every choice, "
                       "instead of --validation-fraction of --data: pass it when --data is the set the model was "
                       "trained on, whose scores are inflated")
    group.add_argument("--heldout-fraction", type=_open_fraction, default=run.heldout_fraction,
                       help="share of --data held out as test data when there is no --test-data (default: "
                            "%(default)s)")
    group.add_argument("--validation-fraction", type=_open_fraction, default=run.validation_fraction,
                       help="share of the rest set aside as validation data, which makes every choice: the rank "
                            "per layer, early stopping, keeping or rejecting each recovery stage (default: "
                            "%(default)s)")
    group.add_argument("--calibration-samples", type=_positive, default=run.calibration_samples,
                       help="training samples that calibrate int8, refinement and BatchNorm (default: %(default)s)")
    group = parser.add_argument_group(
        "separation", f"with --data the default is --max-accuracy-drop {DEFAULT_MAX_DROP}; without, --energy "
                     f"{DEFAULT_ENERGY} (no training)")
    policy = group.add_mutually_exclusive_group()
    group.add_argument("--budget-output", metavar="NAME", help="a model with several outputs: the accuracy budget on "
                       "this output alone (its layer's name, or its index; e.g. the main head, not an auxiliary one); "
                       "default: every output, the worst drop")
    policy.add_argument("--max-accuracy-drop", type=_points, metavar="POINTS",
                        help="choose K per layer so that at most this many points of accuracy (agreement with the "
                             "original without labels) are lost on the validation data; checked after recovery")
    policy.add_argument("--rank", type=_rank, help="the rank of every separated layer (depth multiplier K; with --form "
                        "spatial the channels r between the halves), or 'full' (exact)")
    policy.add_argument("--energy", type=_fraction,
                        help="per layer, the smallest rank keeping this fraction of the kernel's energy")
    group.add_argument("--form", choices=(*FORMS, "auto"),
                       help="the separable form: depthwise (a SeparableConv2D: depthwise then pointwise; --rank is "
                            "its depth multiplier K), spatial (a kh x 1 then a 1 x kw Conv2D, both dense, which CPUs "
                            "run faster per operation; --rank is the channels r between them) or auto (each "
                            "layer's form and rank chosen by --max-accuracy-drop and the measured latency; needs the "
                            "budget) (default: depthwise)")
    group.add_argument("--include", action="append", metavar="PATTERN", help="separate only layers matching "
                       "(fnmatch on name or path; repeatable)")
    group.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                       help="never separate layers matching (repeatable)")
    group.add_argument("--no-separate", action="store_true", help="export the model as it is")
    group.add_argument("--refine", action=argparse.BooleanOptionalAction,
                       help="refit each separated layer's pointwise weights by least squares so that its output "
                            "matches the original layer's on the calibration images, no training (default: on with "
                            "--data)")
    group.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction,
                       help="re-estimate BatchNorm statistics of the separated model on the calibration images "
                            "(default: on with --data)")
    group = parser.add_argument_group(
        "latency on the target", "on by default: with the accuracy budget, each layer's K (or keeping it) is chosen "
        "from latency measured where the model will run (a single-layer model per layer and K, exported as the first "
        ".tflite / .onnx output is, timed here or on a device over deploy-model's SSH, cached per device and runtime "
        "version); and each .tflite / .onnx artifact is timed against the original converted the same way, the "
        "original shipped instead of a slower one unless --rank / --energy forced the separation")
    group.add_argument("--latency", action=argparse.BooleanOptionalAction, dest="measure_latency",
                       help="--no-latency: choose K from accuracy and parameters alone and time nothing (default: on "
                            "when separating)")
    target = group.add_mutually_exclusive_group()
    target.add_argument("--target-latency", type=_positive_float, metavar="MS",
                        help="the whole model's p50 latency to reach (ms): the plan that loses the least accuracy "
                             "among those predicted to reach it within --max-accuracy-drop")
    target.add_argument("--target-speedup", type=_positive_float, metavar="X",
                        help="the same, as a speed-up against the original exported the same way")
    group.add_argument("--latency-on", metavar="WHERE",
                       help="'local' (this machine, the default) or a host as deploy-model takes it (alias, "
                            "user@host[:port]); without a target: the fastest plan within the budget. A separation "
                            "slower than keeping its layer is never chosen")
    group.add_argument("--latency-threads", type=_positive, default=timing.threads, metavar="N",
                       help="threads the latency is measured at "
                       "(default: %(default)s)")
    group.add_argument("--latency-xnnpack", action=argparse.BooleanOptionalAction,
                       help="LiteRT's XNNPACK delegate while timing (default: on, off on an emulated device)")
    group.add_argument("--latency-time", type=_positive_float, default=timing.min_seconds, metavar="S",
                       help="seconds of timed runs per single-layer model (default: %(default)s)")
    group.add_argument("--latency-cache", metavar="DIR", help="where measurements are kept (default: "
                       "~/.cache/sepconv/latency)")
    group.add_argument("--ssh-config", metavar="FILE",
                       help="with --latency-on HOST: an ssh_config file instead of ~/.ssh/config")
    group.add_argument("--identity", metavar="FILE", help="with --latency-on HOST: a private key file for ssh")
    group.add_argument("--wheels", metavar="DIR",
                       help="with --latency-on HOST: a local folder of wheels for an offline device")
    group.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR, metavar="DIR",
                       help="with --latency-on HOST: the one folder sepconv uses "
                       "on the device (default: %(default)s)")
    group = parser.add_argument_group("fine-tuning (needs --data; labels are used when the data has them, "
                                      "else distillation from the original)")
    group.add_argument("--epochs", type=_count, help="at most this many epochs, early stopping on validation "
                       f"accuracy/agreement (default: {DEFAULT_EPOCHS} with --data; 0 turns fine-tuning off)")
    group.add_argument("--batch-size", type=_positive, default=fit.batch_size, help="(default: %(default)s)")
    group.add_argument("--learning-rate", type=_positive_float,
                       help=f"Adam's peak rate, cosine-decayed (default: {DEFAULT_LEARNING_RATE:g}, "
                            f"{NOISE_LEARNING_RATE:g} for the pass under int8 noise)")
    group.add_argument("--label-weight", type=_share, default=fit.label_weight,
                       help="share of the label loss; the rest is distillation (default: %(default)s)")
    group.add_argument("--temperature", type=_positive_float, default=fit.temperature,
                       help="distillation temperature (default: %(default)s)")
    group.add_argument("--feature-distillation", type=_weight, default=fit.feature_weight, metavar="WEIGHT",
                       help="also match each separated layer's output to the original's, with this weight "
                            "(default: %(default)s, off)")
    group.add_argument("--patience", type=_positive, default=fit.patience,
                       help="epochs without improvement before stopping "
                       "(default: %(default)s)")
    group.add_argument("--frozen-batchnorm-pass", action=argparse.BooleanOptionalAction,
                       default=fit.frozen_batchnorm_pass,
                       help="after fine-tuning a model with BatchNorm, fine-tune again with BatchNorm frozen (moving "
                            "statistics), kept only if validation improves (default: on)")
    group.add_argument("--int8-noise", action=argparse.BooleanOptionalAction, default=None,
                       help="after fine-tuning, an int8 export checks the model's int8 stability (top-1 kept under "
                            "uniform noise of half an int8 step on every tensor int8 rounds) and fine-tunes again "
                            "under that noise when under 99%%, kept only if the validation score under the noise "
                            "rises; --int8-noise runs that pass always, --no-int8-noise never (default: by the check)")
    group.add_argument("--strategy", choices=STRATEGIES, default=fit.strategy,
                       help="tf.distribute: mirrored over all visible devices, auto when there are several, "
                            "multi-worker across the hosts of TF_CONFIG (every worker runs the same command; the chief "
                            "writes; docs/finetune.md) (default: %(default)s)")
    group.add_argument("--checkpoint-dir", help="per-epoch checkpoints (default: the first output + .checkpoints); "
                       "removed once the artifacts are written")
    group.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    group = parser.add_argument_group("export")
    group.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=run.quantize,
                       help=f"auto: int8 with --data, dynamic without; a mode the validation images reject "
                            f"falls back (dynamic, then float16 / float32), and float32 replaces one that runs over "
                            f"10%% slower than the original in float32 (default: %(default)s); ONNX takes "
                            f"{', '.join(ONNX_MODES)}")
    tflite, onnx = TFLiteOutputOptions(), OnnxOutputOptions()  # the flags' defaults are the options' own
    group.add_argument("--io-type", choices=io_types(), default=tflite.io_type,
                       help="input/output tensor type of int8 (float32, int8, uint8) or int16x8 (float32, int16) "
                            "TFLite models (default: %(default)s)")
    group.add_argument("--per-tensor", action="store_true", help="per-tensor weight quantization (default: per-channel)")
    group.add_argument("--allow-flex", action="store_true",
                       help="let TFLite embed TensorFlow (Flex) ops; the plain LiteRT runtime of a Pi cannot run them")
    group.add_argument("--opset", type=int, default=onnx.opset, help="ONNX opset, 13..18 (default: %(default)s)")
    group.add_argument("--layout", choices=LAYOUTS, default=onnx.layout, help="ONNX input layout "
                       "(default: %(default)s, as in Keras)")
    group.add_argument("--explain-quantization", action="store_true",
                       help="int8: report each layer's quantization error, output range and scale on the calibration "
                            "images (in the manifest and --json), even when the artifact verifies")
    group.add_argument("--repair", action=argparse.BooleanOptionalAction, default=quantization.repair,
                       help="int8 that disagrees with the Keras model: try cross-layer equalization, weight "
                            "rounding, better calibration, the other weight granularity, then keep the worst layers "
                            "in float (default: on)")
    group.add_argument("--equalize", action=argparse.BooleanOptionalAction, default=quantization.equalize,
                       help="int8 repair: first rescale each separable layer's depthwise channels and pointwise "
                            "rows against each other, and each BatchNorm's channels against the layer that reads "
                            "them through a ReLU (the same float model, balanced for int8) (default: on)")
    group.add_argument("--round-weights", action=argparse.BooleanOptionalAction, default=quantization.round_weights,
                       help="int8 repair: round each layer's weights to keep its output on the calibration images "
                            "(GPTQ), then with bias correction; per-channel weights only (default: on)")
    group.add_argument("--max-float-layers", type=_count, default=quantization.max_float_layers, metavar="N",
                       help="int8 repair keeps at most N layers in float (default: %(default)s)")
    group.add_argument("--repair-aim", type=_share, default=quantization.aim, metavar="F",
                       help="int8 that passes --min-agreement but agrees with the Keras model on fewer than F of the "
                            "validation images is repaired too (no layer kept in float), the attempt that agrees best "
                            "kept; 0 keeps the first that passes (default: %(default)s)")
    group = parser.add_argument_group("verification and output")
    group.add_argument("--min-agreement", type=_fraction, default=tolerance.min_agreement,
                       help="top-1 agreement a quantized artifact must reach (default: %(default)s)")
    group.add_argument("--confidence", type=_confidence, default=tolerance.confidence,
                       help="fail --min-agreement and --max-accuracy-drop only when the held-out images show the "
                            "shortfall with this one-sided confidence (Wilson bound); 0 fails any measured value under "
                            "the bar (default: %(default)s)")
    group.add_argument("--overwrite", action="store_true", help="replace existing output files")
    group.add_argument("--custom-objects", action="append", default=[], metavar="MODULE[:NAME]",
                       help="import custom layers/functions the model uses (repeatable)")
    group.add_argument("--unsafe-allow-lambda", action="store_true",
                       help="load Lambda layers holding Python code (only for files you trust)")
    group.add_argument("--max-unpacked-mb", type=_positive, metavar="MB",
                       help="what the input model file may declare unpacked (zip members, HDF5 datasets) before it is "
                            "refused as a possible zip bomb (default: 100x the file's size, at least 256, at most "
                            "16384)")
    group.add_argument("--json", nargs="?", const="-", metavar="FILE", help="a machine-readable summary " + JSON_HELP)
    report_flags(group)
    verbosity_flags(group)
    group.add_argument("--debug", action="store_true", help="show tracebacks and converter logs")
    version_flag(parser)
    return parser


def convert_options(args, *, custom_objects: bool = True):
    """The one mapping from convert-model's flags to ConvertOptions; custom_objects=False leaves --custom-objects'
    modules unimported (the TensorFlow-free preflight)."""
    from sepconv.convert.data import DataOptions
    from sepconv.convert.export.quantization import QuantizationOptions
    from sepconv.convert.export.targets import OnnxOutputOptions, TFLiteOutputOptions
    from sepconv.convert.export.verification import Tolerance
    from sepconv.convert.loading import parse_custom_objects
    from sepconv.convert.options import ConvertOptions
    from sepconv.convert.recovery.finetuning import FinetuneOptions
    from sepconv.convert.separation.policy import SeparationOptions

    return ConvertOptions(
        quantize=args.quantize,
        separate=not args.no_separate,
        separation=SeparationOptions(rank=args.rank, energy=args.energy, include=args.include, exclude=args.exclude),
        form=args.form,
        budget_output=args.budget_output,
        max_accuracy_drop=args.max_accuracy_drop,
        refine=args.refine,
        recalibrate_bn=args.recalibrate_bn,
        epochs=args.epochs,
        finetune=FinetuneOptions(batch_size=args.batch_size, learning_rate=args.learning_rate,
                                 label_weight=args.label_weight, temperature=args.temperature,
                                 feature_weight=args.feature_distillation, patience=args.patience,
                                 strategy=args.strategy, frozen_batchnorm_pass=args.frozen_batchnorm_pass,
                                 int8_noise=args.int8_noise),
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        data=args.data,
        test_data=args.test_data,
        validation_data=args.validation_data,
        heldout_fraction=args.heldout_fraction,
        validation_fraction=args.validation_fraction,
        data_options=DataOptions(scale=args.scale, mean=args.mean, std=args.std, max_samples=args.max_samples,
                                 cache_mb=args.data_cache_mb),
        calibration_samples=args.calibration_samples,
        targets=(TFLiteOutputOptions(io_type=args.io_type, per_channel=not args.per_tensor, allow_flex=args.allow_flex),
                 OnnxOutputOptions(opset=args.opset, layout=args.layout, per_channel=not args.per_tensor)),
        tolerance=Tolerance(min_agreement=args.min_agreement, confidence=args.confidence),
        quantization=QuantizationOptions(repair=args.repair, explain=args.explain_quantization,
                                         max_float_layers=args.max_float_layers, equalize=args.equalize,
                                         round_weights=args.round_weights, aim=args.repair_aim),
        overwrite=args.overwrite,
        safe_mode=not args.unsafe_allow_lambda,
        custom_objects=(parse_custom_objects(args.custom_objects) if custom_objects else None) or None,
        max_unpacked_bytes=args.max_unpacked_mb * (1 << 20) if args.max_unpacked_mb else None,
        latency=latency_options(args),
        measure_latency=args.measure_latency,
    )


def latency_options(args):
    """--target-latency / --target-speedup / --latency-on and their companions as LatencyOptions, or None when none of
    them was given (the run then measures with LatencyOptions' defaults, unless --no-latency)."""
    from sepconv.deploy.remote import DEFAULT_REMOTE_DIR
    from sepconv.deploy.timing import TimingOptions

    timing = TimingOptions()
    given = (args.target_latency, args.target_speedup, args.latency_on, args.latency_xnnpack, args.latency_cache,
             args.ssh_config, args.identity, args.wheels)
    if all(value is None for value in given) and (args.latency_threads, args.latency_time) == (
            timing.threads, timing.min_seconds) and args.remote_dir == DEFAULT_REMOTE_DIR:
        return None
    from sepconv.convert.recovery.latency_choice import LatencyTarget
    from sepconv.convert.recovery.latency_table import LatencyOptions
    from sepconv.deploy.remote import DeployOptions
    from sepconv.deploy.ssh import SshOptions

    where = None if args.latency_on in (None, "local") else args.latency_on
    device = DeployOptions(remote_dir=args.remote_dir, wheels=args.wheels,
                           ssh=SshOptions(config=args.ssh_config, identity=args.identity))
    return LatencyOptions(target=LatencyTarget(ms=args.target_latency, speedup=args.target_speedup), where=where,
                          timing=TimingOptions(threads=args.latency_threads, xnnpack=args.latency_xnnpack,
                                               min_seconds=args.latency_time, deploy=device),
                          cache_dir=args.latency_cache)


def _convert(args) -> int:
    from sepconv.convert.pipeline import convert_model

    log = logs.to_log("convert")  # printed by the handler clikit.run installs: warnings even with -q

    def progress(stage, message):
        report_stage(stage)
        log(stage, message)

    result = convert_model(args.input, args.outputs, options=convert_options(args), progress=progress)
    summary = json.dumps(result.to_dict(), indent=2, default=str)
    if args.json:
        write_output(args.json, summary)
    write_html_report(args, [(Path(args.input).name, json.loads(summary))], title=f"convert-model: {args.input}")
    if args.json != "-":
        print(result.table())
    return 0


def _preflight(args) -> int:
    from sepconv.convert.pipeline import preflight

    preflight(args.input, args.outputs, convert_options(args, custom_objects=False))
    return 0


def _convert_outputs(args) -> None:
    """--json FILE is checked before any work; it is never an input, an output or an output's manifest."""
    protected = [args.input, args.data, args.test_data, args.validation_data, *args.outputs, *(f"{o}.json" for o in args.outputs)]
    check_output_file("--json", args.json, protected=protected, overwrite=args.overwrite)
    check_report_outputs(args, protected=[*protected, args.json])


# What each workstation command needs beyond sepconv's base install (numpy, tabulate), and the extra that brings it:
# checked before any work, so that an [edge] or bare install says so in one line instead of a ModuleNotFoundError.
EXTRAS = {
    "convert-model": (("tensorflow", "keras", "h5py", "tf2onnx", "onnx", "PIL"), "convert"),
    "sepconv-demo": (("tensorflow", "keras", "h5py", "tf2onnx", "onnx", "PIL", "sklearn", "matplotlib"),
                     "convert,demo"),
    "sepconv-report": (("matplotlib",), "report"),
}


def missing_extra(prog: str) -> str | None:
    """The one-line error for a command whose extra is not installed (None when everything it needs is there)."""
    import importlib.util

    modules, extra = EXTRAS[prog]
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed, and {prog} needs "
            f"{'it' if len(missing) == 1 else 'them'}: pip install 'sepconv[{extra}]' (this install has only what "
            f"runs on a device: bench-model, deploy-model)")


def _refused_for_extra(prog: str, args) -> int:
    """1 after the one-line error when `prog`'s extra is missing (a JSON failure too with --json -), else 0."""
    message = missing_extra(prog)
    if message is None:
        return 0
    print(f"{prog}: error: {message}", file=sys.stderr)
    json_failure(args, prog, "MissingExtraError", message, 1, False)
    return 1


def convert_main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = convert_parser().parse_args(argv)
    if not in_worker():  # the work runs in a child process (supervise.py: a native crash becomes one line)
        if _refused_for_extra("convert-model", args):
            return 1
        status = run_command("convert-model", _preflight, args, _convert_outputs)
        if status:  # a wrong path or flag: said at once, before the worker and TensorFlow start
            return status
        first = Path(args.outputs[0])
        checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else first.with_name(first.name + ".checkpoints")
        return _supervised("convert-model", argv, checkpoints, json_target=args.json)
    die_with_parent()
    return run("convert-model", reported_as_interrupt(_convert), args, outputs=_convert_outputs)


def demo_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sepconv-demo",
        description="Train the tutorial network on scikit-learn's bundled digits (once; cached as an .h5), load it "
                    "back as a user's file would be, separate it at K=1 and with the default energy policy and print "
                    "each separation report with test accuracy; then run convert-model with its defaults for data "
                    "(rank per layer for a 1-point accuracy budget, least-squares refinement, fine-tuning, int8 "
                    "TFLite and ONNX) on the training digits, scored and verified on the test digits; finally the "
                    "speed table: bench-model on the original and the separated model, float32 and int8, TFLite and "
                    "ONNX, at 1 and 2 threads; and the HTML report of it all (report.html, a PNG per chart in "
                    "report/). Nothing is downloaded. --quick runs the same steps on the network at a quarter of "
                    "the width: a first look in a few minutes instead of about ten on 2 cores.")
    parser.add_argument("--out", type=Path, default=Path("build/demo"),
                        help="directory for the demo model and reports (default: %(default)s)")
    parser.add_argument("--epochs", type=_count, help=f"training epochs of the original (default: 15, with --quick "
                        f"{QUICK_EPOCHS})")
    parser.add_argument("--quick", action="store_true", help="the same steps on the tutorial network at a quarter "
                        f"of the width (filters {', '.join(map(str, QUICK_FILTERS))}; cached as "
                        f"{model_file(quick=True)}), the speed table at 1 thread only")
    parser.add_argument("--seed", type=_seed, default=0,
                        help="seed of the data split and training, 0..2**32-1 (default: %(default)s)")
    parser.add_argument("--retrain", action="store_true", help="train again even if the cached model exists")
    parser.add_argument("--no-bench", action="store_true", help="skip the speed table (bench-model on the original "
                        "and separated models, float32 and int8, TFLite and ONNX, 1 and 2 threads)")
    parser.add_argument("--bench-time", type=float, default=1.0, help="seconds of timed runs per case in the speed "
                        "table (default: %(default)s)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="the summary (every figure of the tables, and more) " + JSON_HELP + "; to stdout it "
                             "replaces the tables, to a FILE it comes beside them")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json FILE (the demo's own "
                        "files in --out are always replaced)")
    verbosity_flags(parser, quiet="no tables or progress on stdout, only where the reports are",
                    verbose="also the lines that only count items off (each layer done, each timing round)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    version_flag(parser)
    return parser


def _demo_outputs(args) -> None:
    check_output_file("--json", args.json, protected=[args.out / model_file(args.quick)], overwrite=args.overwrite)


def _demo(args) -> int:
    from sepconv.convert.demo.digits import run_demo

    quiet = args.json == "-" or args.quiet  # the JSON summary goes to stdout instead of the tables
    say = None if quiet else lambda text: print(text, flush=True)
    summary = run_demo(args.out, epochs=args.epochs, seed=args.seed, retrain=args.retrain, bench=not args.no_bench,
                       bench_time=args.bench_time, quick=args.quick, say=say, verbose=args.verbose)
    if args.json:
        write_output(args.json, json.dumps(summary, indent=2, default=str))
    if not quiet:
        print(f"reports, artifacts and manifests are in {args.out}/ ({summary['seconds']} s)")
    return 0


def demo_main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = demo_parser().parse_args(argv)
    if not in_worker():
        if _refused_for_extra("sepconv-demo", args):
            return 1
        return _supervised("sepconv-demo", argv, json_target=args.json)
    die_with_parent()
    return run("sepconv-demo", reported_as_interrupt(_demo), args, outputs=_demo_outputs)


def report_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sepconv-report",
        description="Draw one self-contained HTML report (inline SVG charts and tables, no script, opens without a "
                    "network) from saved JSON: convert-model's --json summary (per-layer sensitivity and chosen K, "
                    "parameters and MACs per layer, each recovery stage, the artifacts), bench-model's and "
                    "deploy-model's --json reports (latency distributions, speed-ups, accuracy, memory, the devices; "
                    "several runs or hosts side by side), sepconv-demo's --json summary. Needs matplotlib "
                    "(pip install 'sepconv[report]'), not TensorFlow.",
        epilog="examples:\n  sepconv-report convert.json bench.json -o report.html\n"
               "  sepconv-report sepconv-reports/*.json -o fleet.html --report-dir charts/   # and a PNG per chart",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="run.json", help="JSON written by convert-model, bench-model, "
                        "deploy-model (--json FILE, or a file of sepconv-reports/) or sepconv-demo --json")
    parser.add_argument("-o", "--output", metavar="FILE", help="the HTML report to write, e.g. report.html")
    parser.add_argument("--report-dir", metavar="DIR", help="also " + REPORT_DIR_HELP)
    parser.add_argument("--title", default="sepconv report", help="the page's title (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report or PNG")
    verbosity_flags(parser, quiet="no line on stdout", verbose="also a line per run read, with its kind")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    version_flag(parser)
    return parser


def _report(args) -> int:
    renderer = report.renderer()
    runs = renderer.load_runs(args.inputs)
    say = logs.to_log_plain("report", "-", logging.DEBUG)  # shown with -v
    for label, run in runs.converts:
        say(f"[{label}] a conversion of {Path(str(run.get('source', {}).get('path', '?'))).name}")
    for label, _, device in runs.benches:
        say(f"[{label}] a benchmark" + (f" on {device.get('cpu') or device.get('pi_model')}" if device else ""))
    renderer.write_report(renderer.render(runs, title=args.title), args.output, args.report_dir,
                          overwrite=args.overwrite)
    written = [p for p in (args.output, args.report_dir) if p]
    if not args.quiet:
        print(f"wrote {' and '.join(written)} ({len(runs.converts)} conversion(s), {len(runs.benches)} benchmark(s)"
              f"{f', {len(runs.failed)} failed host(s)' if runs.failed else ''})")
    return 0


def report_main(argv=None) -> int:
    parser = report_parser()
    args = parser.parse_args(argv)
    if not (args.output or args.report_dir):
        parser.error("name the HTML file with -o FILE (or a folder for PNGs with --report-dir DIR)")
    if _refused_for_extra("sepconv-report", args):
        return 1
    return run_command("sepconv-report", _report, args,
                       outputs=lambda a: check_report_outputs(a, protected=a.inputs, flag="-o", target=a.output))


def _supervised(prog: str, argv: list[str], checkpoints: Path | None = None, json_target=None) -> int:
    """The parent's part: run the worker (supervise.py); a native crash is one line on stderr, and the JSON failure
    record too when --json asks for one."""
    from sepconv.convert.supervise import EXIT_CRASH

    status, crash = supervise(prog, argv, checkpoints)
    if crash is not None:
        print(f"{prog}: error: {crash}", file=sys.stderr)
        if json_target:
            from types import SimpleNamespace

            json_failure(SimpleNamespace(json=json_target), prog, "NativeCrash", crash, EXIT_CRASH, True)
    return status


MAINS = {"convert-model": convert_main, "sepconv-demo": demo_main}

# `sepconv COMMAND`: one command family (docs/architecture.md); the long names stay as aliases of the same mains
COMMANDS = {"convert": ("convert-model", "separate, recover, export, verify and time a Keras model"),
            "bench": ("bench-model", "time .tflite / .onnx artifacts side by side on this machine"),
            "deploy": ("deploy-model", "install, copy and time artifacts on devices over SSH"),
            "report": ("sepconv-report", "draw an HTML report from the tools' JSON"),
            "demo": ("sepconv-demo", "the whole pipeline on scikit-learn's bundled digits")}


def sepconv_main(argv=None) -> int:
    """`sepconv convert | bench | deploy | report | demo ARGS...`: the same as convert-model, bench-model,
    deploy-model, sepconv-report and sepconv-demo (whose names its messages keep); `sepconv COMMAND --help` for each."""
    from sepconv.deploy.cli import bench_main, deploy_main
    from sepconv.deploy.clikit import version

    argv = sys.argv[1:] if argv is None else list(argv)
    mains = {"convert": convert_main, "bench": bench_main, "deploy": deploy_main, "report": report_main,
             "demo": demo_main}
    if argv and argv[0] in mains:
        return mains[argv[0]](argv[1:]) or 0
    if argv and argv[0] == "--version":
        print(f"sepconv {version()}")
        return 0
    usage = "usage: sepconv {convert,bench,deploy,report,demo} ... (sepconv COMMAND --help for its options)"
    if argv and argv[0] in ("-h", "--help"):
        rows = "\n".join(f"  {name:<8} {text} (also: {alias})" for name, (alias, text) in COMMANDS.items())
        print(f"{usage}\n\nTurn a trained Keras CNN into a smaller, faster edge model, and prove it.\n\ncommands:\n"
              f"{rows}\n\n  --version  the version")
        return 0
    given = f"unknown command {argv[0]!r}" if argv else "no command given"
    print(f"{usage}\nsepconv: error: {given}; use one of {', '.join(mains)}", file=sys.stderr)
    return 2

if __name__ == "__main__":  # python -m sepconv.convert.cli [PROG] ARGS... (supervise.py names PROG; default: the demo)
    if len(sys.argv) > 1 and sys.argv[1] in MAINS:
        sys.exit(MAINS[sys.argv[1]](sys.argv[2:]))
    sys.exit(demo_main(sys.argv[1:]))
