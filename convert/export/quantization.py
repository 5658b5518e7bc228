"""int8 that holds: diagnose which layers full-integer quantization breaks, and repair the artifact.

Diagnosis uses the converters' own tools, each op named by the Keras layers it computes (`keras_layers`). For TFLite,
`tf.lite.experimental.QuantizationDebugger` runs every quantized op next to its float twin (fed the same dequantized
input) on the calibration images: the error of each op's output is local to that op. For ONNX,
`onnxruntime.quantization.qdq_loss_debug` records every activation of the float and the QDQ models: the error of a
tensor's QuantizeLinear/DequantizeLinear pair is local (`qdq`), its difference from the float model accumulates
everything before it (`xmodel`). Per layer: RMSE / scale (RMSE in units of the output's quantization step: ~0.29 is
the rounding floor), relative error (RMSE / std of the float output), the float output's range and the int8 scale.
All layers together (`accumulated_tflite`): the int8 and the float TFLite models run with every tensor kept, each
op's output compared with the float model's. The error "starts" at the first layer, in graph order, whose relative
error alone exceeds RELATIVE_ERROR_ALARM.

Repair (`export_int8`), when the artifact at the requested settings does not agree with the Keras model on the
validation images, tries in order, each measured, and stops at the first that agrees: cross-layer equalization of the
separable layers and of BatchNorm -> ReLU -> convolution chains (equalization.py: the same float function, weights and
activations balanced for int8), weight rounding
that keeps each layer's output (rounding.py: GPTQ, per-channel weights only), the same with bias correction, more and
shuffled calibration samples (and per-channel weights if they were per-tensor; percentile then entropy calibration for
ONNX), the other weight granularity (per-tensor where per-channel was asked: it can be better, ONNX Runtime issue
11415), then the worst 1..max_float_layers layers kept in float (TFLite `denylisted_nodes`, ONNX `nodes_to_exclude`)
when a layer is bad alone (above RELATIVE_ERROR_ALARM; with none, the error is spread over the layers and one or two in
float cannot fix it: not tried, said in the report). A step that agrees better than every attempt before it becomes the
base of the later ones; one that does not is dropped. Repair aims at the measured agreement; when no attempt reaches it
and the first attempt (as requested) falls short by less than the validation images can show (verification's
`Tolerance.confidence`), the best attempt within that noise is chosen, and said; otherwise nothing is (and --quantize
auto falls back). A repair attempt alone cannot be taken within the noise: it is the best of several measured on the
same images, so its shortfall there is flattered by the choice (the winner's curse: on the zoo, repair attempts picked
as the best agreed 1 to 4 points less on the test images than on the validation ones, 98.67 -> 97.33, 99.11 -> 97.33
and 97.78 -> 96.89 in docs/benchmarks.md's tables, and a nested MobileNetV2's calibration attempt 96.89 -> 92.89,
which failed its run). Choices use the validation images; the pipeline's verification on the test images judges the
result, as for any artifact.

The repair also runs when the first attempt passes but agrees with the Keras model on less than
QuantizationOptions.aim (99%) of the validation images: the same steps but the float layers, stopped at the first that
reaches the aim; the attempt that agrees best is kept (the first attempt on ties: a step is kept only if it agrees
better), the bar already met by the first. The zoo's rescaling CNN: as requested 98.67%, weight rounding 99.56% on
validation and on test (docs/benchmarks.md). The repair of a first attempt that fails still stops at the first that
passes: going on towards the aim changed no artifact of the zoo's three such runs, for 2-13 s more each.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from sepconv.convert.errors import InvalidOptionError
from sepconv.convert.export.equalization import activation_pairs, equalize
from sepconv.convert.export.onnx import quantize_static_qdq, reader
from sepconv.convert.export.rounding import round_weights
from sepconv.convert.export.tflite import TFLiteOptions, export_tflite, make_converter
from sepconv.convert.export.trace import frozen_function, keep_frozen
from sepconv.convert.export.verification import compare_outputs, run_artifact
from sepconv.convert.graph import batch_size_for, leaf_layers, predict_keras
from sepconv.convert.keras_compat import producer_name
from sepconv.deploy.files import temporary_folder
from sepconv.deploy.quiet import captured_output
from sepconv.deploy.runtime import open_runtime, tflite_spec
from sepconv.deploy.scores import hit_rate, top1

NEAREST, ROUNDED, ROUNDED_BIAS = "nearest", "gptq", "gptq+bias"  # how a setting's weights are rounded
RELATIVE_ERROR_ALARM = 0.25  # an op whose output error is a quarter of its signal's spread is where trouble starts
DIAGNOSIS_SAMPLES = 100  # calibration images the debuggers run (the artifact is calibrated on all of them)
ACCUMULATED_SAMPLES = 32  # of them, run through the whole int8 and float TFLite models with every tensor kept
NAME_CHARS = 60  # a converter's op name longer than this is cut in messages (TFLite's fused names run to 2,000)
WEIGHTED = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Conv1D", "Conv3D", "Conv2DTranspose", "Dense")


@dataclass(frozen=True)
class QuantizationOptions:
    """repair: try better calibration, then float layers, when int8 disagrees with the Keras model.
    explain: diagnose even when the first attempt passes (CLI --explain-quantization).
    equalize: try cross-layer equalization first (separable layers, BatchNorm -> ReLU -> convolution: equalization.py).
    round_weights: try GPTQ weight rounding, then with bias correction (rounding.py), before calibration.
    asymmetric_rounding: the rounding aims each layer at the float model's output on the float model's own inputs
    (rounding.py); False: at its float weights on the rounded copy's inputs, as GPTQ was published.
    max_float_layers: at most this many layers kept in float by the repair.
    calibration_samples: samples (a seeded shuffle of the training images) of the better-calibration attempt.
    aim: a first attempt that passes but agrees with the Keras model on less than this share of the validation images
    is repaired too, without float layers, the attempt that agrees best kept (0: a passing first attempt is kept)."""

    repair: bool = True
    explain: bool = False
    equalize: bool = True
    round_weights: bool = True
    asymmetric_rounding: bool = True
    max_float_layers: int = 2
    calibration_samples: int = 1000
    aim: float = 0.99

    def __post_init__(self):
        for name, low in (("max_float_layers", 0), ("calibration_samples", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidOptionError(f"Unrecognized {name}={value!r}. Use a whole number >= {low}")
        if isinstance(self.aim, bool) or not isinstance(self.aim, (int, float)) or not 0 <= self.aim <= 1:
            raise InvalidOptionError(f"Unrecognized aim={self.aim!r}. Use a fraction from 0 to 1, e.g. 0.99")


@dataclass(frozen=True)
class Calibration:
    """The images int8 export may use: `samples` calibrate the first attempt, `pool` (training images) the
    better-calibration one, `validation` judges the attempts (never the test images)."""

    samples: np.ndarray
    pool: np.ndarray | None = None
    validation: np.ndarray | None = None


@dataclass(frozen=True)
class LayerError:
    layer: str  # the op's output tensor (TFLite) or node (ONNX) name
    op: str
    order: int  # position in the graph
    rmse_over_scale: float | None  # RMSE in int8 steps of the output
    relative_error: float  # RMSE / std of the float output
    min: float | None  # the float output's range on the calibration images
    max: float | None
    scale: float | None  # the int8 output scale
    accumulated_relative_error: float | None = None  # vs the float model, all earlier errors included ("together")
    channel_relative_error: float | None = None  # mean over channels (TFLite) or units (ONNX) of RMSE / their std
    keras: tuple[str, ...] = ()  # the Keras layers (paths) the op computes, the main one (with weights) first

    @property
    def name(self) -> str:
        """The op as a user knows it: its Keras layer's path, or its converter's name when none is known."""
        if self.keras:
            return self.keras[0]
        return self.layer if len(self.layer) <= NAME_CHARS else self.layer[:NAME_CHARS - 3] + "..."

    @property
    def severity(self) -> float:
        """What ranks the layers: the worse of the whole-tensor and the per-channel relative error (one outlier
        channel sets the scale of a per-tensor int8 activation and flattens every other channel)."""
        return max(self.relative_error, self.channel_relative_error or 0.0)


@dataclass(frozen=True)
class Diagnosis:
    format: str
    tool: str
    samples: int
    layers: tuple[LayerError, ...]

    @property
    def starts_at(self) -> LayerError | None:
        return next((row for row in sorted(self.layers, key=lambda r: r.order)
                     if row.severity > RELATIVE_ERROR_ALARM), None)

    def worst(self, count: int) -> list[LayerError]:
        return sorted(self.layers, key=lambda row: -row.severity)[:count]

    def worst_together(self, count: int) -> list[LayerError]:
        """The `count` layers with the largest error all layers together give ([] when that was not measured)."""
        together = [row for row in self.layers if row.accumulated_relative_error is not None]
        return sorted(together, key=lambda row: -row.accumulated_relative_error)[:count]

    def summary(self) -> str:
        """One line: where the error starts, the worst three layers alone and (when measured) together."""
        worst = ", ".join(f"{r.name} ({r.op}) {r.severity:.0%}" +
                          (f" range [{r.min:.3g}, {r.max:.3g}]" if r.min is not None else "") +
                          (f" scale {r.scale:.3g}" if r.scale else "")
                          for r in self.worst(3))
        start = self.starts_at
        where = (f"error starts at {start.name} ({start.op}, relative error {start.severity:.0%})" if start
                 else f"no layer above {RELATIVE_ERROR_ALARM:.0%} relative error")
        line = (f"{self.format} int8 diagnosis on {self.samples} calibration images, each layer alone: {where}; "
                f"worst: {worst}")
        together = self.worst_together(len(self.layers))
        if together:
            last = max(together, key=lambda row: row.order)
            line += (f"; all layers together: {last.accumulated_relative_error:.0%} at the last ({last.name}), worst: "
                     + ", ".join(f"{r.name} {r.accumulated_relative_error:.0%}" for r in together[:3]))
        return line

    def worst_line(self) -> str:
        """The three layers where int8 hurts most, by the error all layers together give (when measured: where the
        error is spread, no layer is bad alone) else each alone: what a fallback's reason names."""
        top = self.worst_together(3)
        if top:
            return "where int8 hurts most (all layers together, each alone): " + ", ".join(
                f"{r.name} {r.accumulated_relative_error:.0%} ({r.severity:.0%})" for r in top)
        return "where int8 hurts most (each layer alone): " + ", ".join(
            f"{r.name} {r.severity:.0%}" for r in self.worst(3))

    def to_dict(self) -> dict:
        start = self.starts_at
        return {"format": self.format, "tool": self.tool, "samples": self.samples,
                "starts_at": start.layer if start else None, "alarm_relative_error": RELATIVE_ERROR_ALARM,
                "layers": [{**asdict(row), "keras": list(row.keras)}  # as JSON gives it back (a fallback's record)
                           for row in sorted(self.layers, key=lambda r: r.order)]}


