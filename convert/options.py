"""`ConvertOptions` (everything `convert_model` can be told) and the run's plan: the effective choices and which of
them were defaults, the checks of the flags taken together, the recovery and latency options they make, and the
plan's line for the terminal. No TensorFlow: the CLI checks a run's options before it starts its worker."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sepconv.convert.data import DataOptions
from sepconv.convert.errors import InvalidOptionError
from sepconv.convert.export.quantization import QuantizationOptions
from sepconv.convert.export.targets import (
    check_target_options,
    given_options,
    quantize_modes,
    registered_targets,
    target_for,
)
from sepconv.convert.export.tflite import NEEDS_DATA
from sepconv.convert.export.verification import Tolerance
from sepconv.convert.recovery.budget import BudgetOptions
from sepconv.convert.recovery.finetuning import FinetuneOptions
from sepconv.convert.recovery.latency_table import LatencyOptions, for_export
from sepconv.convert.recovery.steps import RecoveryOptions
from sepconv.convert.separation.policy import DEPTHWISE, SPATIAL, SeparationOptions

QUANTIZE_CHOICES = ("auto",) + quantize_modes()
DEFAULT_MAX_DROP = 1.0  # points of accuracy the budget mode may lose, the default with data
DEFAULT_EPOCHS = 10
AUTO_FORM = "auto"  # both separable forms, chosen per layer by the accuracy budget (and latency); depthwise without it
FORM_CHOICES = (DEPTHWISE, SPATIAL, AUTO_FORM)
CHECKPOINTS_SUFFIX = ".checkpoints"


@dataclass(frozen=True)
class Plan:
    """The effective choices of a run (ConvertOptions.plan()) and which of them were defaults."""

    max_accuracy_drop: float | None
    refine: bool
    recalibrate_bn: bool
    epochs: int
    quantize: str
    defaults: tuple[str, ...] = ()
    latency: bool = False  # speed measured where the model will run: each layer's K (with the budget) and the artifact

    def to_dict(self) -> dict:
        return {**asdict(self), "defaults": list(self.defaults)}


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
    targets: the outputs' options per target (targets.py), at most one each, e.g.
    (TFLiteOutputOptions(io_type='int8'), OnnxOutputOptions(opset=13, layout='nchw')); a target not named takes its
    defaults; `quantize` sets every output's mode.
    quantization: int8 diagnosis and repair (quantization.py): explain, repair, max_float_layers.
    latency: latency_table.LatencyOptions: where and how latency is measured (this machine or a device, target latency
    / speed-up, threads, XNNPACK); its export options follow the first .tflite / .onnx output. None: the defaults
    (this machine, 1 thread, no target). measure_latency: measure it (None: on when separating): with the accuracy
    budget, each layer's K chosen from the measured per-layer latency (latency_choice.py); and every .tflite / .onnx
    artifact timed against the original converted the same way, the original shipped instead of a slower one unless
    rank / energy forced the separation (export/speed.py). False: K from accuracy and parameters alone, nothing
    timed.
    form: 'depthwise' (SeparableConv2D), 'spatial' (a kh x 1 then a 1 x kw Conv2D, rank r) or 'auto' (with the
    accuracy budget, each layer's form and rank chosen among both). None: depthwise (docs/benchmarks.md "Two separable
    forms" says why auto is not the default yet).
    budget_output: a model with several outputs: the output (its layer's name, or its index) the accuracy budget is
    on; None: every output (the worst drop).
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
    targets: tuple = ()
    tolerance: Tolerance = field(default_factory=Tolerance)
    quantization: QuantizationOptions = field(default_factory=QuantizationOptions)
    overwrite: bool = False
    safe_mode: bool = True
    custom_objects: dict | None = None
    max_unpacked_bytes: int | None = None
    latency: object | None = None
    measure_latency: bool | None = None
    form: str | None = None
    budget_output: str | None = None

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
        check_target_options(self.targets)
        if self.max_unpacked_bytes is not None and (not isinstance(self.max_unpacked_bytes, int)
                                                    or self.max_unpacked_bytes < 1):
            raise InvalidOptionError(f"Unrecognized max_unpacked_bytes={self.max_unpacked_bytes!r}. Use a whole "
                                     f"number >= 1")
        if self.latency is not None:
            if not isinstance(self.latency, LatencyOptions):
                raise InvalidOptionError(f"Unrecognized latency={self.latency!r}. Use LatencyOptions(...) from "
                                         f"sepconv.convert.recovery.latency_table, or None")
        if self.max_accuracy_drop is not None:
            BudgetOptions(max_drop=self.max_accuracy_drop)
        if self.measure_latency is False and self.latency is not None:
            raise InvalidOptionError("latency options (a target, where or how to measure) were given with "
                                     "measure_latency=False (--no-latency); drop one or the other")
        if self.budget_output is not None and (not isinstance(self.budget_output, str) or not self.budget_output):
            raise InvalidOptionError(f"Unrecognized budget_output={self.budget_output!r}. Use the name of a model "
                                     f"output (its layer's name) or its index")
        if self.form is not None and self.form not in FORM_CHOICES:
            raise InvalidOptionError(f"Unrecognized form={self.form!r}. Use one of {list(FORM_CHOICES)}")
        if self.form == AUTO_FORM and self.forced_separation:
            raise InvalidOptionError("form='auto' (--form auto) chooses each layer's form with the accuracy budget; "
                                     "with a fixed rank / energy give form 'depthwise' or 'spatial'")
        if self.form in (DEPTHWISE, SPATIAL) and self.separation.form != self.form:
            object.__setattr__(self, "separation", replace(self.separation, form=self.form))

    def plan(self, timed: bool = True) -> Plan:
        """The effective choices, with a note of which were defaults (printed by the CLI, kept in the manifest).
        timed: some output is of a format a runtime times (.tflite, .onnx); without one no latency is measured."""
        data = self.data is not None
        fixed = any(v is not None for v in (self.separation.rank, self.separation.energy, self.separation.ranks))
        budget = self.max_accuracy_drop
        if budget is None and data and self.separate and not fixed:
            budget = DEFAULT_MAX_DROP
        epochs = self.epochs if self.epochs is not None else (DEFAULT_EPOCHS if data and self.separate else 0)
        defaults = [name for name, given in (("max_accuracy_drop", self.max_accuracy_drop), ("refine", self.refine),
                                             ("recalibrate_bn", self.recalibrate_bn), ("epochs", self.epochs))
                    if given is None and not (name == "max_accuracy_drop" and budget is None)]
        defaults += ["quantize"] if self.quantize == "auto" else []
        latency = self.separate and timed and (self.measure_latency is not False)
        defaults += ["latency"] if latency and self.measure_latency is None and self.latency is None else []
        return Plan(max_accuracy_drop=budget, refine=_default(self.refine, data and self.separate),
                    recalibrate_bn=_default(self.recalibrate_bn, data and self.separate), epochs=epochs,
                    quantize=self.resolved_quantize(), defaults=tuple(defaults), latency=latency)

    @property
    def forced_separation(self) -> bool:
        """The user chose the separation (rank, energy or per-layer ranks): a slower artifact is shipped as asked."""
        return any(v is not None for v in (self.separation.rank, self.separation.energy, self.separation.ranks))

    def resolved_quantize(self) -> str:
        if self.quantize != "auto":
            return self.quantize
        return "int8" if self.data else "dynamic"

    def target_options(self, target):
        """The options of `target` (a targets.Target) for this run: those in `targets`, else its defaults."""
        return given_options(self.targets, target)

    def describe(self) -> dict:
        described = {}
        for key, value in asdict(self).items():
            if key != "targets":
                described[key] = value
                continue
            for target in registered_targets().values():  # flat, as the manifest has always listed them
                described.update(target.describe(self.target_options(target)))
        described.pop("custom_objects")
        described["separation"] = self.separation.describe()
        described["finetune"] = {key: value for key, value in asdict(self.finetune).items()
                                  if key not in ("epochs", "checkpoint_dir", "resume")}  # the run's own fields decide
        described["plan"] = self.plan().to_dict()
        return described


def _default(value, default: bool) -> bool:
    return default if value is None else bool(value)


def recovery_options(options: ConvertOptions, plan: Plan, targets: list[Path]):
    budget = plan.max_accuracy_drop
    if options.budget_output is not None and (budget is None or not options.separate):
        raise InvalidOptionError("--budget-output names the output the accuracy budget is on: it needs the budget "
                                 "(--data, or --max-accuracy-drop), and separation")
    folder = options.checkpoint_dir or str(targets[0].with_name(targets[0].name + CHECKPOINTS_SUFFIX))
    return RecoveryOptions(separation=options.separation, refine=plan.refine, recalibrate_bn=plan.recalibrate_bn,
                           epochs=plan.epochs, finetune=options.finetune,
                           int8=options.tolerance if plan.quantize == "int8" else None,
                           budget=None if budget is None else BudgetOptions(max_drop=budget, refine=plan.refine,
                                                                            forms=budget_forms(options.form)),
                           checkpoint_dir=folder, resume=options.resume,
                           latency=latency_options(options, plan, targets) if budget is not None else None)


def budget_forms(form: str | None) -> tuple[str, ...]:
    """The separable forms the accuracy budget measures and chooses among for `--form` (None: depthwise)."""
    return (DEPTHWISE, SPATIAL) if form == AUTO_FORM else (form or DEPTHWISE,)


def latency_options(options: ConvertOptions, plan: Plan, targets: list[Path]):
    """How the run measures latency (options.latency, or the defaults: this machine, 1 thread) with the export options
    of the first .tflite / .onnx output (what its table times); None when the plan measures none or no output is of
    a format a runtime times (then nothing can be measured: said by check_modes when it was asked for)."""
    units = [target_for(t) for t in targets]
    if not plan.latency or not any(unit.runtime for unit in units):
        return None
    return for_export(options.latency or LatencyOptions(), [(unit, options.target_options(unit)) for unit in units],
                      plan.quantize)


def quantize_reason(options: ConvertOptions, plan: Plan) -> str:
    if options.quantize != "auto":
        return f"quantize={plan.quantize}"
    return f"quantize=auto -> {plan.quantize} ({'data given' if options.data else 'no data given'})"


def plan_line(plan: Plan, options: ConvertOptions) -> str:
    """One line: what will happen, which choices were defaults, and the hint when there is no data."""
    if not options.separate:
        steps = ["no separation"]
    elif plan.max_accuracy_drop is not None:
        forms = {DEPTHWISE: "depthwise form, ", SPATIAL: "spatial form, ", AUTO_FORM: "depthwise or spatial form and ",
                 None: ""}[options.form]
        steps = [f"{forms}rank per layer for --max-accuracy-drop {plan.max_accuracy_drop}"]
        if plan.latency:
            latency = options.latency or LatencyOptions()
            steps[0] += (f" and latency measured on {latency.where or 'this machine'}"
                         + (f" (target {latency.target.describe()})" if latency.target.given else ""))
        else:
            steps[0] += " (speed not measured: " + ("--no-latency)" if options.measure_latency is False
                                                     else "no .tflite / .onnx output)")
    else:
        steps = [f"separation {_policy_text(options.separation)}"]
    if options.separate:
        steps.append("artifacts timed against the original" if plan.latency else "artifacts not timed" + (
            "" if options.measure_latency is False else " (no .tflite / .onnx output)"))
    steps += ["refine" if plan.refine else "no refine",
              "BatchNorm recalibration" if plan.recalibrate_bn else "no BatchNorm recalibration",
              f"fine-tune up to {plan.epochs} epochs" if plan.epochs else "no fine-tuning",
              f"quantize {plan.quantize}"]
    line = ", ".join(steps)
    if plan.defaults:
        line += f" (defaults {'with' if options.data else 'without'} --data: {', '.join(plan.defaults)})"
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


def check_modes(targets: list[Path], plan: Plan, options: ConvertOptions) -> None:
    quantize = plan.quantize
    # (wanted, flag, what it does, whether it works on separated layers only)
    needs_data = [(plan.refine, "--refine", "refits separated layers on calibration images", True),
                  (plan.recalibrate_bn, "--recalibrate-bn", "re-estimates BatchNorm statistics on calibration "
                                                               "images", True),
                  (plan.epochs, "--epochs", "fine-tunes on your images", True),
                  (plan.max_accuracy_drop is not None, "--max-accuracy-drop", "measures accuracy on validation "
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
    if options.latency is not None and options.latency.target.given and (plan.max_accuracy_drop is None
                                                                         or not options.separate):
        raise InvalidOptionError("--target-latency / --target-speedup choose each layer's K with the accuracy "
                                 "budget; pass --data (and --max-accuracy-drop, not --rank / --energy / "
                                 "--no-separate)")
    if (options.latency is not None or options.measure_latency) and not options.separate:
        raise InvalidOptionError("--latency-on and its companions time the separated model against the original; "
                                 "they cannot be combined with --no-separate")
    if (options.latency is not None or options.measure_latency) and not any(target_for(t).runtime for t in targets):
        raise InvalidOptionError("latency is measured on a .tflite or .onnx artifact; name one among the outputs, or "
                                 "drop the latency options")
    if options.resume and not plan.epochs:
        raise InvalidOptionError("--resume continues an interrupted fine-tuning; it needs --epochs >= 1 and --data")
    if quantize in NEEDS_DATA and not options.data:
        raise InvalidOptionError(f"--quantize {quantize} calibrates activations on representative data; pass --data "
                                 f"(an .npz or a folder of images) or use --quantize dynamic")
    for path in targets:
        target = target_for(path)
        target.check(options.target_options(target), quantize, path)
