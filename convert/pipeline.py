"""`convert_model`: the whole job behind `convert-model in.h5 out.tflite [out.onnx ...]`.

load -> separate and recover (budget, refine, BatchNorm, fine-tune: recovery.py) -> export each output -> verify
each artifact against the Keras model -> time it against the original converted the same way (the original ships
instead of a slower one) -> write artifacts and manifests. All outputs of a run share one loaded model,
one separation and one data split. Nothing is written unless every artifact passes verification: artifacts go to
temporary files beside their targets and are renamed only at the end, so a failure leaves no partial file; the input
is only read.

Defaults follow the data: with `data`, each layer's K (or keeping it) is chosen for an accuracy budget (1 point) and
for latency measured on this machine (the fastest plan within the budget: recovery/latency_choice.py), the separated
model is refined, its BatchNorm statistics re-estimated and fine-tuned for up to 10 epochs, and quantized to int8;
without data, a conservative separation (energy 0.9) that keeps accuracy without training, dynamic-range
quantization, and a hint that data unlocks the real savings. Either way the artifacts are timed against the original
unless measure_latency=False (--no-latency). `ConvertOptions.plan()` says which choices were defaults and why.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from sepconv.convert.data import check_source, datasets, sample_pool
from sepconv.convert.errors import BudgetError, InvalidOptionError, SepconvError, UnsupportedModelError
from sepconv.convert.export.quantization import Calibration
from sepconv.convert.export.speed import SLOWER
from sepconv.convert.export.targets import target_for
from sepconv.convert.export.verification import Outputs
from sepconv.convert.files import sha256
from sepconv.convert.keras_compat import producer_name, unsafe_deserialization
from sepconv.convert.loading import file_kind, load
from sepconv.convert.memory import release_memory
from sepconv.convert.options import (
    ConvertOptions,
    Plan,
    check_modes,
    latency_options,
    plan_line,
    quantize_reason,
    recovery_options,
)
from sepconv.convert.outputs import check_outputs, disk_full_as, locked
from sepconv.convert.recovery.steps import recover, remove_checkpoints
from sepconv.convert.recovery.finetuning import MULTI_WORKER, multi_worker_strategy, worker_role
from sepconv.convert.results import ConvertResult, Source
from sepconv.convert.separation.policy import SeparationOptions
from sepconv.convert.staging import ExportJob, export_all
from sepconv.deploy import logs
from sepconv.deploy.scores import top1
from sepconv.deploy.ssh import parse_target
from sepconv.deploy.timing import identify

MAX_INPUT_ELEMENTS = 1 << 25  # values per input sample (e.g. 3344 x 3344 x 3): 128 MiB of float32 each


class HeldOut(NamedTuple):
    """The two held-out sets an artifact meets: validation (the accuracy budget's verdict; None without data) and
    test (verification and scores, never a choice); original_top1: the original model's top-1 class on each
    validation sample (the budget check's reference; None when not needed)."""

    validation: object
    test: object
    original_top1: np.ndarray | None = None
    original_outputs: list | None = None  # every output of the original on the validation samples, for a budget on a
    # model with several outputs (each output after the first is compared with it); None otherwise


Progress = Callable[[str, str], None]


def convert_model(source, outputs, *, options: ConvertOptions | None = None, progress: Progress | None = None,
                  **kwargs) -> ConvertResult:
    """Load `source`, separate it, export every path in `outputs` (.tflite, .onnx, .keras), verify, write.

    Options are a ConvertOptions or its fields as keyword arguments; rank, energy, include and exclude may be given
    directly too (they make the SeparationOptions). `progress(stage, message)` is called as the stages go; without
    it the lines go to the `sepconv.convert` logger (sepconv.deploy.logs: INFO, warnings at WARNING, per-item lines
    at DEBUG). Raises a SepconvError subclass on any failure, with nothing written.
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
    recovery = recovery_options(options, plan, targets)
    written = targets + ([Path(recovery.checkpoint_dir)] if recovery.epochs else [])
    progress = progress or logs.to_log("convert")
    with locked(written), _trusted(options.safe_mode), _heartbeat(progress) as say:
        check_outputs(source, targets, options)  # again, under the lock: a run that finished meanwhile wrote them
        return _convert(source, targets, plan, options, recovery, say)


def preflight(source, outputs, options: ConvertOptions) -> tuple[list[Path], Plan]:
    """(targets, plan): every check that needs neither TensorFlow nor the model's contents, before any work: the
    outputs, the options together, the model file's kind, the data paths. convert_model starts with it; the CLI runs it
    before it starts its worker, so that a wrong path or flag costs no TensorFlow start-up."""
    source = Path(source)
    targets = check_outputs(source, outputs, options)
    plan = options.plan(timed=any(target_for(target).runtime for target in targets))
    check_modes(targets, plan, options)
    if options.latency is not None and options.latency.where:
        parse_target(options.latency.where)  # its syntax (an option-like "-oProxyCommand=..." is refused here)
    file_kind(source)
    if options.epochs != 0 and options.finetune.strategy == MULTI_WORKER:
        worker_role()  # TF_CONFIG, before any work
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


def _convert(source: Path, targets: list[Path], plan: Plan, options: ConvertOptions, recovery_options,
             say: Progress) -> ConvertResult:
    timer = _Timer()
    worker = _multi_worker(recovery_options, say)
    latency = recovery_options.latency
    if latency is not None and latency.where:  # an unreachable device is said now, not after the sensitivity
        with timer("reach the device"):
            say("latency", f"reaching {latency.where}")
            identify(latency.where, latency.suffix, latency.timing)


    with timer("load"):
        model = load(source, custom_objects=options.custom_objects, safe_mode=options.safe_mode,
                     max_unpacked_bytes=options.max_unpacked_bytes)
    params = model.count_params()
    say("load", f"{source} ({params:,} parameters)")
    if options.budget_output is not None:
        recovery_options = _budget_on_output(model, options.budget_output, recovery_options)
    _check_input_size(model)
    with timer("data"):
        data = datasets(model, options)
    train, calibration, validation, heldout = data.train, data.calibration, data.validation, data.test
    say("data", data.info.description)
    say("plan", plan_line(plan, options))
    warnings = [] if validation is None else _unresolved(
        len(validation.x), plan.max_accuracy_drop if options.separate else None,
        options.tolerance.min_agreement if plan.quantize != "none" else None)
    for warning in warnings:
        say("warning", warning)
    source_record = Source(path=str(source), sha256=sha256(source), params=params, bytes=source.stat().st_size)


    report = recovery = None
    exported = model
    reference = Outputs(model, heldout.x)  # the original's outputs on the test inputs: computed once, used throughout
    validation_reference = Outputs(model, validation.x) if validation is not None else None  # the same, validation
    if options.separate:
        with timer("separate and recover"), disk_full_as("writing checkpoints in", recovery_options.checkpoint_dir):
            exported, report, recovery = recover(model, train, calibration, validation, heldout, recovery_options,
                                                 source_sha256=source_record.sha256, progress=say,
                                                 reference=reference, validation_reference=validation_reference)
        if not report.separated:
            warnings.append(_nothing_separated(report))
            say("warning", warnings[-1])
        if worker is not None and not worker.chief:  # the chief writes: this worker's part is done
            remove_checkpoints(recovery_options)
            written_by = (f"worker {worker.index} of {worker.workers}: fine-tuning done; the chief (worker 0) exports, "
                          f"verifies and writes the artifacts")
            say("write", written_by)
            return ConvertResult(source=source_record, quantize=plan.quantize,
                                 quantize_reason=quantize_reason(options, plan), data=data.info, separation=report,
                                 recovery=recovery, plan=plan, artifacts=(), seconds=timer.seconds,
                                 warnings=tuple(warnings), written_by=written_by)
        several = recovery is not None and recovery.budget is not None and len(validation_reference.values) > 1
        held = HeldOut(validation, heldout, _original_top1(validation_reference, validation, recovery),
                       list(validation_reference.values) if several else None)
    else:
        held = HeldOut(validation, heldout)
    timing = latency_options(options, plan, targets)  # None when the plan times nothing
    speed = timing if report and report.separated else None
    mode_speed = timing if options.quantize == "auto" else None  # a quantized artifact against float32 (staging.py)
    # timed against each artifact (export/speed.py), in float32 too with --quantize auto
    source_model = model if speed is not None or mode_speed is not None else None
    del model  # else only its outputs on the test inputs are needed from here on (reference.values)
    release_memory()
    try:
        if calibration is not None:
            calibration = Calibration(calibration, sample_pool(train, len(calibration)), validation.x)
        expected = Outputs(exported, heldout.x)  # every artifact is compared with the same outputs: computed once
        job = ExportJob(model=exported, original=reference if report else None, expected=expected,
                        calibration=calibration, held=held, data_info=data.info, options=options,
                        source=source_record, report=report, recovery=recovery, say=say, speed=speed,
                        source_model=source_model,
                        validation_expected=Outputs(exported, validation.x) if validation is not None else None,
                        validation_original=validation_reference if source_model is not None else None,
                        mode_speed=mode_speed)
        artifacts = export_all(job, targets, plan.quantize, timer)
    except SepconvError as error:
        if recovery and recovery.finetune and not isinstance(error, BudgetError):
            kept = type(error)(f"{error} (the fine-tuned weights are kept in {recovery_options.checkpoint_dir}: "
                               f"add --resume to reuse them)")
            kept.details = getattr(error, "details", None)
            raise kept from error
        raise

    remove_checkpoints(recovery_options)
    warnings += [_speed_warning(artifact) for artifact in artifacts
                 if artifact.speed is not None and artifact.speed.verdict == SLOWER]
    warnings += [_mode_warning(artifact) for artifact in artifacts
                 if artifact.quantize_fallback and artifact.quantize_fallback.get("slower")]
    for artifact in artifacts:
        if artifact.speed is not None and artifact.speed.missed_target:
            warnings.append(_target_warning(artifact))
            say("warning", warnings[-1])
    return ConvertResult(source=source_record, quantize=plan.quantize, quantize_reason=quantize_reason(options, plan),
                         data=data.info, separation=report, recovery=recovery, plan=plan, artifacts=artifacts,
                         seconds=timer.seconds, warnings=tuple(warnings))


def _multi_worker(recovery_options, say: Progress):
    """With --strategy multi-worker and fine-tuning: tf.distribute's MultiWorkerMirroredStrategy made before any
    TensorFlow work (it must be) and this process's WorkerRole; else None."""
    if not recovery_options.epochs or recovery_options.finetune.strategy != MULTI_WORKER:
        return None
    role = worker_role()
    say("plan", f"multi-worker fine-tuning: worker {role.index} of {role.workers}"
                f"{' (chief: writes the artifacts)' if role.chief else ''}; waiting for every worker of TF_CONFIG")
    multi_worker_strategy()
    return role


def _unresolved(images: int, max_drop: float | None, min_agreement: float | None) -> list[str]:
    """A line for each decision the validation images are too few to make: one image is more than half the accuracy
    budget (its decisions move in whole images), or more than half the top-1 agreement a quantized artifact may lose
    (None: no budget, no quantized artifact)."""
    lines = []
    if max_drop is not None and max_drop > 0 and 100.0 / images > max_drop / 2:
        lines.append(f"the validation data has {images} images: one image is {100.0 / images:.2f} points of the "
                     f"{max_drop:g}-point --max-accuracy-drop budget, which its choices cannot resolve; give at least "
                     f"{math.ceil(200.0 / max_drop)} (--validation-data, or more --data / a larger --max-samples)")
    margin = None if min_agreement is None else 1.0 - min_agreement
    if margin is not None and margin > 0 and 1.0 / images > margin / 2:
        lines.append(f"the validation data has {images} images: one image is {100.0 / images:.2f}% of top-1 "
                     f"agreement, against the {margin:.0%} that int8 may lose (--min-agreement {min_agreement:g}); "
                     f"give at least {math.ceil(2.0 / margin)}")
    return lines


def _budget_on_output(model, name: str, recovery):
    """`recovery` with its budget on the model output `name` (the name of the layer that computes it, or its index);
    InvalidOptionError naming the outputs there are."""
    names = [producer_name(tensor) for tensor in model.outputs]
    index = names.index(name) if name in names else int(name) if name.isdigit() and int(name) < len(names) else None
    if index is None:
        raise InvalidOptionError(f"--budget-output {name!r}: the model has no such output; its outputs are "
                                 f"{', '.join(f'{i}: {n}' for i, n in enumerate(names))} (name one, or give its index)")
    return replace(recovery, budget=replace(recovery.budget, output=index))


def _original_top1(validation_reference, validation, recovery) -> np.ndarray | None:
    """The original's top-1 classes on the validation data (from the outputs recovery scored with), kept for the
    artifacts' budget check: without labels agreement with them is the metric, with labels the images where the
    original and the artifact differ bound the drop (verification.drop_bound); None when no budget will be checked."""
    if recovery is None or not recovery.budget or validation is None:
        return None
    return top1(validation_reference.values[0])


def _speed_warning(artifact) -> str:
    speed = artifact.speed
    if speed.shipped == "original":
        return (f"{artifact.path}: the separated model was slower than the original ({speed.interval()} on "
                f"{speed.where}): the original, converted the same way, was shipped; try a larger "
                f"--max-accuracy-drop, or --latency-on the device it will run on")
    return (f"{artifact.path}: slower than the original ({speed.interval()} on {speed.where}), shipped as --rank / "
            f"--energy asked; drop them to let the accuracy budget and the latency table choose")


def _mode_warning(artifact) -> str:
    fallback = artifact.quantize_fallback
    return (f"{artifact.path}: {fallback['reasons'][-1]}: --quantize auto shipped "
            f"{artifact.quantize} instead; pass --quantize {fallback['slower']} to insist")


def _target_warning(artifact) -> str:
    speed = artifact.speed
    return (f"{artifact.path}: measured {speed.interval()} against the original on {speed.where}, short of the "
            f"{speed.target_speedup:.2f}x that --target-latency / --target-speedup asked (the latency table "
            f"predicted {speed.original_ms / speed.predicted_ms:.2f}x); a larger --max-accuracy-drop allows faster "
            f"plans")


def _nothing_separated(report) -> str:
    reasons = (report.why_not_separated() + ("; each in the manifest's separation.layers" if len(report.rows) > 3
                                              else "")) if report.rows else "the model has no Conv2D layer"
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
def _trusted(safe_mode: bool):
    """With safe_mode off (--unsafe-allow-lambda), every Keras deserialization of the run (cloning for separation
    and fine-tuning, reloading a .keras artifact) may rebuild the Lambda layers the user trusted."""
    if safe_mode:
        yield
        return
    with unsafe_deserialization():
        yield


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