@dataclass(frozen=True)
class Attempt:
    name: str
    calibration: str
    float_layers: tuple[str, ...]
    bytes: int
    agreement: float | None  # top-1 agreement with the Keras model on the validation images
    cosine: float
    passed: bool  # reached the bar as measured
    equalized: bool = False
    per_channel: bool = True
    rounding: str = NEAREST
    within_noise: bool = False  # passed, or under the bar by less than the validation images can show
    seconds: float = 0.0  # making it (its equalized or rounded weights the first time a step asks for them), judging it


@dataclass(frozen=True)
class FloatLayer:
    layer: str
    op: str
    reason: str
    bytes: int  # what keeping it in float adds to the artifact


@dataclass(frozen=True)
class QuantizationReport:
    attempts: tuple[Attempt, ...]
    chosen: int | None  # index into attempts, None if none passed
    float_layers: tuple[FloatLayer, ...] = ()
    diagnosis: Diagnosis | None = None
    equalization: dict | None = None  # EqualizationReport.to_dict() when an attempt equalized
    rounding: dict | None = None  # RoundingReport.to_dict() of the chosen attempt's weights, when it rounded them
    validated: bool = False  # the attempts were judged on validation images (else on the calibration images)
    note: str = ""  # a repair step not tried, and why
    keras_stability: float | None = None  # when int8 failed: the Keras model's own top-1 kept under int8-sized noise
    repair_seconds: float = 0.0  # the repair's wall-clock: every step after the first attempt and its diagnosis
    diagnosis_seconds: float = 0.0  # the first attempt's diagnosis (int8 failed, or --explain-quantization): a failing
    # int8 costs it and the repair

    @property
    def passed(self) -> bool:
        return self.chosen is not None

    @property
    def within_noise(self) -> bool:
        """The chosen attempt is under the bar as measured, by less than the validation images can show."""
        return self.chosen is not None and not self.attempts[self.chosen].passed

    def to_dict(self) -> dict:
        return {"passed": self.passed, "within_noise": self.within_noise, "chosen": self.chosen,
                "attempts": [asdict(a) for a in self.attempts],
                "float_layers": [asdict(f) for f in self.float_layers],
                "diagnosis": self.diagnosis.to_dict() if self.diagnosis else None,
                "equalization": self.equalization, "rounding": self.rounding, "validated": self.validated,
                "note": self.note, "keras_stability": self.keras_stability,
                "repair_seconds": round(self.repair_seconds, 2), "diagnosis_seconds": round(self.diagnosis_seconds, 2)}

    def line(self) -> str:
        tried = "; ".join(f"{a.name}: {_agreement_text(a)}" for a in self.attempts)
        kept = "; ".join(f"{f.layer} ({f.op}, {f.reason}, {f.bytes:+,} bytes)" for f in self.float_layers)
        noise = (f"; none reached the bar, {self.attempts[self.chosen].name} is under it by less than the validation "
                 f"images can show: chosen" if self.within_noise else "")
        return (f"int8 attempts ({tried})" + noise + (f"; kept in float: {kept}" if kept else "")
                + (f"; {self.note}" if self.note else "")
                + (f"; {_equalization_text(self.equalization)}" if self.equalization else "")
                + (f"; {_rounding_text(self.rounding)}" if self.rounding else "")
                + (f"; the repair took {self.repair_seconds:.1f} s" if self.repair_seconds else "")
                + (f"; the diagnosis {self.diagnosis_seconds:.1f} s" if self.diagnosis_seconds else ""))


