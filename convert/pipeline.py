"""`convert_model`: the whole job behind `convert-model in.h5 out.tflite [out.onnx ...]`.

load -> separate and recover (budget, refine, BatchNorm, fine-tune: recovery.py) -> export each output -> verify
each artifact against the Keras model -> write artifacts and manifests. All outputs of a run share one loaded model,
one separation and one data split. Nothing is written unless every artifact passes verification: artifacts go to
temporary files beside their targets and are renamed only at the end, so a failure leaves no partial file; the input
is only read.

Defaults follow the data: with `data`, the rank is chosen for an accuracy budget (1 point), the separated model is
refined, its BatchNorm statistics re-estimated and fine-tuned for up to 10 epochs, and quantized to int8; without
data, a conservative separation (energy 0.9) that keeps accuracy without training, dynamic-range quantization, and
a hint that data unlocks the real savings. `ConvertOptions.plan()` says which choices were defaults and why.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from sepconv.convert.data import DataOptions, check_labels, load_data, split
from sepconv.convert.errors import (BudgetError, DiskFullError, InvalidOptionError, OutputBusyError, OutputPathError,
                                    SepconvError, UnsupportedModelError, VerificationError)
from sepconv.convert.finetuning import FinetuneOptions
from sepconv.convert.onnx_export import DEFAULT_OPSET, ONNX_MODES, OnnxOptions
from sepconv.convert.tflite_export import NEEDS_DATA, TFLITE_MODES, TFLiteOptions
from sepconv.convert.files import disk_full, sha256
from sepconv.convert.memory import release_memory
from sepconv.convert.policy import SeparationOptions
from sepconv.convert.quantization import Calibration, QuantizationOptions
from sepconv.convert.results import Artifact, ConvertResult, DataInfo, Plan, Source
from sepconv.convert.verification import Tolerance, within_budget

FORMATS = {".tflite": "tflite", ".onnx": "onnx", ".keras": "keras"}
QUANTIZE_CHOICES = ("auto",) + TFLITE_MODES
SYNTHETIC_SAMPLES = 64
MIN_SAMPLES = 20  # a run with data needs some samples to train on, some to validate with and some to test on
DEFAULT_MAX_DROP = 1.0  # points of accuracy the budget mode may lose, the default with data
DEFAULT_EPOCHS = 10
CHECKPOINTS_SUFFIX = ".checkpoints"
MAX_INPUT_ELEMENTS = 1 << 25  # values per input sample (e.g. 3344 x 3344 x 3): 128 MiB of float32 each


@dataclass(frozen=True)
class ConvertOptions:
    """Everything `convert_model` can be told; validated on construction. The CLI maps its flags onto these fields.

    quantize: 'auto' (int8 with data, dynamic without) or a mode of export_tflite / export_onnx.
    separation: SeparationOptions (rank, energy, include, exclude); separate=False exports the model as it is.
    max_accuracy_drop: points of accuracy (agreement without labels) the separated model may lose; K is then chosen
    per layer (budget.py). None: 1.0 with data when separation gives no rank / energy, off otherwise.
    refine / recalibrate_bn: least-squares refit of separated layers / BatchNorm statistics re-estimated on the
    calibration images (None: on with data). epochs: fine-tuning epochs (None: 10 with data; 0: none); finetune:
    its other options. checkpoint_dir: fine-tuning checkpoints (default: first output + ".checkpoints"); resume:
    continue an interrupted run from them.
    data: an .npz or image folder; test_data: held-out data for scoring and verification, never used to choose
    (default: heldout_fraction of data). validation_fraction: the share of the remaining data set aside for every
    choice (the budget's sensitivity, early stopping, keeping or rejecting each recovery stage); validation_data:
    that data from its own file instead (say when --data is the set the model was trained on).
    calibration_samples: training samples that calibrate int8, refinement and BatchNorm statistics.
    quantization: int8 diagnosis and repair (quantization.py): explain, repair, max_float_layers.
    latency: latency_table.LatencyOptions: with the accuracy budget, each layer's K chosen from latency measured on
    this machine or a device (target latency / speed-up, threads, XNNPACK); its export options follow the first
    .tflite / .onnx output. None: K from accuracy and parameters alone.
    """

    quantize: str = "auto"
    separate: bool = True
    separation: SeparationOptions = field(default_factory=SeparationOptions)
    max_accuracy_drop: float | None = None
    refine: bool | None = None
    recalibrate_bn: bool | None = None
    epochs: int | None = None
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    checkpoint_dir: str | None = None
    resume: bool = False
    data: str | None = None
    test_data: str | None = None
    validation_data: str | None = None
    heldout_fraction: float = 0.25
    validation_fraction: float = 0.2
    data_options: DataOptions = field(default_factory=DataOptions)
    calibration_samples: int = 200
    io_type: str = "float32"
    per_channel: bool = True
    allow_flex: bool = False
    opset: int = DEFAULT_OPSET
    layout: str = "nhwc"
    tolerance: Tolerance = field(default_factory=Tolerance)
    quantization: QuantizationOptions = field(default_factory=QuantizationOptions)
    overwrite: bool = False
    safe_mode: bool = True
    custom_objects: dict | None = None
    max_unpacked_bytes: int | None = None
    latency: object | None = None

    def __post_init__(self):
        if self.quantize not in QUANTIZE_CHOICES:
            raise InvalidOptionError(f"Unrecognized quantize={self.quantize!r}. Supported modes are: "
                                     f"{list(QUANTIZE_CHOICES)}")
        if not isinstance(self.calibration_samples, int) or self.calibration_samples < 1:
            raise InvalidOptionError(f"Unrecognized calibration_samples={self.calibration_samples!r}. Use a whole "
                                     f"number >= 1")
        for name, example in (("heldout_fraction", 0.25), ("validation_fraction", 0.2)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
                raise InvalidOptionError(f"Unrecognized {name}={value!r}. Use a fraction in (0, 1), e.g. {example}")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 0):
            raise InvalidOptionError(f"Unrecognized epochs={self.epochs!r}. Use a whole number >= 0 (0: no "
                                     f"fine-tuning)")
        if self.max_unpacked_bytes is not None and (not isinstance(self.max_unpacked_bytes, int)
                                                    or self.max_unpacked_bytes < 1):
            raise InvalidOptionError(f"Unrecognized max_unpacked_bytes={self.max_unpacked_bytes!r}. Use a whole "
                                     f"number >= 1")
        if self.latency is not None:
            from sepconv.convert.latency_table import LatencyOptions

            if not isinstance(self.latency, LatencyOptions):
                raise InvalidOptionError(f"Unrecognized latency={self.latency!r}. Use LatencyOptions(...) from "
                                         f"sepconv.convert.latency_table, or None")
        if self.max_accuracy_drop is not None:
            from sepconv.convert.budget import BudgetOptions

            BudgetOptions(max_drop=self.max_accuracy_drop)

    def plan(self) -> dict:
        """The effective choices, with a note of which were defaults (printed by the CLI, kept in the manifest)."""
        data = self.data is not None
        fixed = any(v is not None for v in (self.separation.rank, self.separation.energy, self.separation.ranks))
        budget = self.max_accuracy_drop
        if budget is None and data and self.separate and not fixed:
            budget = DEFAULT_MAX_DROP
        epochs = self.epochs if self.epochs is not None else (DEFAULT_EPOCHS if data and self.separate else 0)
        chosen = {"max_accuracy_drop": budget, "refine": _default(self.refine, data and self.separate),
                  "recalibrate_bn": _default(self.recalibrate_bn, data and self.separate), "epochs": epochs,
                  "quantize": self.resolved_quantize()}
        defaults = [name for name, given in (("max_accuracy_drop", self.max_accuracy_drop), ("refine", self.refine),
                                             ("recalibrate_bn", self.recalibrate_bn), ("epochs", self.epochs))
                    if given is None and not (name == "max_accuracy_drop" and budget is None)]
        defaults += ["quantize"] if self.quantize == "auto" else []
        return dict(chosen, defaults=defaults)
    def resolved_quantize(self) -> str:
        if self.quantize != "auto":
            return self.quantize
        return "int8" if self.data else "dynamic"

    def describe(self) -> dict:
        described = asdict(self)
        described.pop("custom_objects")
        described["separation"] = self.separation.describe()
        described["finetune"] = {key: value for key, value in asdict(self.finetune).items()
                                  if key not in ("epochs", "checkpoint_dir", "resume")}  # the run's own fields decide
        described["plan"] = self.plan()
        return described


class HeldOut(NamedTuple):
    """The two held-out sets an artifact meets: validation (the accuracy budget's verdict; None without data) and
    test (verification and scores, never a choice); original_top1: the original model's top-1 class on each
    validation sample (what an unlabelled budget counts agreement with; None when not needed)."""

    validation: object
    test: object
    original_top1: np.ndarray | None = None


Progress = Callable[[str, str], None]


def convert_model(source, outputs, *, options: ConvertOptions | None = None, progress: Progress | None = None,
                  **kwargs) -> ConvertResult:
    """Load `source`, separate it, export every path in `outputs` (.tflite, .onnx, .keras), verify, write.

    Options are a ConvertOptions or its fields as keyword arguments; rank, energy, include and exclude may be given
    directly too (they make the SeparationOptions). `progress(stage, message)` is called as the stages go (the CLI
    prints it). Raises a SepconvError subclass on any failure, with nothing written.
    """
    if options is None:
        separation = {key: kwargs.pop(key) for key in ("rank", "energy", "include", "exclude") if key in kwargs}
        if separation:
            kwargs["separation"] = SeparationOptions(**separation)
        options = ConvertOptions(**kwargs)
    elif kwargs:
        raise InvalidOptionError(f"Pass options=ConvertOptions(...) or keyword options, not both (got {sorted(kwargs)})")
    source = Path(source)
    targets, plan = preflight(source, outputs, options)
    recovery_options = _recovery_options(options, plan, targets)
    locked = targets + ([Path(recovery_options.checkpoint_dir)] if recovery_options.epochs else [])
    with _locked(locked), _trusted(options.safe_mode), _heartbeat(progress) as say:
        _check_outputs(source, targets, options)  # again, under the lock: a run that finished meanwhile wrote them
        return _convert(source, targets, plan, options, recovery_options, say)


def preflight(source, outputs, options: ConvertOptions) -> tuple[list[Path], dict]:
    """(targets, plan): every check that needs neither TensorFlow nor the model's contents, before any work: the
    outputs, the options together, the model file's kind, the data paths. convert_model starts with it; the CLI runs it
    before it starts its worker, so that a wrong path or flag costs no TensorFlow start-up."""
    from sepconv.convert.data import check_source
    from sepconv.convert.loading import file_kind

    source = Path(source)
    targets = _check_outputs(source, outputs, options)
    plan = options.plan()
    _check_modes(targets, plan, options)
    file_kind(source)
    for data in (options.data, options.validation_data, options.test_data):
        if data:
            check_source(data)
    return targets, plan


HEARTBEAT_SECONDS = 30


@contextlib.contextmanager
def _heartbeat(progress: Progress | None, every: float = HEARTBEAT_SECONDS):
    """`progress`, plus a line from a watcher thread whenever no line came for `every` seconds: a large model's
    converter call or forward pass can run for minutes, and a silent minute looks like a hang."""
    if progress is None:
        yield lambda stage, message: None
        return
    import threading

    lock, done = threading.Lock(), threading.Event()
    last = {"stage": "start", "at": time.monotonic(), "quiet_since": time.monotonic()}

    def say(stage: str, message: str) -> None:
        with lock:
            last.update(stage=stage, at=time.monotonic(), quiet_since=time.monotonic())
        progress(stage, message)

    def watch():
        while not done.wait(min(1.0, every)):
            with lock:
                now = time.monotonic()
                if now - last["at"] < every:
                    continue
                last["at"] = now
                stage, quiet = last["stage"], now - last["quiet_since"]
            progress(stage, f"still working ({quiet:.0f} s since the last step began or ended)")

    watcher = threading.Thread(target=watch, name="sepconv-heartbeat", daemon=True)
    watcher.start()
    try:
        yield say
    finally:
        done.set()
        watcher.join()


def _convert(source: Path, targets: list[Path], plan: dict, options: ConvertOptions, recovery_options,
             say: Progress) -> ConvertResult:
    timer = _Timer()

    from sepconv.convert.loading import load

    with timer("load"):
        model = load(source, custom_objects=options.custom_objects, safe_mode=options.safe_mode,
                     max_unpacked_bytes=options.max_unpacked_bytes)
    params = model.count_params()
    say("load", f"{source} ({params:,} parameters)")
    _check_input_size(model)
    with timer("data"):
        train, calibration, validation, heldout, data_info = _data(model, options)
    say("data", data_info["description"])
    say("plan", _plan_line(plan, options))
    source_sha256 = sha256(source)

    from sepconv.convert.verification import Outputs

    report = recovery = None
    exported = model
    reference = Outputs(model, heldout.x)  # the original's outputs on the test inputs: computed once, used throughout
    warnings = []
    if options.separate:
        from sepconv.convert.recovery import recover

        with timer("separate and recover"), _disk_full_as("writing checkpoints in", recovery_options.checkpoint_dir):
            exported, report, recovery = recover(model, train, calibration, validation, heldout,
                                                 options.separation, recovery_options, source_sha256=source_sha256,
                                                 progress=say, reference=reference)
        if not report.separated:
            warnings.append(_nothing_separated(report))
            say("warning", warnings[-1])
        held = HeldOut(validation, heldout, _original_top1(model, validation, recovery))
        del model  # only its outputs on the test inputs are needed from here on (reference.values)
    else:
        held = HeldOut(validation, heldout)
    release_memory()
    try:
        calibration = calibration if calibration is None else Calibration(calibration, train.x, validation.x)
        artifacts = _export_all(exported, reference if report else None, targets, plan["quantize"], calibration,
                                held, data_info, options, source, report, recovery, timer, say)
    except SepconvError as error:
        if recovery and recovery.finetune and not isinstance(error, BudgetError):
            kept = type(error)(f"{error} (the fine-tuned weights are kept in {recovery_options.checkpoint_dir}: "
                               f"add --resume to reuse them)")
            kept.details = getattr(error, "details", None)
            raise kept from error
        raise
    from sepconv.convert.recovery import remove_checkpoints

    remove_checkpoints(recovery_options)
    return ConvertResult(source=Source(path=str(source), sha256=source_sha256, params=params),
                         quantize=plan["quantize"], quantize_reason=_quantize_reason(options, plan),
                         data=DataInfo(**{"validation_source": None, **data_info}), separation=report,
                         recovery=recovery, plan=Plan(**{**plan, "defaults": tuple(plan["defaults"])}),
                         artifacts=artifacts, seconds=timer.seconds, warnings=tuple(warnings))


def _original_top1(model, validation, recovery) -> np.ndarray | None:
    """The original's top-1 classes on the validation data, kept for the artifacts' budget check when the data has no
    labels (agreement with the original is then the metric); None when no budget will be checked."""
    if recovery is None or not recovery.budget or validation is None or validation.y is not None:
        return None
    from sepconv.convert.verification import predict_keras

    return np.argmax(predict_keras(model, validation.x)[0], axis=-1)


def _nothing_separated(report) -> str:
    reasons = "; ".join(f"{row.path}: {row.reason}" for row in report.rows) or "the model has no Conv2D layer"
    return (f"nothing was separated ({reasons}): the artifacts hold the original layers; choose layers and ranks "
            f"with --rank / --energy / --include, or pass --no-separate to say so")


def _check_input_size(model) -> None:
    """Refuse, before any array is allocated, an input no edge model has (a file can claim 100000 x 100000)."""
    for tensor in model.inputs:
        dims = tuple(tensor.shape[1:])
        if all(d is not None for d in dims) and math.prod(dims) > MAX_INPUT_ELEMENTS:
            raise UnsupportedModelError(
                f"The model's input {tensor.name!r} of shape {tuple(tensor.shape)} has {math.prod(dims):,} values "
                f"per sample, more than the {MAX_INPUT_ELEMENTS:,} convert-model feeds (data, calibration and "
                f"verification hold many samples of it); resize the model's input")


@contextlib.contextmanager
def _disk_full_as(doing: str, where):
    """An OSError (or a converter's wrapping of one) saying the device is full becomes one DiskFullError line."""
    try:
        yield
    except Exception as error:
        if isinstance(error, SepconvError) or not disk_full(error):
            raise
        raise DiskFullError(f"No space left on device while {doing} {where}: free space or choose another "
                            f"folder") from None


@contextlib.contextmanager
def _trusted(safe_mode: bool):
    """With safe_mode off (--unsafe-allow-lambda), every Keras deserialization of the run (cloning for separation
    and fine-tuning, reloading a .keras artifact) may rebuild the Lambda layers the user trusted."""
    if safe_mode:
        yield
        return
    from keras.src.saving.serialization_lib import SafeModeScope

    with SafeModeScope(safe_mode=False):
        yield


@contextlib.contextmanager
def _locked(paths: list[Path]):
    """An exclusive lock per output and per checkpoint folder for the whole run: a second run writing any of them
    fails at once instead of overwriting the first one's files. Each lock is a `.NAME.lock` file beside the path,
    held with flock and removed at the end (a killed run leaves it, unlocked: the next run takes it over)."""
    held = []
    try:
        for path in sorted({p.absolute() for p in paths}):
            if path.parent.is_dir():  # a checkpoint folder under a folder not made yet: nobody can be writing it
                held.append(_lock(path))
        yield
    finally:
        for lock, fd in reversed(held):
            lock.unlink(missing_ok=True)  # while still holding it, so that nobody takes a lock on a removed file
            os.close(fd)


def _lock(path: Path) -> tuple[Path, int]:
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusyError(f"another convert-model run is writing {path} (it holds {lock}): wait for it to "
                                  f"finish or choose another output") from None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return lock, fd
        os.close(fd)  # the run that held it removed it while we waited for it: lock the new one


def _export_all(exported, original, targets, quantize, calibration, held, data_info, options, source, report,
                recovery, timer, say) -> tuple[Artifact, ...]:
    """Stage every artifact in a temporary file, verify it, then commit them all (or none). original: Outputs of the
    model before separation on the test inputs (None without separation)."""
    from sepconv.convert.verification import Outputs

    expected = Outputs(exported, held.test.x)  # every artifact is compared with the same outputs: computed once
    staged = []
    try:
        for target in targets:
            with timer(f"export {target.name}"):
                item = _stage(exported, original, expected, target, quantize, calibration, held, data_info,
                              options, source, report, recovery, say)
                if _falls_back(item, options):
                    item = _fall_back(item, exported, original, expected, calibration, held, data_info, options,
                                      source, report, recovery, say)
                staged.append(item)
            release_memory()
        failed = [s for s in staged if not s["verification"].passed]
        if failed:
            over = any(s["verification"].budget is not None and not s["verification"].budget.held for s in failed)
            error = VerificationError("; ".join(_failure_line(s) for s in failed) + " - nothing was written; try "
                                      "another --quantize mode, more representative --data, " + (
                                          "or a larger --max-accuracy-drop" if over else "or a lower --min-agreement"))
            error.details = {"quantization": {str(s["target"]): s["quantization"].to_dict() for s in failed
                                              if s.get("quantization") is not None}}
            raise error
        if options.latency is not None and recovery is not None and recovery.budget and recovery.budget.plan.latency:
            from sepconv.convert.latency_table import record_measured

            record_measured(staged, recovery.budget.plan.latency, _latency_options(options, quantize, targets), say)
        return tuple(_commit(s) for s in staged)
    finally:
        for item in staged:
            _discard(item)


# What --quantize auto tries after a full-int8 artifact fails verification, in order, per format: int8 weights with
# float activations, then (TFLite) float16 weights; every artifact is verified as usual.
AUTO_FALLBACKS = {"tflite": ("dynamic", "float16"), "onnx": ("dynamic",)}


def _falls_back(item: dict, options: ConvertOptions) -> bool:
    """--quantize auto chose int8 (data given) and the int8 artifact failed verification."""
    return options.quantize == "auto" and item["quantize"] == "int8" and not item["verification"].passed


def _fall_back(item: dict, *stage_args) -> dict:
    """Replace a failed int8 artifact of --quantize auto by the first AUTO_FALLBACKS mode that verifies, said aloud
    and recorded in the manifest; an explicit --quantize int8 fails instead. Returns the last one tried."""
    exported, original, expected, calibration, held, data_info, options, source, report, recovery, say = stage_args
    reasons = []
    for mode in AUTO_FALLBACKS[item["format"]]:
        _discard(item)
        reasons.append(f"{item['quantize']}: " + "; ".join(item["verification"].failures()))
        say("export", f"{item['target']}: {item['quantize']} failed verification ({reasons[-1]}); --quantize auto "
                      f"tries {mode} instead (pass --quantize int8 to insist on int8)")
        item = _stage(exported, original, expected, item["target"], mode, calibration, held, data_info, options,
                      source, report, recovery, say, fallback={"from": "int8", "reason": " | ".join(reasons)})
        if item["verification"].passed:
            break
    return item


def _default(value, default: bool) -> bool:
    return default if value is None else bool(value)


def _recovery_options(options: ConvertOptions, plan: dict, targets: list[Path]):
    from sepconv.convert.budget import BudgetOptions
    from sepconv.convert.recovery import RecoveryOptions

    budget = plan["max_accuracy_drop"]
    folder = options.checkpoint_dir or str(targets[0].with_name(targets[0].name + CHECKPOINTS_SUFFIX))
    return RecoveryOptions(refine=plan["refine"], recalibrate_bn=plan["recalibrate_bn"], epochs=plan["epochs"],
                           finetune=options.finetune,
                           budget=None if budget is None else BudgetOptions(max_drop=budget, refine=plan["refine"]),
                           checkpoint_dir=folder, resume=options.resume,
                           latency=_latency_options(options, plan["quantize"], targets))


def _latency_options(options: ConvertOptions, quantize: str, targets: list[Path]):
    """options.latency with the export options of the first .tflite / .onnx output (what its table must time)."""
    if options.latency is None:
        return None
    from sepconv.convert.latency_table import for_export

    return for_export(options.latency, [FORMATS[t.suffix.lower()] for t in targets], quantize,
                      io_type=options.io_type, per_channel=options.per_channel, opset=options.opset,
                      layout=options.layout, allow_flex=options.allow_flex)


def _quantize_reason(options: ConvertOptions, plan: dict) -> str:
    if options.quantize != "auto":
        return f"quantize={plan['quantize']}"
    return f"quantize=auto -> {plan['quantize']} ({'data given' if options.data else 'no data given'})"


def _plan_line(plan: dict, options: ConvertOptions) -> str:
    """One line: what will happen, which choices were defaults, and the hint when there is no data."""
    if not options.separate:
        steps = ["no separation"]
    elif plan["max_accuracy_drop"] is not None:
        steps = [f"rank per layer for --max-accuracy-drop {plan['max_accuracy_drop']}"]
        if options.latency is not None:
            steps[0] += (f" and latency measured on {options.latency.where or 'this machine'}"
                         + (f" (target {options.latency.target.describe()})" if options.latency.target.given else ""))
    else:
        steps = [f"separation {_policy_text(options.separation)}"]
    steps += ["refine" if plan["refine"] else "no refine",
              "BatchNorm recalibration" if plan["recalibrate_bn"] else "no BatchNorm recalibration",
              f"fine-tune up to {plan['epochs']} epochs" if plan["epochs"] else "no fine-tuning",
              f"quantize {plan['quantize']}"]
    line = ", ".join(steps)
    if plan["defaults"]:
        line += f" (defaults {'with' if options.data else 'without'} --data: {', '.join(plan['defaults'])})"
    if not options.data and options.separate:
        conservative = options.separation.rank is None and options.separation.energy is None
        line += ("; hint: " + ("without data this conservative separation is checked only by its outputs' similarity "
                               "on synthetic inputs - " if conservative
                               else "") + "pass --data (your images) to choose the rank for an accuracy budget, "
                 "fine-tune and quantize to int8, where the real savings are")
    return line


def _policy_text(separation: SeparationOptions) -> str:
    policy = separation.policy
    return f"K={policy.rank}" if policy.rank is not None else f"energy={policy.energy}"


def _check_outputs(source: Path, outputs, options: ConvertOptions) -> list[Path]:
    """Every output problem at once, before any work: extension, duplicate, existing file, folder."""
    if isinstance(outputs, (str, os.PathLike)):
        outputs = [outputs]
    targets = [Path(o) for o in outputs]
    if not targets:
        raise OutputPathError("No output given; name at least one .tflite, .onnx or .keras file")
    problems = []
    seen = set()
    for target in targets:
        if target.suffix.lower() not in FORMATS:
            problems.append(f"{target}: unknown extension {target.suffix!r}, use one of {sorted(FORMATS)}")
        elif target.resolve() in seen:
            problems.append(f"{target}: named twice")
        elif source.exists() and target.exists() and target.resolve() == source.resolve():
            problems.append(f"{target}: is the input model; choose another output name")
        elif target.is_dir():
            problems.append(f"{target}: is a directory")
        elif target.exists() and not options.overwrite:
            problems.append(f"{target}: exists; pass --overwrite (overwrite=True) to replace it")
        elif not target.parent.resolve().is_dir():
            problems.append(f"{target}: folder {target.parent} does not exist; create it first")
        elif not _writable(target.parent):
            problems.append(f"{target}: folder {target.parent} is not writable")
        seen.add(target.resolve())
    if problems:
        raise OutputPathError("; ".join(problems))
    return targets


def _writable(folder: Path) -> bool:
    """Try it: os.access says yes to root even on a read-only file system."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _check_modes(targets: list[Path], plan: dict, options: ConvertOptions) -> None:
    quantize = plan["quantize"]
    # (wanted, flag, what it does, whether it works on separated layers only)
    needs_data = [(plan["refine"], "--refine", "refits separated layers on calibration images", True),
                  (plan["recalibrate_bn"], "--recalibrate-bn", "re-estimates BatchNorm statistics on calibration "
                                                               "images", True),
                  (plan["epochs"], "--epochs", "fine-tunes on your images", True),
                  (plan["max_accuracy_drop"] is not None, "--max-accuracy-drop", "measures accuracy on validation "
                                                                                 "images", True),
                  (options.test_data, "--test-data", "scores a model trained or calibrated on --data", False),
                  (options.validation_data, "--validation-data", "chooses what is done with --data", False)]
    for wanted, flag, what, separated_only in needs_data:
        if wanted and not options.data:
            raise InvalidOptionError(f"{flag} {what}; pass --data (an .npz or a folder of images)")
        if wanted and not options.separate and separated_only:
            raise InvalidOptionError(f"{flag} works on separated layers; it cannot be combined with --no-separate")
    ignored = [flag for flag, value in (("--rank", options.separation.rank), ("--energy", options.separation.energy),
                                        ("--include", options.separation.include),
                                        ("--exclude", options.separation.exclude)) if value]
    if ignored and not options.separate:
        raise InvalidOptionError(f"{' / '.join(ignored)} choose what to separate; they cannot be combined with "
                                 f"--no-separate (drop one or the other)")
    if options.max_accuracy_drop is not None and any(
            v is not None for v in (options.separation.rank, options.separation.energy, options.separation.ranks)):
        raise InvalidOptionError("--max-accuracy-drop chooses the rank of each layer; drop --rank / --energy, or "
                                 "drop --max-accuracy-drop to use them")
    if options.latency is not None and (plan["max_accuracy_drop"] is None or not options.separate):
        raise InvalidOptionError("--target-latency / --target-speedup / --latency-on choose each layer's K with the "
                                 "accuracy budget; pass --data (and --max-accuracy-drop, not --rank / --energy / "
                                 "--no-separate)")
    if options.resume and not plan["epochs"]:
        raise InvalidOptionError("--resume continues an interrupted fine-tuning; it needs --epochs >= 1 and --data")
    if quantize in NEEDS_DATA and not options.data:
        raise InvalidOptionError(f"--quantize {quantize} calibrates activations on representative data; pass --data "
                                 f"(an .npz or a folder of images) or use --quantize dynamic")
    for target in targets:
        fmt = FORMATS[target.suffix.lower()]
        if fmt == "onnx":
            if quantize not in ONNX_MODES:
                raise InvalidOptionError(f"--quantize {quantize} is not available for ONNX ({target}); supported "
                                         f"modes are: {list(ONNX_MODES)}")
            OnnxOptions(quantize=quantize, opset=options.opset, layout=options.layout,
                        per_channel=options.per_channel)
        elif fmt == "tflite":
            TFLiteOptions(quantize=quantize, io_type=options.io_type, per_channel=options.per_channel,
                          allow_flex=options.allow_flex)


def _data(model, options: ConvertOptions):
    """(train, calibration inputs, validation, test, description) for the run; without data: (None, None, None,
    synthetic test inputs, description). The three roles never share a sample (module recovery.py says who uses what).
    """
    from sepconv.convert.data import Dataset, resolve_scale

    if len(model.inputs) != 1:
        raise UnsupportedModelError(f"convert-model handles single-input models; this one has {len(model.inputs)} "
                                    f"inputs: use export_tflite / export_onnx from the Python API")
    data_options, scale_note = resolve_scale(model, options.data_options)
    preprocessing = {"scale": data_options.scale, "mean": data_options.mean, "std": data_options.std,
                     "reason": scale_note}
    if options.data:
        data = _labelled_data(options.data, model, data_options)
        if options.test_data:
            rest, test = data, _labelled_data(options.test_data, model, data_options)
        else:
            rest, test = split(data, heldout=options.heldout_fraction)
        if options.validation_data:
            train = rest.take(np.random.default_rng(1).permutation(len(rest)))  # all of it, shuffled
            validation = _labelled_data(options.validation_data, model, data_options)
        else:
            train, validation = split(rest, heldout=options.validation_fraction, seed=1)
        calibration = train.take(np.arange(min(options.calibration_samples, len(train))))
        labels = "labelled" if data.y is not None else "unlabelled"
        held = f"{len(test)} from {test.source}" if options.test_data else f"{len(test)} held out"
        info = {"source": data.source, "test_source": test.source if options.test_data else None,
                "validation_source": validation.source if options.validation_data else None,
                "samples": len(data), "labelled": data.y is not None, "scale": data_options.scale,
                "preprocessing": preprocessing,
                "train_samples": len(train), "calibration_samples": len(calibration),
                "validation_samples": len(validation), "heldout_samples": len(test),
                "heldout_labelled": test.y is not None,
                "description": f"{len(data)} {labels} samples from {data.source} ({scale_note}): {len(train)} to train "
                               f"on (a random {len(calibration)} of them also calibrate), {len(validation)} to "
                               f"validate (every choice), {held} to test (scoring and verification only)"}
        return train, calibration.x, validation, test, info
    shape = tuple(model.inputs[0].shape)
    if any(d is None for d in shape[1:]):
        raise UnsupportedModelError(f"The model's input {shape} has a free size besides the batch; pass --data so "
                                    f"that sepconv knows what to feed it")
    x = np.random.default_rng(0).random((SYNTHETIC_SAMPLES, *shape[1:]), dtype=np.float32)
    info = {"source": None, "test_source": None, "samples": SYNTHETIC_SAMPLES, "labelled": False, "scale": None,
            "preprocessing": preprocessing,
            "train_samples": 0, "calibration_samples": 0, "validation_samples": 0,
            "heldout_samples": SYNTHETIC_SAMPLES, "heldout_labelled": False,
            "description": f"no --data: verifying on {SYNTHETIC_SAMPLES} synthetic uniform [0, 1) inputs, judged by "
                           f"output similarity (pass --data for accuracy and a top-1 agreement check)"}
    return None, None, None, Dataset(x, None, "synthetic uniform [0, 1) inputs"), info


def _labelled_data(source, model, data_options):
    """A data set read for `model`, its labels checked against the model's classes, and usable for a run."""
    from sepconv.convert.data import check_usable

    data = load_data(source, model.input_shape, data_options)
    check_labels(data, int(model.outputs[0].shape[-1]))
    check_usable(data, MIN_SAMPLES)
    return data


def _stage(model, original, expected, target: Path, quantize: str, calibration, held, data_info,
           options: ConvertOptions, source: Path, report, recovery, say, fallback: dict | None = None) -> dict:
    """Export to a temporary file beside `target`, verify it, write its manifest to another temporary file.
    original / expected: Outputs of the original / of `model` on the test inputs.
    fallback: why this mode replaces the one --quantize auto chose first (kept in the manifest)."""
    fmt = FORMATS[target.suffix.lower()]
    mode = "none" if fmt == "keras" else quantize
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".partial{target.suffix}", dir=target.parent)
    os.close(fd)
    item = {"target": target, "tmp": tmp, "tmp_manifest": None, "format": fmt, "quantize": mode, "fallback": fallback}
    try:
        with _disk_full_as("writing", target):
            return _export_and_verify(item, model, original, expected, calibration, held, data_info, options,
                                      source, report, recovery, say)
    except BaseException:
        _discard(item)
        raise


def _discard(item: dict) -> None:
    """Remove a staged artifact's temporary files (nothing after _commit has renamed them)."""
    for path in (item["tmp"], item["tmp_manifest"]):
        if path is not None:
            Path(path).unlink(missing_ok=True)


def _export_and_verify(item: dict, model, original, expected, calibration, held, data_info,
                       options: ConvertOptions, source: Path, report, recovery, say) -> dict:
    from sepconv.convert.manifest import build_manifest, manifest_json
    from sepconv.convert.verification import verify, verify_keras

    target, tmp, fmt, mode = item["target"], item["tmp"], item["format"], item["quantize"]
    heldout = held.test
    started = time.perf_counter()
    inputs = "held-out samples" if data_info["source"] else "synthetic inputs"
    runtime = None
    calibrated = f", calibrated on {len(calibration.samples)} samples" if mode in NEEDS_DATA else ""
    say("export", f"{target}: converting ({fmt}, {mode}{calibrated})")
    if fmt == "keras":
        with _own_temporary_folder():
            model.save(tmp)
        verification = verify_keras(model, tmp, heldout.x, heldout.y, tolerance=options.tolerance, inputs=inputs,
                                    original=original, safe_mode=options.safe_mode, expected=expected.values)
    else:
        from sepconv.deploy.runtime import open_runtime

        if mode == "int8":
            from sepconv.convert.quantization import quantize_verified

            data, item["quantization"] = quantize_verified(
                model, fmt, calibration, tolerance=options.tolerance, io_type=options.io_type,
                per_channel=options.per_channel, opset=options.opset, layout=options.layout,
                options=options.quantization)
            Path(tmp).write_bytes(data)
            say("quantize", f"{target}: {item['quantization'].line()}")
        elif fmt == "tflite":
            from sepconv.convert.tflite_export import export_tflite

            Path(tmp).write_bytes(export_tflite(model, representative_data=_samples(calibration), options=TFLiteOptions(
                quantize=mode, io_type=options.io_type if mode in NEEDS_DATA else "float32",
                per_channel=options.per_channel, allow_flex=options.allow_flex)))
        else:
            from sepconv.convert.onnx_export import export_onnx

            Path(tmp).write_bytes(export_onnx(model, representative_data=_samples(calibration),
                                              options=OnnxOptions(
                quantize=mode, opset=options.opset, layout=options.layout, per_channel=options.per_channel)))
        say("verify", f"{target}: {Path(tmp).stat().st_size:,} bytes in {time.perf_counter() - started:.1f} s; "
                      f"verifying on {len(heldout.x)} {inputs}")
        runtime = open_runtime(tmp)
        verification = verify(model, runtime, heldout.x, heldout.y, quantized=mode != "none", quantize=mode,
                              tolerance=options.tolerance, layout=options.layout if fmt == "onnx" else "nhwc",
                              inputs=inputs, original=original, synthetic=not data_info["source"],
                              expected=expected.values)
        verification = within_budget(verification, runtime, held, recovery,
                                     layout=options.layout if fmt == "onnx" else "nhwc")
    verification = _named(verification, target)
    manifest = build_manifest(Path(tmp), final_path=target, fmt=fmt, quantize=mode, runtime=runtime,
                              layout=options.layout if fmt == "onnx" else "nhwc",
                              source={"path": str(source), "sha256": sha256(source)},
                              separation=report.to_dict() if report else None,
                              recovery=recovery.to_dict() if recovery else None, verification=verification,
                              options=options.describe(), preprocessing=data_info["preprocessing"],
                              quantize_fallback=item["fallback"], quantization=item.get("quantization"))
    fd, item["tmp_manifest"] = tempfile.mkstemp(prefix=f".{target.name}.json.", suffix=".partial", dir=target.parent)
    with _disk_full_as("writing the manifest of", target), os.fdopen(fd, "w") as file:
        file.write(manifest_json(manifest))
    item.update(verification=verification, manifest=manifest)
    status = "passed" if verification.passed else "FAILED"
    say("export", f"{target} ({fmt}, {mode}): {manifest['bytes']:,} bytes, verification {status}: "
                  f"{'; '.join(_criteria(verification))} ({time.perf_counter() - started:.1f} s)")
    return item


@contextlib.contextmanager
def _own_temporary_folder():
    """Keras' .keras save works in tempfile.mkdtemp() folders that a failed write (a full disk) leaves behind; give
    it a folder of ours for the duration and remove it whatever happens."""
    folder = tempfile.mkdtemp(prefix="sepconv-save-")
    previous, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


def _samples(calibration):
    return None if calibration is None else calibration.samples


def _criteria(verification) -> list[str]:
    budget = [verification.budget.criterion()] if verification.budget is not None else []
    return [c.criterion for c in verification.outputs] + budget


def _named(verification, target: Path):
    from dataclasses import replace

    return replace(verification, artifact=str(target))


def _failure_line(item: dict) -> str:
    line = f"{item['target']} ({item['quantize']}) failed verification: {'; '.join(item['verification'].failures())}"
    quantization = item.get("quantization")
    if quantization is not None and quantization.diagnosis is not None:
        line += f" after {quantization.line()}; {quantization.diagnosis.summary()} (full table: --json)"
    return line


def _commit(item: dict) -> Artifact:
    from sepconv.convert.manifest import manifest_path

    target = item["target"]
    os.chmod(item["tmp"], 0o644)
    os.chmod(item["tmp_manifest"], 0o644)
    os.replace(item["tmp"], target)
    os.replace(item["tmp_manifest"], manifest_path(target))
    item["tmp"] = item["tmp_manifest"] = None
    manifest = item["manifest"]
    return Artifact(path=str(target), format=item["format"], quantize=item["quantize"], bytes=manifest["bytes"],
                    sha256=manifest["sha256"], manifest=str(manifest_path(target)),
                    verification=item["verification"], quantize_fallback=item["fallback"],
                    quantization=item.get("quantization"), latency=manifest.get("latency"))


class _Timer:
    def __init__(self):
        self.seconds = {}

    def __call__(self, stage: str):
        import contextlib

        @contextlib.contextmanager
        def timing():
            started = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[stage] = round(time.perf_counter() - started, 2)

        return timing()
