"""Staging the artifacts of a run: each output exported to a temporary file beside its target, verified against the
Keras model, its manifest written to another temporary file; --quantize auto's fallback when int8 fails; each
verified artifact timed against the original converted the same way, the original shipped instead of a slower one
(export/speed.py); with --quantize auto, each quantized artifact timed against the original model in float32 too,
and float32 shipped instead when the quantized one runs slower than that (a runtime without fast int8 kernels for
some layers: ONNX Runtime's depthwise convolutions on x86, docs/benchmarks.md); then every artifact renamed into place
at once, or none (a failure leaves no partial file)."""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sepconv.convert.data import DataInfo
from sepconv.convert.errors import VerificationError
from sepconv.convert.export.manifest import build_manifest, manifest_json, manifest_path
from sepconv.convert.export.quantization import RepairVariants, quantize_verified, unstable_text
from sepconv.convert.export.speed import CONFIRM_FACTOR, SLOWER, Speed, compare, with_prediction
from sepconv.convert.export.targets import target_for
from sepconv.convert.export.tflite import NEEDS_DATA
from sepconv.convert.export.verification import verify, verify_keras, within_budget
from sepconv.convert.memory import release_memory
from sepconv.convert.options import ConvertOptions
from sepconv.convert.outputs import disk_full_as
from sepconv.convert.recovery.latency_table import cache_path, fastest_forms, set_aside
from sepconv.convert.results import Artifact, Source
from sepconv.deploy.runtime import open_runtime

MODE_MARGIN = 0.9  # --quantize auto ships float32 instead of a quantized artifact slower than this against it

if TYPE_CHECKING:
    from sepconv.convert.export.quantization import QuantizationReport
    from sepconv.convert.export.verification import Verification
    from sepconv.convert.recovery.latency_table import LatencyOptions


@dataclass(frozen=True)
class ExportJob:
    """What every output of a run is exported from and verified against.

    model: the Keras model to export (separated and recovered, or the original with --no-separate). original /
    expected: verification.Outputs of the model before separation (None without separation) / of `model` on the test
    inputs, computed once for every output. calibration: quantization.Calibration (None without data). held: the
    pipeline's HeldOut (validation, test). data_info: the data's DataInfo (data.datasets). report / recovery:
    the SeparationReport / RecoveryReport (None with --no-separate). say: progress(stage, message). speed: the run's
    latency_table.LatencyOptions (where and how to time) when each artifact is timed against the original, and
    source_model: that original Keras model (both None when nothing is timed). validation_expected: Outputs of
    `model` on the validation inputs (None without them), for judging --quantize auto's fallback modes there;
    validation_original: the same of the original model (source_model), for the original's when it ships instead.
    budget_from: the run's RecoveryReport, whose accuracy budget binds the original shipped in place of the
    separated model (whose own job has no recovery: its manifest records none)."""

    model: object
    original: object
    expected: object
    calibration: object
    held: object
    data_info: DataInfo
    options: ConvertOptions
    source: Source  # the input model, hashed once per run
    report: object
    recovery: object
    say: Callable[[str, str], None]
    speed: LatencyOptions | None = None
    source_model: object = None
    validation_expected: object = None
    validation_original: object = None
    budget_from: object = None
    mode_speed: LatencyOptions | None = None  # --quantize auto: how each quantized artifact is timed against the
    # original in float32 (the original Keras model: source_model, or `model` when nothing was separated); None: it
    # is not (another --quantize, or nothing is timed)
    variants: dict = field(default_factory=dict)  # (id of the model, per_channel, asymmetric rounding) -> the int8
    # repair's RepairVariants of that model (it keeps the model alive): made once for every format of the run

    @property
    def times_separation(self) -> bool:
        """Each artifact of a separated model is timed against the original converted the same way."""
        return self.speed is not None and self.source_model is not None