def _equalization_text(report: dict) -> str:
    """What equalization did: how many layers, and the widest spread of channel ranges before and after."""
    widest = max(report["layers"], key=lambda layer: layer["spread_before"])
    across = sum(1 for layer in report["layers"] if layer.get("across"))
    inside = len(report["layers"]) - across
    what = " and ".join([f"{inside} separable layers"] * bool(inside)
                        + [f"{across} activations across a ReLU"] * bool(across))
    return (f"equalized {what} on {report['samples']} images (widest channel range "
            f"spread: {widest['path']} {widest['spread_before']:.1f}x -> {widest['spread_after']:.1f}x)")


def _rounding_text(report: dict) -> str:
    """What weight rounding did: how many layers, and the one whose output error it changed most."""
    worst = max(report["layers"], key=lambda layer: layer["error_nearest"])
    return (f"weights of {len(report['layers'])} layers rounded on {report['samples']} images"
            + (" with bias correction" if report["bias_correction"] else "")
            + f" (worst layer: {worst['path']} output error {worst['error_nearest']:.2%} to nearest, "
              f"{worst['error_rounded']:.2%} rounded)")


def _agreement_text(attempt: Attempt) -> str:
    if attempt.agreement is None:
        return f"cosine {attempt.cosine:.4f}"
    return f"agreement {attempt.agreement:.2%}"


@dataclass(frozen=True)
class Setting:
    """One way to quantize: calibration images, method (ONNX), per-channel, layers kept in float, whether the
    separable layers are equalized first."""

    name: str
    samples: np.ndarray = field(repr=False)
    calibration: str
    per_channel: bool = True
    method: str = "minmax"
    float_layers: tuple[str, ...] = ()
    equalized: bool = False
    rounding: str = NEAREST


def export_int8(model, target, calibration: Calibration, *, export: Callable[[Setting], bytes],
                judge: Callable[[bytes, np.ndarray], tuple[float | None, float, bool]],
                diagnose: Callable[[Setting], Diagnosis], per_channel: bool,
                options: QuantizationOptions = QuantizationOptions(),
                equalization: Callable[[], dict | None] | None = None,
                rounding: Callable[[Setting], dict | None] | None = None) -> tuple[bytes, QuantizationReport]:
    """The int8 artifact of the first setting that agrees with the Keras model on the validation images.

    export(setting) -> artifact bytes; judge(artifact, x) -> (agreement, cosine, passed as measured, passed within the
    sampling noise of x); diagnose(setting) -> Diagnosis; equalization() -> the EqualizationReport (as a dict) of the
    equalized model that settings with `equalized` export, or None when the model has no separable layer to equalize
    (then no equalized attempt is made); rounding(setting) -> the RoundingReport (as a dict) of the weights a setting
    with `rounding` exports, None when no layer has weights to round. Without validation images (or with repair off) the
    first setting is the only one tried. The steps (module doc) build on a base: the setting that agreed best so far.
    When none passes as measured, the best one within the noise is chosen.
    """
    first = _as_requested(calibration, per_channel)
    attempts, artifacts, settings = [], [], []
    note = ""

    def attempt(setting: Setting, started: float) -> bool:
        data = export(setting)
        x = calibration.validation if calibration.validation is not None else calibration.samples
        agreement, cosine, passed, within_noise = judge(data, x)
        attempts.append(Attempt(setting.name, setting.calibration, setting.float_layers, len(data), agreement,
                                cosine, passed, setting.equalized, setting.per_channel, setting.rounding,
                                within_noise, round(time.perf_counter() - started, 2)))
        artifacts.append(data)
        settings.append(setting)
        return passed

    passed = attempt(first, time.perf_counter())
    can_repair = options.repair and calibration.validation is not None
    diagnosis_started = time.perf_counter()
    diagnosis = diagnose(first) if (options.explain or not passed) else None
    diagnosis_seconds = time.perf_counter() - diagnosis_started if diagnosis is not None else 0.0
    best, equalized = first, None
    polishing = passed and _short_of(attempts[0], options.aim)  # passed, under the aim: the best attempt is kept
    repair_started, repairing = time.perf_counter(), (not passed or polishing) and can_repair
    if repairing:
        for step in _steps(first, calibration, target, per_channel, options, equalization, rounding):
            base = _base(settings, attempts)
            started = time.perf_counter()
            setting = step(base)
            if setting is not None and attempt(setting, started) and not (polishing and _short_of(attempts[-1],
                                                                                                  options.aim)):
                best, passed = setting, True
                break
        if equalization is not None and any(s.equalized for s in settings):
            equalized = equalization()
        if not passed and options.max_float_layers:
            # layers are kept in float on top of the attempt that agreed best, when one is bad alone (above the
            # alarm): with none, the error is spread over many layers, and one or two in float cannot fix it
            if diagnosis is not None and diagnosis.starts_at is None:
                note = (f"no layer is above {RELATIVE_ERROR_ALARM:.0%} error alone: layers in float not tried (the "
                        f"error is spread over the layers)")
            base = _base(settings, attempts)
            ranking = diagnosis if note or base is first else diagnose(base)
            for count in range(1, options.max_float_layers + 1) if not note else ():
                chosen = tuple(row.layer for row in ranking.worst(count))
                setting = replace(base, name=f"{count} layer{'s' * (count > 1)} in float", float_layers=chosen)
                if attempt(setting, time.perf_counter()):
                    best, passed, diagnosis = setting, True, ranking
                    break
    chosen = len(attempts) - 1 if passed else None
    if polishing and repairing:
        chosen = max((i for i, a in enumerate(attempts) if a.passed), key=lambda i: _score(attempts[i]))
        best = settings[chosen]
        note = (f"as requested passed with {_agreement_text(attempts[0])}, under the repair's aim of "
                f"{options.aim:.0%}: " + (f"{best.name} agrees best: chosen" if chosen else
                                          "no step agreed better: as requested kept"))
    elif not passed and attempts[0].within_noise:
        # within the noise counts when the requested settings are: one measurement. A repair attempt is the best of
        # several on the same images, its shortfall flattered by the choice (module doc), so alone it cannot earn it
        chosen = max((i for i, a in enumerate(attempts) if a.within_noise), key=lambda i: _score(attempts[i]))
        best, passed = settings[chosen], True
    elif not passed and any(a.within_noise for a in attempts[1:]):
        picked = max(attempts[1:], key=_score)
        note = "; ".join(filter(None, [note, (
            f"{picked.name} is under the bar by less than the validation images can show, but as the best of "
            f"{len(attempts)} attempts on them (and as requested is not): not chosen")]))
    floats = _float_layers(best, diagnosis, attempts, artifacts) if passed else ()
    shipped = best if passed else first
    report = QuantizationReport(tuple(attempts), chosen, floats, diagnosis, equalized,
                                rounding(shipped) if rounding is not None and shipped.rounding != NEAREST else None,
                                validated=calibration.validation is not None, note=note,
                                repair_seconds=time.perf_counter() - repair_started if repairing else 0.0,
                                diagnosis_seconds=diagnosis_seconds)
    return artifacts[chosen if passed else 0], report


