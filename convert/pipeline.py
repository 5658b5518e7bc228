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
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from sepconv.convert.errors import (BudgetError, DiskFullError, InvalidOptionError, SepconvError,
                                    UnsupportedModelError, VerificationError)
from sepconv.convert.files import disk_full, sha256
from sepconv.convert.keras_compat import unsafe_deserialization
from sepconv.convert.memory import release_memory
from sepconv.convert.options import (ConvertOptions, check_modes, latency_options, plan_line, quantize_reason,
                                     recovery_options)
from sepconv.convert.outputs import check_outputs, locked
from sepconv.convert.policy import SeparationOptions
from sepconv.convert.quantization import Calibration
from sepconv.convert.results import Artifact, ConvertResult, DataInfo, Plan, Source
from sepconv.convert.run_data import datasets
from sepconv.convert.targets import target_for
from sepconv.convert.tflite_export import NEEDS_DATA
from sepconv.convert.verification import within_budget
from sepconv.deploy.scores import top1

MAX_INPUT_ELEMENTS = 1 << 25  # values per input sample (e.g. 3344 x 3344 x 3): 128 MiB of float32 each


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
    recovery = recovery_options(options, plan, targets)
    written = targets + ([Path(recovery.checkpoint_dir)] if recovery.epochs else [])
    with locked(written), _trusted(options.safe_mode), _heartbeat(progress) as say:
        check_outputs(source, targets, options)  # again, under the lock: a run that finished meanwhile wrote them
        return _convert(source, targets, plan, options, recovery, say)


def preflight(source, outputs, options: ConvertOptions) -> tuple[list[Path], dict]:
    """(targets, plan): every check that needs neither TensorFlow nor the model's contents, before any work: the
    outputs, the options together, the model file's kind, the data paths. convert_model starts with it; the CLI runs it
    before it starts its worker, so that a wrong path or flag costs no TensorFlow start-up."""
    from sepconv.convert.data import check_source
    from sepconv.convert.loading import file_kind

    source = Path(source)
    targets = check_outputs(source, outputs, options)
    plan = options.plan()
    check_modes(targets, plan, options)
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
        train, calibration, validation, heldout, data_info = datasets(model, options)
    say("data", data_info["description"])
    say("plan", plan_line(plan, options))
    source_sha256 = sha256(source)

    from sepconv.convert.verification import Outputs

    report = recovery = None
    exported = model
    reference = Outputs(model, heldout.x)  # the original's outputs on the test inputs: computed once, used throughout
    validation_reference = Outputs(model, validation.x) if validation is not None else None  # the same, validation
    warnings = []
    if options.separate:
        from sepconv.convert.recovery import recover

        with timer("separate and recover"), _disk_full_as("writing checkpoints in", recovery_options.checkpoint_dir):
            exported, report, recovery = recover(model, train, calibration, validation, heldout,
                                                 options.separation, recovery_options, source_sha256=source_sha256,
                                                 progress=say, reference=reference,
                                                 validation_reference=validation_reference)
        if not report.separated:
            warnings.append(_nothing_separated(report))
            say("warning", warnings[-1])
        held = HeldOut(validation, heldout, _original_top1(validation_reference, validation, recovery))
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
                         quantize=plan["quantize"], quantize_reason=quantize_reason(options, plan),
                         data=DataInfo(**{"validation_source": None, **data_info}), separation=report,
                         recovery=recovery, plan=Plan(**{**plan, "defaults": tuple(plan["defaults"])}),
                         artifacts=artifacts, seconds=timer.seconds, warnings=tuple(warnings))


def _original_top1(validation_reference, validation, recovery) -> np.ndarray | None:
    """The original's top-1 classes on the validation data (from the outputs recovery scored with), kept for the
    artifacts' budget check when the data has no labels (agreement with the original is then the metric); None when
    no budget will be checked."""
    if recovery is None or not recovery.budget or validation is None or validation.y is not None:
        return None
    return top1(validation_reference.values[0])


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
    with unsafe_deserialization():
        yield


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

            record_measured(staged, recovery.budget.plan.latency, latency_options(options, quantize, targets), say)
        return tuple(_commit(s) for s in staged)
    finally:
        for item in staged:
            _discard(item)


def _falls_back(item: dict, options: ConvertOptions) -> bool:
    """--quantize auto chose int8 (data given) and the int8 artifact failed verification."""
    return options.quantize == "auto" and item["quantize"] == "int8" and not item["verification"].passed