@dataclass
class Staged:
    """An artifact staged beside its target: its temporary files (removed unless committed: None once renamed), how
    it was exported, its verification and manifest. Filled in as it goes through export, verification and the
    speed check; `_commit` makes it an Artifact.

    fallback: why this mode replaces the one --quantize auto chose first ({from, reason}). quantization: the int8
    repair's report (int8 through a runtime). speed: timed against the original (also in `manifest`)."""

    target: Path
    tmp: str | None
    format: str
    quantize: str
    fallback: dict | None = None
    tmp_manifest: str | None = None
    verification: Verification | None = None
    manifest: dict | None = None
    quantization: QuantizationReport | None = None
    speed: Speed | None = None


def export_all(job: ExportJob, targets: list[Path], quantize: str, timer) -> tuple[Artifact, ...]:
    """Stage every artifact in a temporary file, verify it, then commit them all (or none)."""
    recovery = job.recovery
    staged = []
    try:
        for target in targets:
            with timer(f"export {target.name}"):
                item = _stage(job, target, quantize)
                if _falls_back(job, item):
                    item = _fall_back(job, item)
                staged.append(item)
            release_memory()
        failed = [s for s in staged if not s.verification.passed]
        if failed:
            over = any(s.verification.budget is not None and not s.verification.budget.held for s in failed)
            error = VerificationError("; ".join(_failure_line(s) for s in failed) + " - nothing was written; try "
                                      "another --quantize mode, more representative --data, " + (
                                          "or a larger --max-accuracy-drop" if over else "or a lower --min-agreement"))
            error.details = {"quantization": {str(s.target): s.quantization.to_dict() for s in failed
                                              if s.quantization is not None}}
            raise error
        latency = recovery.budget.plan.latency if recovery is not None and recovery.budget else None
        for index, item in enumerate(staged):
            with timer(f"speed {item.target.name}"):
                if job.times_separation:
                    staged[index] = item = _check_speed(job, item, latency)
                if job.mode_speed is not None:
                    staged[index] = _check_mode(job, item, latency)
        return tuple(_commit(s) for s in staged)
    finally:
        for item in staged:
            _discard(item)


def _check_speed(job: ExportJob, item: Staged, latency: dict | None, original: Path | None = None) -> Staged:
    """Time a verified artifact a runtime runs against the original converted the same way (export/speed.py), said
    in a line and kept in its manifest; a slower one is replaced by the original unless the user forced the
    separation. latency: the plan's latency table and choice (for the prediction), None without. original: that
    conversion of the original when the caller made it already (and removes it), else it is made here."""
    if not target_for(item.target).runtime:
        return item
    made = original is None
    original = _export_original(job, item) if made else original
    try:
        speed = _timed(job, item, original, job.speed, replaced_by="the original",
                       replaced=None if job.options.forced_separation else lambda timed: timed.verdict == SLOWER)
    finally:
        if made:
            original.unlink(missing_ok=True)
    speed = with_prediction(speed, *_predicted(latency, item))
    job.say("speed", speed.line(item.target))
    if speed.mispredicted and latency["table"]["cached"]:
        _stale_cache(job, latency["table"], speed)
    if speed.verdict == SLOWER:
        if job.options.forced_separation:
            job.say("speed", f"{item.target}: slower than the original, shipped as --rank / --energy asked")
        else:
            item = _ship_original(job, item, speed)
            speed = item.speed or speed
    item.speed = speed
    item.manifest["speed"] = speed.to_dict()
    with disk_full_as("writing the manifest of", item.target):
        Path(item.tmp_manifest).write_text(manifest_json(item.manifest))
    return item