def _base(settings: list[Setting], attempts: list[Attempt]) -> Setting:
    """The setting that agreed best so far (the first of equals): what the next step builds on."""
    return max(zip(settings, attempts), key=lambda pair: _score(pair[1]))[0]


def _steps(first: Setting, calibration: Calibration, target, per_channel: bool, options: QuantizationOptions,
           equalization, rounding):
    """The repair steps, in order: each a function of the base setting giving the setting to try (None: skip)."""
    if options.equalize and equalization is not None:
        def equalize_step(base):
            found = equalization()
            return replace(base, name="cross-layer equalization", equalized=True) if found and found["layers"] \
                else None

        yield equalize_step
    if options.round_weights and rounding is not None:
        for mode, name in ((ROUNDED, "weight rounding (GPTQ)"), (ROUNDED_BIAS, "weight rounding + bias correction")):
            def round_step(base, mode=mode, name=name):
                if not base.per_channel or rounding(replace(base, rounding=mode)) is None:
                    return None
                return replace(base, name=name, rounding=mode)

            yield round_step
    for setting in _calibration_settings(target, calibration, per_channel, options):
        yield lambda base, setting=setting: replace(setting, equalized=base.equalized,
                                                    rounding=base.rounding if setting.per_channel else NEAREST)
    yield lambda base: replace(base, name="per-tensor weights" if base.per_channel else "per-channel weights",
                               per_channel=not base.per_channel, rounding=NEAREST)


def _calibration_settings(target, calibration: Calibration, per_channel: bool, options: QuantizationOptions):
    pool = calibration.pool if calibration.pool is not None else calibration.samples
    count = min(options.calibration_samples, len(pool))
    samples = pool[np.random.default_rng(0).permutation(len(pool))[:count]]
    text = f"{count} shuffled samples"
    yield Setting(f"calibration on {text}" + ("" if per_channel else ", per-channel"), samples, text, True)
    for method in target.calibration_methods[1:]:  # the first is minmax, as above
        yield Setting(f"{method} calibration on {text}", samples, f"{text}, {method}", True, method)


def _short_of(attempt: Attempt, aim: float) -> bool:
    """The attempt agrees with the Keras model on less than `aim` of the images (top-1 only: no aim for cosine)."""
    return attempt.agreement is not None and attempt.agreement < aim


def _score(attempt: Attempt) -> float:
    return attempt.agreement if attempt.agreement is not None else attempt.cosine


def _float_layers(best: Setting, diagnosis: Diagnosis | None, attempts, artifacts) -> tuple[FloatLayer, ...]:
    if not best.float_layers:
        return ()
    rows = {row.layer: row for row in diagnosis.layers}
    # the cost: this artifact vs the same calibration with every layer quantized (the previous float-free attempt)
    reference = next(a for a in reversed(attempts) if not a.float_layers and a.calibration == best.calibration
                     and a.equalized == best.equalized and a.rounding == best.rounding
                     and a.per_channel == best.per_channel)
    extra = attempts[-1].bytes - reference.bytes
    share = extra // len(best.float_layers)
    return tuple(FloatLayer(name, rows[name].op, f"relative int8 error {rows[name].severity:.0%} (rank "
                                                 f"{i + 1} of {len(rows)} layers)", share)
                 for i, name in enumerate(best.float_layers))


def keras_layers(name: str, model, index: dict | None = None) -> tuple[str, ...]:
    """The Keras layers (leaf paths) that a converter's op name mentions ("model_1/block_1_BN_1/batchnorm/add_1;
    model_1/block_1_conv_1/convolution" for TFLite's fused ops, "model/conv/BiasAdd" for tf2onnx's nodes): in each
    ';'-separated part, the first segment after the model's own name that names a layer; the layer with weights
    first, then the others in the order named. A model traced more than once has every scope suffixed (`model_1`,
    `conv_1` for the layer `conv`, `conv_1_2` for `conv_1`): when the model's own segment carries a suffix, every
    segment's last `_N` is taken off before matching, else none is. index: `_layer_index(model)`, when the caller
    names many ops of one model."""
    import re

    layers = _layer_index(model) if index is None else index
    root = re.compile(re.escape(model.name) + r"(_\d+)?")
    found = []
    for part in name.split(";"):
        segments = part.split("/")
        start = next((i for i, segment in enumerate(segments) if root.fullmatch(segment)), None)
        suffixed = start is not None and segments[start] != model.name
        for segment in segments[0 if start is None else start + 1:]:
            hit = layers.get(re.sub(r"_\d+$", "", segment) if suffixed else segment)
            if hit is None and start is None:  # no model segment to tell: the name as it is, then unsuffixed
                hit = layers.get(re.sub(r"_\d+$", "", segment))
            if hit is not None:
                if hit not in found:
                    found.append(hit)
                break
    output = re.fullmatch(r"(?:Stateful)?PartitionedCall(?:_\d+)?:(\d+)", name)
    if not found and output and int(output.group(1)) < len(model.outputs):
        # a model output: TFLite names it after the function's outputs, not after the layer that computes it
        hit = layers.get(producer_name(model.outputs[int(output.group(1))]))
        found = [hit] if hit is not None else []
    weighted = [path for path, kind in found if kind in WEIGHTED]
    return tuple(weighted + [path for path, kind in found if path not in weighted])