def _fall_back(item: dict, *stage_args) -> dict:
    """Replace a failed int8 artifact of --quantize auto by the first of its target's auto_fallbacks modes that
    verifies (each verified as usual), said aloud and recorded in the manifest; an explicit --quantize int8 fails
    instead. Returns the last one tried."""
    exported, original, expected, calibration, held, data_info, options, source, report, recovery, say = stage_args
    reasons = []
    for mode in target_for(item["target"]).auto_fallbacks:
        _discard(item)
        reasons.append(f"{item['quantize']}: " + "; ".join(item["verification"].failures()))
        say("export", f"{item['target']}: {item['quantize']} failed verification ({reasons[-1]}); --quantize auto "
                      f"tries {mode} instead (pass --quantize int8 to insist on int8)")
        item = _stage(exported, original, expected, item["target"], mode, calibration, held, data_info, options,
                      source, report, recovery, say, fallback={"from": "int8", "reason": " | ".join(reasons)})
        if item["verification"].passed:
            break
    return item


def _stage(model, original, expected, target: Path, quantize: str, calibration, held, data_info,
           options: ConvertOptions, source: Path, report, recovery, say, fallback: dict | None = None) -> dict:
    """Export to a temporary file beside `target`, verify it, write its manifest to another temporary file.
    original / expected: Outputs of the original / of `model` on the test inputs.
    fallback: why this mode replaces the one --quantize auto chose first (kept in the manifest)."""
    unit = target_for(target)
    mode = unit.mode(quantize)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".partial{target.suffix}", dir=target.parent)
    os.close(fd)
    item = {"target": target, "tmp": tmp, "tmp_manifest": None, "format": unit.name, "quantize": mode,
            "fallback": fallback}
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
    unit = target_for(target)
    export = unit.export_options(options.target_options(unit), mode)
    layout = unit.layout(export)
    heldout = held.test
    started = time.perf_counter()
    inputs = "held-out samples" if data_info["source"] else "synthetic inputs"
    runtime = None
    calibrated = f", calibrated on {len(calibration.samples)} samples" if mode in NEEDS_DATA else ""
    say("export", f"{target}: converting ({fmt}, {mode}{calibrated})")
    if not unit.runtime:
        unit.export(model, Path(tmp), export, _samples(calibration))
        verification = verify_keras(model, tmp, heldout.x, heldout.y, tolerance=options.tolerance, inputs=inputs,
                                    original=original, safe_mode=options.safe_mode, expected=expected.values)
    else:
        from sepconv.deploy.runtime import open_runtime

        if mode == "int8":
            from sepconv.convert.quantization import quantize_verified

            data, item["quantization"] = quantize_verified(model, fmt, calibration, tolerance=options.tolerance,
                                                           export=export, options=options.quantization)
            Path(tmp).write_bytes(data)
            say("quantize", f"{target}: {item['quantization'].line()}")
        else:
            unit.export(model, Path(tmp), export, _samples(calibration))
        say("verify", f"{target}: {Path(tmp).stat().st_size:,} bytes in {time.perf_counter() - started:.1f} s; "
                      f"verifying on {len(heldout.x)} {inputs}")
        runtime = open_runtime(tmp)
        verification = verify(model, runtime, heldout.x, heldout.y, quantized=mode != "none", quantize=mode,
                              tolerance=options.tolerance, layout=layout, inputs=inputs, original=original,
                              synthetic=not data_info["source"], expected=expected.values)
        verification = within_budget(verification, runtime, held, recovery, layout=layout)
    verification = _named(verification, target)
    manifest = build_manifest(Path(tmp), final_path=target, fmt=fmt, quantize=mode, runtime=runtime, layout=layout,
                              source={"path": str(source), "sha256": sha256(source)},
                              separation=report.to_dict() if report else None,
                              recovery=recovery.to_dict() if recovery else None, verification=verification,
                              options=options.describe(), preprocessing=data_info["preprocessing"],
                              quantize_fallback=item["fallback"], quantization=item.get("quantization"),
                              extras=unit.manifest_extras(Path(tmp)))
    fd, item["tmp_manifest"] = tempfile.mkstemp(prefix=f".{target.name}.json.", suffix=".partial", dir=target.parent)
    with _disk_full_as("writing the manifest of", target), os.fdopen(fd, "w") as file:
        file.write(manifest_json(manifest))
    item.update(verification=verification, manifest=manifest)
    status = "passed" if verification.passed else "FAILED"
    say("export", f"{target} ({fmt}, {mode}): {manifest['bytes']:,} bytes, verification {status}: "
                  f"{'; '.join(_criteria(verification))} ({time.perf_counter() - started:.1f} s)")
    return item


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