def _timed(job: ExportJob, item: Staged, original: Path, latency: LatencyOptions, *,
           replaced: Callable[[Speed], bool] | None, replaced_by: str, original_quantize: str | None = None) -> Speed:
    """`item` timed against the `original` file in one interleaved run (where and how: `latency`); a first timing
    that would have it `replaced` (by `replaced_by`, in words) is timed again CONFIRM_FACTOR times as long, and that
    timing decides."""
    def timed(options) -> Speed:
        return compare(Path(item.tmp), original, where=latency.where, timing=options, fmt=item.format,
                       quantize=item.quantize, say=job.say, original_quantize=original_quantize)

    speed = timed(latency.timing)
    if replaced is not None and replaced(speed):
        against = "the original in float32" if original_quantize == "none" else "the original"
        job.say("speed", f"{item.target}: {speed.interval()} against {against} in a first timing; timing again "
                         f"{CONFIRM_FACTOR}x as long to confirm it (a slower one is replaced by {replaced_by})")
        longer = replace(latency.timing, min_seconds=min(latency.timing.min_seconds * CONFIRM_FACTOR, 599.0),
                         min_runs=latency.timing.min_runs * CONFIRM_FACTOR)
        speed = replace(timed(longer), first_speedup=speed.speedup)
    return speed


def _check_mode(job: ExportJob, item: Staged, latency: dict | None) -> Staged:
    """--quantize auto: a quantized artifact a runtime runs, timed against the original model in float32 (the model
    the user brought, converted without quantization); when it runs slower than that beyond noise and the margin
    (`_slower_than_float32`), the run's model in float32 is staged, verified and (when separated) timed against the
    original like every artifact, and shipped instead: said in a line, recorded as the artifact's quantize_fallback
    ({from, reasons, reason (joined), slower: the mode that was slower}).
    The comparison is kept in the manifest either way (`speed_float32`)."""
    if item.quantize == "none" or not target_for(item.target).runtime:
        return item
    original_model = job.source_model if job.source_model is not None else job.model
    # the original in float32: what the quantized artifact is timed against here, and what a float32 one shipped
    # instead is timed against by _check_speed (made once for both)
    original = _export_original(replace(job, source_model=original_model), replace(item, quantize="none"))
    try:
        return _replaced_by_float32(job, item, latency, original)
    finally:
        original.unlink(missing_ok=True)


def _replaced_by_float32(job: ExportJob, item: Staged, latency: dict | None, original: Path) -> Staged:
    """_check_mode with the original in float32 made (`original`)."""
    speed = _timed(job, item, original, job.mode_speed, replaced=_slower_than_float32, replaced_by="float32",
                   original_quantize="none")
    job.say("speed", speed.line(item.target))
    item.manifest["speed_float32"] = speed.to_dict()
    with disk_full_as("writing the manifest of", item.target):
        Path(item.tmp_manifest).write_text(manifest_json(item.manifest))
    if not _slower_than_float32(speed):
        return item
    slower = (f"{item.quantize} ran slower than the original model in float32 by more than "
              f"{1 - MODE_MARGIN:.0%} ({speed.interval()} on {speed.where})")
    job.say("speed", f"{item.target}: {slower}; --quantize auto ships float32 instead (pass --quantize "
                     f"{item.quantize} to insist)")
    previous = item.fallback or {}
    fallback = _fallback_record({**previous, "from": previous.get("from", item.quantize), "slower": item.quantize},
                                [*previous.get("reasons", []), f"{item.quantize}: {slower}"])
    shipped = _stage(job, item.target, "none", fallback=fallback)
    if not shipped.verification.passed:
        _discard(shipped)
        job.say("speed", f"{item.target}: its float32 artifact failed verification "
                         f"({'; '.join(shipped.verification.failures())}); the {item.quantize} one is shipped")
        return item
    _discard(item)
    return _check_speed(job, shipped, latency, original) if job.times_separation else shipped


def _fallback_record(record: dict, reasons: list[str]) -> dict:
    """An artifact's quantize_fallback: `record` with the reasons (one per mode replaced, "MODE: why") and their join
    (`reason`, as the manifest had it before the list)."""
    return {**record, "reasons": list(reasons), "reason": " | ".join(reasons)}