def _layer_index(model) -> dict:
    """Each leaf layer's name -> (its path, its class name); the first of a name wins."""
    layers = {}
    for path, layer in leaf_layers(model):
        layers.setdefault(path.rsplit("/", 1)[-1], (path, type(layer).__name__))
    return layers


def _named(diagnosis: Diagnosis, model) -> Diagnosis:
    """`diagnosis` with each row's Keras layers."""
    index = _layer_index(model)
    return replace(diagnosis, layers=tuple(replace(row, keras=keras_layers(row.layer, model, index))
                                           for row in diagnosis.layers))


# --- TFLite: QuantizationDebugger ---------------------------------------------------------------------------------


def tflite_converter(model, setting: Setting, io_type: str = "float32", forms=()):
    """The TFLite converter for `setting`; float ops are allowed when some layers stay in float. forms: separable
    layers traced in another equivalent form (forms.py)."""
    import tensorflow as tf

    with captured_output():
        frozen = frozen_function(model, forms)
    converter = make_converter(frozen, setting.samples, TFLiteOptions(quantize="int8", io_type=io_type,
                                                                  per_channel=setting.per_channel))
    if setting.float_layers:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter


def tflite_int8(model, setting: Setting, io_type: str = "float32", forms=()) -> bytes:
    """The int8 flatbuffer for `setting`, its float layers left out of quantization by the debugger's denylist."""
    if not setting.float_layers:
        return export_tflite(model, representative_data=setting.samples, quantize="int8", io_type=io_type,
                             per_channel=setting.per_channel, forms=tuple(forms))
    debugger = _tflite_debugger(model, setting, io_type, forms=forms, denylisted_nodes=list(setting.float_layers))

    with captured_output():
        return debugger.get_nondebug_quantized_model()


def _tflite_debugger(model, setting: Setting, io_type: str, keep=None, forms=(), **debug_options):
    import tensorflow as tf

    samples = np.asarray(setting.samples[:DIAGNOSIS_SAMPLES], np.float32)
    compare = {"float_std": lambda f, q, s, z: float(np.std(f, dtype=np.float64)),  # float32 squares overflow
               "float_min": lambda f, q, s, z: float(np.min(f)), "float_max": lambda f, q, s, z: float(np.max(f))}
    if keep is not None:
        compare["kept"] = keep
    options = tf.lite.experimental.QuantizationDebugOptions(layer_direct_compare_metrics=compare, **debug_options)
    with captured_output():
        return tf.lite.experimental.QuantizationDebugger(
            converter=tflite_converter(model, setting, io_type, forms),
            debug_dataset=lambda: ([samples[i:i + 1]] for i in range(len(samples))), debug_options=options)


def diagnose_tflite(model, setting: Setting, io_type: str = "float32", forms=(), artifact: bytes | None = None
                    ) -> Diagnosis:
    """Per quantized op of the TFLite model: its local output error on the calibration images. artifact: `setting`'s
    int8 flatbuffer when already made (the accumulated errors run it instead of converting again)."""
    import csv
    import io


    outputs = []  # (float, dequantized) of every op on every sample, in the debugger's order

    def keep(f, q, s, z):
        outputs.append((np.array(f, np.float32), ((q.astype(np.float32) - z) * s)))
        return 0.0

    debugger = _tflite_debugger(model, setting, io_type, keep=keep, forms=forms)
    with captured_output():
        debugger.run()
    per_layer = len(debugger.layer_statistics)
    floats = [np.concatenate([f for f, _ in outputs[k::per_layer]]) for k in range(per_layer)]
    # an op whose float twin the debugger did not keep hands over uninitialised memory (NaN among values up to 1e37:
    # the zoo's rescaling CNN's tiled depthwise step): no channel error for it (its row is judged by its range below)
    channel_errors = [_channel_error(floats[k], np.concatenate([d for _, d in outputs[k::per_layer]]), -1)
                      if np.isfinite(floats[k]).all() else None for k in range(per_layer)]
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    dump.seek(0)
    rows = []
    for index, row in enumerate(csv.DictReader(dump)):
        scale, rmse = float(row["scale"]), float(row["mean_squared_error"]) ** 0.5
        spread, low, high = float(row["float_std"]), float(row["float_min"]), float(row["float_max"])
        if not (np.isfinite(spread) and spread > 0 and max(abs(low), abs(high)) < 1e3 * 256 * scale):
            # the debugger did not keep the float twin's output (it happens for FULLY_CONNECTED): judge by the
            # quantized range instead (std of a uniform spread over 256 steps)
            spread, low, high = 256 * scale / 12 ** 0.5, None, None
        rows.append(LayerError(layer=row["tensor_name"], op=row["op_name"], order=int(row["tensor_idx"]),
                               rmse_over_scale=rmse / scale if scale else None, relative_error=rmse / spread,
                               min=low, max=high, scale=scale,
                               channel_relative_error=channel_errors[index] if low is not None else None))
    together = accumulated_tflite(model, setting, io_type, forms, artifact)
    rows = [replace(row, accumulated_relative_error=together.get(row.layer)) for row in rows]
    return _named(Diagnosis("tflite", "tf.lite.experimental.QuantizationDebugger",
                            min(len(setting.samples), DIAGNOSIS_SAMPLES), tuple(rows)), model)