def _slower_than_float32(speed: Speed) -> bool:
    """A quantized artifact is replaced by float32 when it is slower than the original in float32 by more than
    1 - MODE_MARGIN beyond noise (its whole interval under MODE_MARGIN): it is 2-4x smaller, which a difference
    within that margin does not outweigh (a 1x1-convolution model's dynamic-range TFLite: 0.98x)."""
    return speed.speedup_ci95[1] < MODE_MARGIN


def _ship_original(job: ExportJob, item: Staged, speed: Speed) -> Staged:
    """The original model staged in `item`'s place and mode, verified like every artifact; `item` itself when the
    original's artifact fails verification (said)."""
    job.say("speed", f"{item.target}: the separated model is not faster than the original ({speed.interval()}); "
                     f"shipping the original converted the same way ({item.format} {item.quantize}) instead")
    original_job = replace(job, model=job.source_model, original=None, expected=job.original, report=None,
                           recovery=None, budget_from=job.recovery, validation_expected=job.validation_original)
    shipped = _stage(original_job, item.target, item.quantize, fallback=item.fallback)
    if not shipped.verification.passed:
        _discard(shipped)
        job.say("speed", f"{item.target}: the original's {item.quantize} artifact failed verification "
                         f"({'; '.join(shipped.verification.failures())}); the separated one is shipped, "
                         f"{speed.interval()} against the original")
        return item
    _discard(item)
    shipped.speed = replace(speed, shipped="original")
    return shipped


def _export_original(job: ExportJob, item: Staged) -> Path:
    """The original Keras model exported as `item` was (format, mode, options, calibration) to a temporary file
    beside its target: what the artifact is timed against."""
    unit = target_for(item.target)
    export, _ = _fastest_forms(replace(job, model=job.source_model), unit,
                               unit.export_options(job.options.target_options(unit), item.quantize))
    fd, tmp = tempfile.mkstemp(prefix=f".{item.target.name}.original.", suffix=f".partial{item.target.suffix}",
                               dir=item.target.parent)
    os.close(fd)
    try:
        with disk_full_as("writing", item.target):
            unit.export(job.source_model, Path(tmp), export, _samples(job.calibration))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _predicted(latency: dict | None, item: Staged) -> tuple[float | None, float | None]:
    """The latency table's whole-model prediction for the plan, and the speed-up its target asked (None without
    one), when the table timed this artifact's format and mode."""
    if not latency:
        return None, None
    table, choice = latency["table"], latency["choice"]
    if table["format"] != item.format or table["quantize"] != item.quantize:
        return None, None
    target = choice["original_ms"] / choice["target_ms"] if choice.get("target_ms") else None
    return choice["predicted_ms"], target


def _stale_cache(job: ExportJob, table: dict, speed: Speed) -> None:
    """The artifact took more than twice what a table read partly from the cache predicted: the cached timings are
    not to be trusted again. The device's cache file is set aside (FILE.stale) so that the next run times every
    entry afresh; said in a line."""
    path = cache_path(job.speed, {"where": table["where"], "device": table["device"]})
    aside = set_aside(path, ".stale")
    job.say("speed", f"{speed.artifact_ms:.4f} ms measured against {speed.predicted_ms:.4f} ms predicted from a "
                     f"table with {table['cached']} cached timing(s): the latency cache "
                     + (f"{path} is set aside as {aside.name}; the next run times every layer again" if aside else
                        f"{path} could not be set aside; remove it (or pass --latency-cache DIR) to time again"))


def _falls_back(job: ExportJob, item: Staged) -> bool:
    """--quantize auto chose int8 (data given) and the validation images reject it (`_rejection`)."""
    return job.options.quantize == "auto" and item.quantize == "int8" and _rejection(job, item) is not None


def _fall_back(job: ExportJob, item: Staged) -> Staged:
    """Replace an int8 artifact of --quantize auto that the validation images reject by the first of its target's
    auto_fallbacks modes that they accept, said aloud and recorded in the manifest; an explicit --quantize int8 fails
    instead. The test images then verify what this chose: they never choose."""
    reasons, int8 = [], _int8_record(item.quantization)
    where = "on the validation images" if job.held.validation is not None else "verification"
    reason = _rejection(job, item)
    for mode in target_for(item.target).auto_fallbacks:
        _discard(item)
        reasons.append(f"{item.quantize}: {reason}")
        job.say("export", f"{item.target}: {item.quantize} failed {where} ({reason}); --quantize auto tries {mode} "
                          f"instead (pass --quantize int8 to insist on int8)")
        item = _stage(job, item.target, mode, fallback=_fallback_record({"from": "int8", **int8}, reasons))
        reason = _rejection(job, item)
        if reason is None:
            return item
    _discard(item)
    raise VerificationError(f"{item.target}: --quantize auto found no mode that passes {where} "
                            f"({' | '.join(reasons + [f'{item.quantize}: {reason}'])}) - nothing was written; try "
                            f"more representative --data, a lower --min-agreement or a larger --max-accuracy-drop")


def _rejection(job: ExportJob, item: Staged) -> str | None:
    """Why the validation images reject a staged artifact, None when they accept it: over the accuracy budget there,
    no int8 repair attempt agreeing with the Keras model there (within their noise, verification.Tolerance), or (for
    the other modes) its own verification on them. Without validation images, its verification on the test images
    decides, as nothing else can."""
    tolerance, validation, decided = job.options.tolerance, job.held.validation, item.quantization
    budget = item.verification.budget
    if budget is not None and not budget.held:
        return budget.failure()
    if decided is not None and decided.validated:
        if decided.passed:
            return None
        best = max(decided.attempts, key=lambda attempt: attempt.agreement or 0.0)
        short = ("as requested fell short of it by more than they can show, and a repair attempt, the best of "
                 "several on them, is not taken within their noise" if best.within_noise else
                 "nor fell short of it by less than they can show")
        unstable = unstable_text(decided.keras_stability, tolerance.min_agreement,
                                 _within_budget_text(decided.attempts[0], budget))
        return (f"no attempt reached top-1 agreement {tolerance.min_agreement:.2%} with the Keras model on the "
                f"{_samples_of(validation)} validation images, {short} (best: {best.name}, {best.agreement:.2%})"
                + (f"; {decided.diagnosis.worst_line()} (the as-requested attempt)" if decided.diagnosis else "")
                + (f"; {unstable}" if unstable else ""))
    if validation is None:
        return None if item.verification.passed else "; ".join(item.verification.failures())
    checked = verify(job.model, open_runtime(item.tmp), validation.x, quantized=True, quantize=item.quantize,
                     tolerance=tolerance, layout=item.manifest["layout"], inputs="validation images",
                     expected=job.validation_expected.values)
    return None if checked.passed else "; ".join(checked.failures())


def _within_budget_text(first, budget) -> str:
    """For an int8 that failed on an unstable Keras model, when the int8 written (the as-requested attempt, what the
    accuracy budget measured) holds the budget on the validation images: the --min-agreement under which they
    accept it; "" when the budget was not measured or not held, or the agreement is not top-1's."""
    if budget is None or not budget.held or first.agreement is None:
        return ""
    floor = math.floor(first.agreement * 100) / 100
    return (f"pass --min-agreement {floor:.2f}: the int8 as requested holds the accuracy budget on the validation "
            f"images ({budget.metric} {budget.artifact:.2%} against the original's {budget.original:.2%}, budget "
            f"{budget.max_drop:g} point{'s' * (budget.max_drop != 1)}), which then accept it and the test images "
            f"verify it")


def _samples_of(validation) -> str:
    return f"{len(validation.x):,}" if validation is not None else "no"