def accumulated_tflite(model, setting: Setting, io_type: str = "float32", forms=(), artifact: bytes | None = None
                       ) -> dict[str, float]:
    """Per output tensor of `setting`'s int8 TFLite model (by name): its error against the tensor of that name in the
    float TFLite model, every earlier op's error included: the worse of RMSE / std over the whole tensor and its mean
    over channels (the last axis; channels that never vary count 0), as `LayerError.severity` ranks local errors;
    both models run on the first ACCUMULATED_SAMPLES calibration images with every tensor kept and no delegate.
    artifact: `setting`'s int8 flatbuffer when already made (else converted here)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    def opened(content: bytes):
        interpreter = Interpreter(model_content=content, experimental_preserve_all_tensors=True,
                                  experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        interpreter.allocate_tensors()
        return interpreter

    with captured_output():
        quantized = opened(artifact if artifact is not None else tflite_int8(model, setting, io_type, forms))
        floating = opened(export_tflite(model, quantize="none", forms=tuple(forms)))
    float_index = {detail["name"]: detail["index"] for detail in floating.get_tensor_details()}
    details = {detail["index"]: detail for detail in quantized.get_tensor_details()}
    ops = quantized._get_ops_details()
    # an int8 output dequantized for the caller is renamed ("PartitionedCall:01"): the float model's name is its
    # DEQUANTIZE's output's
    names = {index: details[index]["name"] for index in details}
    names.update({op["inputs"][0]: details[op["outputs"][0]]["name"] for op in ops if op["op_name"] == "DEQUANTIZE"})
    outputs = [index for op in ops if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE", "DELEGATE")
               for index in op["outputs"] if index >= 0 and names[index] in float_index]
    sums = {}  # per tensor, per channel (last axis): squared error, sum and squared sum of the float tensor
    for sample in np.asarray(setting.samples[:ACCUMULATED_SAMPLES], np.float32):
        for interpreter in (quantized, floating):
            entry = interpreter.get_input_details()[0]
            interpreter.set_tensor(entry["index"], tflite_spec(entry).quantize(sample[None]))
            interpreter.invoke()
        for index in outputs:
            detail = details[index]
            if np.dtype(detail["dtype"]).kind != "f" and len(detail["quantization_parameters"]["scales"]) != 1:
                continue  # not one scale: weights quantized per channel, or integers that are not activations
            reference = np.asarray(floating.get_tensor(float_index[names[index]]), np.float64)
            actual = tflite_spec(detail).dequantize(quantized.get_tensor(index)).astype(np.float64)
            if actual.shape != reference.shape or reference.ndim == 0:
                continue
            axes = tuple(range(reference.ndim - 1))
            found = np.stack([np.sum((actual - reference) ** 2, axis=axes), reference.sum(axis=axes),
                              np.sum(reference ** 2, axis=axes), np.full(reference.shape[-1],
                                                                         reference.size / reference.shape[-1])])
            sums[index] = found if index not in sums else sums[index] + found
    errors = {}
    for index, (squared, total, total_sq, count) in sums.items():
        whole_variance = total_sq.sum() / count.sum() - (total.sum() / count.sum()) ** 2
        if whole_variance <= 0:
            continue
        whole = np.sqrt(squared.sum() / count.sum() / whole_variance)
        variance = total_sq / count - (total / count) ** 2
        live = variance > whole_variance * 1e-12
        channels = np.where(live, np.sqrt(squared / count / np.where(live, variance, 1.0)), 0.0)
        errors[names[index]] = float(max(whole, channels.mean()))
    return errors


# --- ONNX: qdq_loss_debug ----------------------------------------------------------------------------------------


def onnx_int8(float_model: bytes, setting: Setting, input_name: str, layout: str = "nhwc", batch: int = 1) -> bytes:
    """Static QDQ int8 of the float ONNX model for `setting` (ONNX Runtime's quantizer, `nodes_to_exclude`),
    calibrated up to `batch` samples a run."""
    with temporary_folder("sepconv-int8-") as tmp:
        source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(float_model)
        with captured_output():
            quantize_static_qdq(source, target, _nchw(setting.samples, layout), input_name,
                                per_channel=setting.per_channel, method=setting.method,
                                nodes_to_exclude=setting.float_layers, batch=batch)
        return target.read_bytes()


def _nchw(samples: np.ndarray, layout: str) -> np.ndarray:
    samples = np.asarray(samples, np.float32)
    return np.transpose(samples, (0, 3, 1, 2)) if layout == "nchw" else samples


def diagnose_onnx(float_model: bytes, setting: Setting, input_name: str, layout: str = "nhwc",
                  model=None, qdq: bytes | None = None) -> Diagnosis:
    """Per activation of the QDQ model (`qdq`, the setting's artifact already made, or quantized here): its QDQ error
    (local) and its error against the float model (accumulated), named by the node that produces it (the name
    `nodes_to_exclude` takes) and, given the Keras `model`, by its layers."""
    import onnx
    from onnxruntime.quantization import qdq_loss_debug as debug

    samples = _nchw(setting.samples[:DIAGNOSIS_SAMPLES], layout)
    qdq = qdq if qdq is not None else onnx_int8(float_model, setting, input_name, layout)
    with temporary_folder("sepconv-qdq-debug-") as tmp, captured_output():
        paths = {name: Path(tmp) / f"{name}.onnx" for name in ("float", "qdq", "float_aug", "qdq_aug")}
        paths["float"].write_bytes(float_model)
        paths["qdq"].write_bytes(qdq)
        debug.modify_model_output_intermediate_tensors(str(paths["float"]), str(paths["float_aug"]))
        debug.modify_model_output_intermediate_tensors(str(paths["qdq"]), str(paths["qdq_aug"]))
        float_acts = debug.collect_activations(str(paths["float_aug"]), reader(samples, input_name))
        qdq_acts = debug.collect_activations(str(paths["qdq_aug"]), reader(samples, input_name))
        matched = debug.create_activation_matching(qdq_acts, float_acts)
        graph = onnx.load(str(paths["qdq"])).graph
    producers = {out: (i, node) for i, node in enumerate(graph.node) for out in node.output}
    scales = _qdq_scales(graph)
    rows = []
    for tensor, acts in matched.items():
        if "float" not in acts:
            continue
        found = _real_producer(tensor, producers)
        if found is None:
            continue
        order, node = found
        scale = scales.get(tensor) or scales.get(node.output[0])
        reference = np.concatenate([np.ravel(a) for a in acts["float"]])
        # ORT fuses a Relu into the QDQ pair of the op before it: the pair's input is then the op's output before
        # the Relu. Clipped to the float tensor's range, that input differs from the output by quantization only.
        pre = [np.clip(a, reference.min(), reference.max()) for a in acts["pre_qdq"]]
        local = _rmse(pre, acts["post_qdq"])
        total = _rmse(acts["float"], acts["post_qdq"])
        spread = float(np.std(reference)) or 1.0
        rows.append(LayerError(layer=node.name, op=node.op_type, order=order,
                               rmse_over_scale=local / scale if scale else None, relative_error=local / spread,
                               min=float(reference.min()), max=float(reference.max()), scale=scale,
                               accumulated_relative_error=total / spread,
                               channel_relative_error=_channel_error(np.stack(acts["float"]),
                                                                     np.stack(acts["post_qdq"]), 1)))
    diagnosis = Diagnosis("onnx", "onnxruntime.quantization.qdq_loss_debug", len(samples), tuple(rows))
    return diagnosis if model is None else _named(diagnosis, model)


def _real_producer(tensor: str, producers: dict):
    """(position, node) of the op computing `tensor` in the QDQ graph, behind its Quantize/DequantizeLinear pair:
    its name is what `nodes_to_exclude` takes (ORT's pre-processing may have fused ops, e.g. MatMul + Add -> Gemm)."""
    found = producers.get(tensor)
    while found is not None and found[1].op_type in ("QuantizeLinear", "DequantizeLinear"):
        found = producers.get(found[1].input[0])
    return found


def _channel_error(reference: np.ndarray, actual: np.ndarray, axis: int) -> float:
    """Mean over channels (`axis`) of RMSE / std of the channel; channels that never vary (dead) count as 0."""
    reference = np.asarray(reference, np.float64)
    actual = np.asarray(actual, np.float64).reshape(reference.shape)
    if reference.ndim < 2:
        return 0.0
    reference, actual = np.moveaxis(reference, axis, 0), np.moveaxis(actual, axis, 0)
    reference, actual = reference.reshape(len(reference), -1), actual.reshape(len(actual), -1)
    rmse = np.sqrt(np.mean((reference - actual) ** 2, axis=1))
    spread = np.std(reference, axis=1)
    return float(np.mean(np.where(spread > 0, rmse / np.maximum(spread, 1e-30), 0.0)))


def _rmse(a, b) -> float:
    a = np.concatenate([np.ravel(x) for x in a]).astype(np.float64)
    b = np.concatenate([np.ravel(x) for x in b]).astype(np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)))


def _qdq_scales(graph) -> dict[str, float]:
    """The int8 scale of each activation, from the QuantizeLinear node that reads it."""
    from onnx import numpy_helper

    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return {node.input[0]: float(np.ravel(constants[node.input[1]])[0]) for node in graph.node
            if node.op_type == "QuantizeLinear" and node.input[1] in constants
            and np.size(constants[node.input[1]]) == 1}


# --- the pipeline's entry point ------------------------------------------------------------------------------------


def quantize_verified(model, target, calibration: Calibration, *, tolerance, export=None,
                      options: QuantizationOptions = QuantizationOptions(),
                      variants: RepairVariants | None = None) -> tuple[bytes, QuantizationReport]:
    """The int8 artifact of `model` for `target` (a registered targets.Target with int8 among its modes, e.g.
    target_named('tflite')) with its export options `export` (TFLiteOptions / OnnxOptions; None: their defaults):
    export_int8 with the target's exporter and debugger. A setting with `equalized` quantizes the model's cross-layer
    equalized twin, one with `rounding` a copy with rounded weights (each made once, on the calibration samples;
    `variants`: the RepairVariants an earlier format's call made, so that a run writing several formats makes each
    once; one that does not fit this call is not used). The caller looks the target up: the registry builds on this
    module, not the reverse."""
    tools = _Int8Tools(model, target, calibration, tolerance, export, options.asymmetric_rounding, variants)
    artifact, report = export_int8(model, target, calibration, export=tools.exporter, judge=tools.judge,
                                   diagnose=tools.diagnose, per_channel=tools.export.per_channel, options=options,
                                   equalization=tools.variants.report, rounding=tools.variants.rounding)
    if not report.passed and isinstance(calibration.validation, np.ndarray):
        stability = keras_stability(model, calibration.validation, calibration.samples, expected=tools.expected)
        if stability is not None:
            report = replace(report, keras_stability=stability, note="; ".join(filter(None, [
                report.note, unstable_text(stability, tolerance.min_agreement)])))
    return artifact, report


def agreement_as_requested(model, target, calibration: Calibration, *, tolerance) -> tuple[float, bool]:
    """(top-1 agreement, passed) of `model`'s int8 artifact for `target` as requested (calibrated on
    `calibration.samples`, no repair, no diagnosis) on `calibration.validation`, passed as export_int8 judges its
    first attempt (within the sampling noise of the images): a probe of whether int8 will hold (recovery's pass under
    int8 noise asks it)."""
    tools = _Int8Tools(model, target, calibration, tolerance)
    agreement, _, _, passed = tools.judge(tools.exporter(_as_requested(calibration, tools.export.per_channel)),
                                          calibration.validation)
    return agreement, passed


class _Int8Tools:
    """What exporting `model` to int8 for `target` takes (export options `export`, None: the target's defaults):
    the model and its repair variants, the exporter and debugger, and the judge of an artifact against the Keras
    model's outputs (predicted once per set of images: `expected`)."""

    def __init__(self, model, target, calibration: Calibration, tolerance, export=None, asymmetric: bool = True,
                 variants: RepairVariants | None = None):
        self.export = replace(export or target.exporter_class(), quantize="int8")
        fits = variants is not None and variants.fits(model, calibration.samples, self.export.per_channel, asymmetric)
        self.variants = variants if fits else RepairVariants(model, calibration.samples, self.export.per_channel,
                                                              asymmetric)
        self.exporter, self.diagnose = target.int8_tools(model, self.variants.model, self.export)
        self.expected = _KerasOutputs(model)
        self.judge = _judge(self.expected, target, tolerance, target.layout(self.export))


def _as_requested(calibration: Calibration, per_channel: bool) -> Setting:
    """The first attempt: the export as asked for, calibrated on the calibration samples."""
    return Setting("as requested", calibration.samples, f"{len(calibration.samples)} samples", per_channel)


def unstable_text(stability: float | None, min_agreement: float, lowering: str = "") -> str:
    """What a Keras model whose own top-1 moves under int8-sized noise (keras_stability) on more images than the bar
    allows means for its int8; "" when it does not (steadier than the bar, or not measured). lowering: what a lower
    --min-agreement would do, when the caller knows (else the general advice)."""
    if stability is None or stability >= min_agreement:
        return ""
    return (f"the Keras model itself keeps its top-1 on only {stability:.2%} of the validation images under input "
            f"noise of half an int8 step: no int8 model of it can be expected to agree more (make it robust by "
            f"training, or " + (lowering or "lower --min-agreement and hold int8 to --max-accuracy-drop") + ")")


class _KerasOutputs:
    """The Keras model's outputs on an array of images, predicted once for the last array asked for: every int8
    attempt is judged on the same validation images, and keras_stability starts from the same outputs."""

    def __init__(self, model):
        self.model, self._last = model, None

    def __call__(self, x) -> list[np.ndarray]:
        if self._last is None or self._last[0] is not x:
            self._last = (x, predict_keras(self.model, x, batch_size_for(self.model)))
        return self._last[1]


def keras_stability(model, x: np.ndarray, samples: np.ndarray, seed: int = 0,
                    expected: _KerasOutputs | None = None) -> float | None:
    """The share of the images `x` whose top-1 class the Keras model keeps under uniform noise of half an int8 step of
    its input (the calibration `samples`' range / 255 / 2): an agreement bar above it asks of int8 what the float
    model cannot give itself (measured on the zoo's nested MobileNetV2: 96.67%, docs/benchmarks.md). None when it
    does not apply: a model whose first output is not a classifier, several inputs, or integer images (their int8
    input is exact). expected: the model's outputs on x, when already predicted."""
    if len(model.inputs) != 1 or np.asarray(x).dtype.kind != "f" or not len(x):
        return None
    reference = (expected or _KerasOutputs(model))(x)[0]
    x, samples = np.asarray(x), np.asarray(samples)
    if reference.ndim != 2 or reference.shape[-1] < 2:
        return None
    half = float(np.ptp(samples)) / 255 / 2
    noisy = (x + np.random.default_rng(seed).uniform(-half, half, x.shape)).astype(x.dtype)
    moved = predict_keras(model, noisy, batch_size_for(model))[0]
    return hit_rate(top1(moved), top1(reference))


class RepairVariants:
    """The model and the copies the repair quantizes instead, each made on first request on the first attempt's
    calibration samples: cross-layer equalized (equalization.py), weights rounded (rounding.py), or both (rounded
    after equalization). The rounded variants share one copy of the model, which holds the weights of the variant
    asked for last (each variant's are kept): one clone instead of one per variant, and the trace of the copy is
    reused by each export (trace.frozen_function: only the freezing is redone when the weights change). A variant's
    model is used before the next one is asked for (export_int8 exports or diagnoses one setting at a time). A run
    that writes several formats passes one to each format's quantize_verified (staging.ExportJob keeps them), so
    each variant is made once per run, not once per format."""

    def __init__(self, model, samples: np.ndarray, per_channel: bool, asymmetric: bool = True):
        self._model, self._samples, self._per_channel = model, np.asarray(samples, np.float32), per_channel
        self._asymmetric = asymmetric
        self._equalized = None
        self._rounded = {}  # (equalized, rounding) -> (its weights, RoundingReport)
        self._copy, self._holding = None, None  # the rounded variants' model, and whose weights it holds

    def fits(self, model, samples: np.ndarray, per_channel: bool, asymmetric: bool) -> bool:
        """The variants are those of this model, calibration samples, weight granularity and rounding target."""
        samples = np.asarray(samples, np.float32)
        return (model is self._model and per_channel == self._per_channel and asymmetric == self._asymmetric
                and samples.shape == self._samples.shape and np.array_equal(samples, self._samples))

    def report(self) -> dict | None:
        """The equalization's report, or None when the model has nothing to equalize (no separable layer, no
        BatchNorm -> ReLU -> convolution chain)."""
        import keras

        if not any(isinstance(layer, keras.layers.SeparableConv2D) for _, layer in leaf_layers(self._model)) \
                and not activation_pairs(self._model):
            return None
        if self._equalized is None:
            # the ranges of the samples the converter calibrates on: those set its per-tensor int8 ranges
            self._equalized = equalize(self._model, self._samples, per_channel=self._per_channel)
        return self._equalized[1].to_dict()

    def rounding(self, setting: Setting) -> dict | None:
        """The RoundingReport of `setting`'s rounded weights; None when no layer has weights to round."""
        report = self._round(setting)
        return report.to_dict() if report.layers else None

    def _round(self, setting: Setting):
        """The RoundingReport of `setting`'s variant, rounded on first request (the copy then holds its weights)."""
        import keras

        key = (setting.equalized, setting.rounding)
        if key not in self._rounded:
            source = self.model(replace(setting, rounding=NEAREST))
            if self._copy is None:
                self._copy = keras.models.clone_model(self._model)
                keep_frozen(self._copy, 4)  # (equalized or not) x (GPTQ, + bias): a later step may switch back
            copy, report = round_weights(source, self._samples, bias_correction=setting.rounding == ROUNDED_BIAS,
                                         asymmetric=self._asymmetric, into=self._copy)
            self._rounded[key], self._holding = (copy.get_weights(), report), key
        return self._rounded[key][1]

    def model(self, setting: Setting):
        if setting.rounding != NEAREST:
            self._round(setting)
            key = (setting.equalized, setting.rounding)
            if self._holding != key:
                self._copy.set_weights(self._rounded[key][0])
                self._holding = key
            return self._copy
        if not setting.equalized:
            return self._model
        self.report()
        return self._equalized[0]


def _judge(expected: _KerasOutputs, target, tolerance, layout: str):
    """(agreement, cosine, passed as measured, passed within the noise) of an artifact against the Keras model on
    images x, as verification judges it (Tolerance.measured, and `tolerance` itself); the model's own outputs on x are
    predicted once for all the attempts (`expected`)."""
    def judge(data: bytes, x: np.ndarray):
        with temporary_folder("sepconv-judge-") as tmp:
            path = Path(tmp) / f"attempt{target.extension}"
            path.write_bytes(data)
            runtime = open_runtime(str(path))
            actual = run_artifact(runtime, x, layout=layout, batch_size=batch_size_for(expected.model))
            names = [spec.name for spec in runtime.outputs]
        measured, within = (compare_outputs(expected(x), actual, names, x, None, quantized=True, quantize="int8",
                                            tolerance=level, inputs="validation images", original=None,
                                            artifact="int8 attempt") for level in (tolerance.measured, tolerance))
        first = measured.outputs[0]
        return first.agreement, first.cosine, measured.passed, within.passed

    return judge