def _int8_record(report) -> dict:
    """What a fallback's record keeps of the failed int8's QuantizationReport (None: not measured): its attempts
    (name, validation agreement, passed, seconds), the Keras model's stability under int8-sized noise, the repair's
    and the first diagnosis's seconds, and that diagnosis (each layer's int8 error: where int8 hurt)."""
    if report is None:
        return {"int8_attempts": None, "keras_stability": None, "int8_repair_seconds": None,
                "int8_diagnosis_seconds": None, "int8_diagnosis": None}
    return {"int8_attempts": [{"name": a.name, "agreement": a.agreement, "passed": a.passed, "seconds": a.seconds}
                              for a in report.attempts],
            "keras_stability": report.keras_stability, "int8_repair_seconds": round(report.repair_seconds, 2),
            "int8_diagnosis_seconds": round(report.diagnosis_seconds, 2),
            "int8_diagnosis": report.diagnosis.to_dict() if report.diagnosis is not None else None}


def _stage(job: ExportJob, target: Path, quantize: str, fallback: dict | None = None) -> Staged:
    """Export to a temporary file beside `target`, verify it, write its manifest to another temporary file.
    fallback: why this mode replaces the one --quantize auto chose first (kept in the manifest)."""
    unit = target_for(target)
    mode = unit.mode(quantize)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".partial{target.suffix}", dir=target.parent)
    os.close(fd)
    item = Staged(target=target, tmp=tmp, format=unit.name, quantize=mode, fallback=fallback)
    try:
        with disk_full_as("writing", target):
            return _export_and_verify(job, item)
    except BaseException:
        _discard(item)
        raise


def _discard(item: Staged) -> None:
    """Remove a staged artifact's temporary files (nothing after _commit has renamed them)."""
    for path in (item.tmp, item.tmp_manifest):
        if path is not None:
            Path(path).unlink(missing_ok=True)


def _export_and_verify(job: ExportJob, item: Staged) -> Staged:
    model, original, expected, calibration, held = job.model, job.original, job.expected, job.calibration, job.held
    options, report, recovery, say = job.options, job.report, job.recovery, job.say
    target, tmp, fmt, mode = item.target, item.tmp, item.format, item.quantize
    unit = target_for(target)
    export, forms = _fastest_forms(job, unit, unit.export_options(options.target_options(unit), mode))
    layout = unit.layout(export)
    heldout = held.test
    started = time.perf_counter()
    inputs = "held-out samples" if job.data_info.source else "synthetic inputs"
    runtime = None
    calibrated = f", calibrated on {len(calibration.samples)} samples" if mode in NEEDS_DATA else ""
    say("export", f"{target}: converting ({fmt}, {mode}{calibrated})")
    if not unit.runtime:
        unit.export(model, Path(tmp), export, _samples(calibration))
        verification = verify_keras(model, tmp, heldout.x, heldout.y, tolerance=options.tolerance, inputs=inputs,
                                    original=original, safe_mode=options.safe_mode, expected=expected.values)
    else:
        if mode == "int8":
            asymmetric = options.quantization.asymmetric_rounding
            variants = job.variants.setdefault((id(model), export.per_channel, asymmetric), RepairVariants(
                model, calibration.samples, export.per_channel, asymmetric))
            data, item.quantization = quantize_verified(model, unit, calibration, tolerance=options.tolerance,
                                                        export=export, options=options.quantization,
                                                        variants=variants)
            Path(tmp).write_bytes(data)
            say("quantize", f"{target}: {item.quantization.line()}")
        else:
            unit.export(model, Path(tmp), export, _samples(calibration))
        say("verify", f"{target}: {Path(tmp).stat().st_size:,} bytes in {time.perf_counter() - started:.1f} s; "
                      f"verifying on {len(heldout.x)} {inputs}")
        runtime = open_runtime(tmp)
        verification = verify(model, runtime, heldout.x, heldout.y, quantized=mode != "none", quantize=mode,
                              tolerance=options.tolerance, layout=layout, inputs=inputs, original=original,
                              synthetic=not job.data_info.source, expected=expected.values)
        verification = within_budget(verification, runtime, held, recovery or job.budget_from, layout=layout,
                                     confidence=options.tolerance.confidence)
    verification = _named(verification, target)
    manifest = build_manifest(Path(tmp), final_path=target, fmt=fmt, quantize=mode, runtime=runtime, layout=layout,
                              source=job.source.identity(),
                              separation=report.to_dict() if report else None,
                              recovery=recovery.to_dict() if recovery else None, verification=verification,
                              options=options.describe(), preprocessing=job.data_info.preprocessing,
                              quantize_fallback=item.fallback, quantization=item.quantization,
                              extras={**unit.manifest_extras(Path(tmp)), **({"forms": forms} if forms else {}),
                                      "data": job.data_info.to_dict()})  # the roles, so a later run can check them
    fd, item.tmp_manifest = tempfile.mkstemp(prefix=f".{target.name}.json.", suffix=".partial", dir=target.parent)
    with disk_full_as("writing the manifest of", target), os.fdopen(fd, "w") as file:
        file.write(manifest_json(manifest))
    item.verification, item.manifest = verification, manifest
    status = "passed" if verification.passed else "FAILED"
    say("export", f"{target} ({fmt}, {mode}): {manifest['bytes']:,} bytes, verification {status}: "
                  f"{'; '.join(_criteria(verification))} ({time.perf_counter() - started:.1f} s)")
    return item


def _fastest_forms(job: ExportJob, unit, export):
    """(export options, the forms record): a runtime's export of a model with separable layers of depth multiplier
    above 1 takes each one's faster equivalent form, timed where latency is measured (export/forms.py,
    latency_table.fastest_forms); unchanged without latency or without such layers."""
    if job.speed is None or not unit.runtime:
        return export, None
    record = fastest_forms(job.model, replace(job.speed, export=export), progress=job.say)
    if not record:
        return export, None
    job.say("export", f"separable forms for {unit.title} {export.quantize}, timed: " + ", ".join(
        f"{path} {form} ({record['ms'][path][form] * 1000:.1f} us; "
        f"{min(ms for f, ms in record['ms'][path].items() if f != form) * 1000:.1f} other)"
        for path, form in record["forms"].items()))
    return replace(export, forms=record["changed"]), record


def _samples(calibration):
    return None if calibration is None else calibration.samples


def _criteria(verification) -> list[str]:
    budget = [verification.budget.criterion()] if verification.budget is not None else []
    return [c.criterion for c in verification.outputs] + budget


def _named(verification, target: Path):
    from dataclasses import replace

    return replace(verification, artifact=str(target))


def _failure_line(item: Staged) -> str:
    line = f"{item.target} ({item.quantize}) failed verification: {'; '.join(item.verification.failures())}"
    quantization = item.quantization
    if quantization is not None and quantization.validated and quantization.passed and not all(
            check.passed for check in item.verification.outputs):
        chosen = quantization.attempts[quantization.chosen]
        line += (f" (int8 {chosen.name} agreed with the Keras model on {chosen.agreement:.2%} of the validation "
                 f"images; the test images do not confirm it)")
    if quantization is not None and quantization.diagnosis is not None:
        line += f" after {quantization.line()}; {quantization.diagnosis.summary()} (full table: --json)"
    return line


def _commit(item: Staged) -> Artifact:
    target = item.target
    os.chmod(item.tmp, 0o644)
    os.chmod(item.tmp_manifest, 0o644)
    os.replace(item.tmp, target)
    os.replace(item.tmp_manifest, manifest_path(target))
    item.tmp = item.tmp_manifest = None
    manifest = item.manifest
    return Artifact(path=str(target), format=item.format, quantize=item.quantize, bytes=manifest["bytes"],
                    sha256=manifest["sha256"], manifest=str(manifest_path(target)), verification=item.verification,
                    quantize_fallback=item.fallback, quantization=item.quantization, speed=item.speed)
