"""Separate and recover: the part of `convert_model` between loading and export.

plan (fixed policy, or per-layer K for an accuracy budget) -> separate -> refine (least squares) -> recalibrate
BatchNorm -> fine-tune -> score every stage on the held-out data -> check the budget.

Fine-tuning is resumable: its checkpoint folder holds `state.json` (the plan and the stages measured so far), Keras'
per-epoch backup and, once training ends, the fine-tuned weights; the pipeline removes the folder only after every
artifact is written. A run stopped by Ctrl-C or killed is continued with `resume=True`; a folder left by an earlier
run is never deleted silently.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from sepconv.convert.budget import BudgetOptions
from sepconv.convert.errors import BudgetError, CheckpointError, InterruptedRunError, InvalidOptionError
from sepconv.convert.finetuning import FinetuneOptions
from sepconv.convert.policy import SeparationOptions

STATE = "state.json"
FINETUNED = "finetuned.weights.h5"


@dataclass(frozen=True)
class RecoveryOptions:
    """What happens after separation. epochs=0: no fine-tuning; budget=None: the separation policy decides K."""

    refine: bool = False
    recalibrate_bn: bool = False
    epochs: int = 0
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    budget: BudgetOptions | None = None
    checkpoint_dir: str | None = None
    resume: bool = False

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise InvalidOptionError(f"Unrecognized epochs={self.epochs!r}. Use a whole number >= 0 (0: no "
                                     f"fine-tuning)")
        if self.epochs and not self.checkpoint_dir:
            raise InvalidOptionError("fine-tuning needs checkpoint_dir (its per-epoch checkpoints)")


@dataclass(frozen=True)
class Stage:
    name: str  # original, separated, refined, batchnorm recalibrated, fine-tuned
    accuracy: float | None  # top-1 on the held-out labels (None without labels)
    agreement: float  # top-1 agreement with the original
    params: int
    seconds: float  # spent on this stage


@dataclass(frozen=True)
class RecoveryReport:
    samples: int  # held-out samples every stage was scored on
    stages: tuple[Stage, ...]
    budget: dict | None  # the plan (sensitivity per layer and K), measured drop, whether it held
    refinement: dict | None
    batchnorm: list | None
    finetune: dict | None
    resumed: bool

    def to_dict(self) -> dict:
        return asdict(self)


Progress = Callable[[str, str], None]


def recover(original, train, calibration: np.ndarray | None, heldout, separation: SeparationOptions,
            options: RecoveryOptions, *, source_sha256: str = "", progress: Progress | None = None):
    """(separated model, SeparationReport, RecoveryReport): see the module doc. `train` and `heldout` are Datasets
    (x, y or None); `calibration` feeds refinement, BatchNorm statistics and the budget search's refinement."""
    from sepconv.convert.separation import separate_with

    say = progress or (lambda stage, message: None)
    folder = Path(options.checkpoint_dir) if options.epochs else None
    state = _open_state(folder, options, source_sha256, separation)
    scorer = _Scorer(original, heldout)
    stages = [scorer.stage("original", original, 0.0)]
    plan = state.get("plan")
    if options.budget is not None and plan is None:
        plan = _plan(original, heldout, calibration, options.budget, separation, say)
    if plan is not None:  # every measured layer gets its K; 0 (KEEP) leaves it as it is
        ranks = {layer["path"]: plan["ranks"].get(layer["path"], 0) for layer in plan["layers"]}
        separation = replace(separation, rank=None, energy=None, ranks=ranks, include=tuple(ranks))
    _save_state(folder, state, plan=plan, source_sha256=source_sha256)

    started = time.perf_counter()
    separated, report = separate_with(original, separation)
    stages.append(scorer.stage("separated", separated, time.perf_counter() - started))
    say("separate", _separation_line(report))
    refinement = batchnorm = tuned = None
    if options.refine and report.separated:
        refinement = _refine(original, separated, calibration, report, scorer, stages, say)
    if options.recalibrate_bn:
        batchnorm = _recalibrate(separated, calibration, scorer, stages, say)
    if options.epochs and report.separated:
        tuned = _finetune(original, separated, train, folder, options, state, scorer, stages, say)
    try:
        budget = _check_budget(plan, stages, scorer) if plan is not None else None
    except BudgetError:
        if folder is not None:  # a failed budget is final: resuming would only fail again
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return separated, report, RecoveryReport(
        samples=len(heldout), stages=tuple(stages), budget=budget,
        refinement=refinement.to_dict() if refinement else None,
        batchnorm=[asdict(b) for b in batchnorm] if batchnorm is not None else None, finetune=tuned,
        resumed=bool(options.resume))


def remove_checkpoints(options: RecoveryOptions) -> None:
    """Called once every artifact is written: the run is complete, its checkpoints are no longer needed."""
    if options.epochs and options.checkpoint_dir:
        shutil.rmtree(options.checkpoint_dir, ignore_errors=True)


def _separation_line(report) -> str:
    totals = report.totals
    ranks = ", ".join(f"{row.path} K={row.rank}" for row in report.separated)
    return (f"{totals['separated']} of {totals['layers']} conv layers separated ({ranks or 'none'}); parameters "
            f"{totals['model_params_before']:,} -> {totals['model_params_after']:,} ({totals['params_ratio']:.2f}x "
            f"smaller)")


def _plan(original, heldout, calibration, budget: BudgetOptions, separation, say) -> dict:
    from sepconv.convert.budget import plan_budget

    say("budget", f"measuring each layer's sensitivity on {len(heldout)} held-out samples for a budget of "
                  f"{budget.max_drop} points of {'accuracy' if heldout.y is not None else 'agreement'}")
    plan = plan_budget(original, heldout.x, heldout.y, calibration, budget, separation=separation, progress=say)
    say("budget", f"chosen: {plan.ranks or 'no layer'} (predicted drop {plan.predicted_drop:.2f} points before "
                  f"fine-tuning; separable layers' parameters {plan.params_before:,} -> {plan.params_after:,}, "
                  f"{plan.seconds} s)")
    return plan.to_dict()


def _refine(original, separated, calibration, report, scorer, stages, say):
    from sepconv.convert.refinement import refine

    started = time.perf_counter()
    result = refine(original, separated, calibration, report)
    stages.append(scorer.stage("refined", separated, time.perf_counter() - started))
    refined = [layer for layer in result.layers if layer.status == "refined"]
    say("refine", f"{len(refined)} of {len(result.layers)} separated layers refit on {result.samples} images; layer "
                  f"output error " + ", ".join(f"{layer.path} {layer.error_before:.2f}->{layer.error_after:.2f}"
                                               for layer in refined) + f"; {_score_text(stages[-1])}")
    return result


def _recalibrate(separated, calibration, scorer, stages, say):
    from sepconv.convert.refinement import recalibrate_batchnorm

    started = time.perf_counter()
    done = recalibrate_batchnorm(separated, calibration)
    if done:
        stages.append(scorer.stage("batchnorm recalibrated", separated, time.perf_counter() - started))
        say("batchnorm", f"{len(done)} BatchNorm layers re-estimated on {len(calibration)} images; "
                         f"{_score_text(stages[-1])}")
    return done


def _finetune(original, separated, train, folder: Path, options: RecoveryOptions, state: dict, scorer, stages, say):
    from sepconv.convert.finetuning import DEFAULT_LEARNING_RATE, REFINED_LEARNING_RATE, finetune

    started = time.perf_counter()
    weights = folder / FINETUNED
    if weights.exists():  # a resumed run whose training had finished: only the export was left
        separated.load_weights(weights)
        result = state["finetune"]
        say("finetune", f"fine-tuning had finished in the interrupted run; weights restored from {weights}")
    else:
        mode = "labels + distillation" if train.y is not None else "distillation from the original (no labels)"
        say("finetune", f"{mode}, at most {options.epochs} epochs on {len(train)} images; checkpoints in {folder}")
        fit_options = replace(options.finetune, epochs=options.epochs, checkpoint_dir=str(folder / "fit"),
                              resume=options.resume, learning_rate=options.finetune.learning_rate or (
                                  REFINED_LEARNING_RATE if options.refine else DEFAULT_LEARNING_RATE))
        try:
            result = finetune(separated, original, train.x, train.y, options=fit_options, progress=say).to_dict()
        except KeyboardInterrupt:
            raise InterruptedRunError(f"interrupted during fine-tuning; finished epochs are checkpointed in {folder}: "
                                      f"run the same command with --resume to continue") from None
        except (ValueError, OSError) as error:
            if not options.resume:
                raise
            reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
            raise CheckpointError(f"--resume: the checkpoint in {folder} cannot be loaded ({reason}); it was cut off "
                                  f"when the run was killed: delete the folder to start over") from None
        partial = weights.with_name(weights.name + ".partial.weights.h5")
        separated.save_weights(partial)
        partial.replace(weights)
        _save_state(folder, state, finetune=result)
    stages.append(scorer.stage("fine-tuned", separated, time.perf_counter() - started))
    best = (f"best epoch {result['best_epoch']}" if result["best_epoch"] else "no epoch beat the start, kept it")
    say("finetune", f"{result['epochs_run']} epochs, {best} ({result['monitor']} {result['best_value']:.2%}, start "
                    f"{result['initial_value']:.2%}); {_score_text(stages[-1])}")
    return result


def _check_budget(plan: dict, stages, scorer) -> dict:
    final = stages[-1]
    first = stages[0]
    metric = "accuracy" if scorer.labelled else "agreement"
    drop = 100.0 * (getattr(first, metric) - getattr(final, metric))
    held = drop <= plan["max_drop"] + 1e-9
    result = dict(plan, measured_drop=round(drop, 4), measured_on=f"{scorer.samples} held-out samples", held=held,
                  params_ratio=round(first.params / max(1, final.params), 3))
    if not held:
        raise BudgetError(
            f"the budget did not hold: the {final.name} model lost {drop:.2f} points of {metric} on {scorer.samples} "
            f"held-out samples ({100 * getattr(first, metric):.2f}% -> {100 * getattr(final, metric):.2f}%; budget "
            f"{plan['max_drop']}, predicted {plan['predicted_drop']:.2f} before fine-tuning; ranks {plan['ranks']}); "
            f"nothing was written: raise --max-accuracy-drop, fine-tune longer (--epochs) or pass more --data")
    return result


def _score_text(stage: Stage) -> str:
    accuracy = f"accuracy {stage.accuracy:.2%}, " if stage.accuracy is not None else ""
    return f"{accuracy}agreement with the original {stage.agreement:.2%}"


class _Scorer:
    """Scores Keras models on the held-out data against the labels and the original's predictions."""

    def __init__(self, original, heldout):
        from sepconv.convert.verification import predict_keras

        self._x, self._y = heldout.x, heldout.y
        self.samples = len(heldout.x)
        self.labelled = heldout.y is not None
        self._reference = np.argmax(predict_keras(original, self._x)[0], axis=-1)

    def stage(self, name: str, model, seconds: float) -> Stage:
        from sepconv.convert.verification import predict_keras

        predicted = np.argmax(predict_keras(model, self._x)[0], axis=-1)
        accuracy = float(np.mean(predicted == self._y)) if self.labelled else None
        return Stage(name=name, accuracy=accuracy, agreement=float(np.mean(predicted == self._reference)),
                     params=int(model.count_params()), seconds=round(seconds, 2))


def _open_state(folder: Path | None, options: RecoveryOptions, source_sha256: str, separation) -> dict:
    """The saved state of an interrupted run (resume), or a fresh one; refuses to overwrite or to mix runs."""
    if folder is None:
        return {}
    key = {"source_sha256": source_sha256, "separation": separation.describe(),
           "budget": asdict(options.budget) if options.budget else None}
    key = json.loads(json.dumps(key, default=list))
    if not options.resume:
        if folder.exists():
            raise CheckpointError(f"{folder} holds checkpoints of an interrupted run: pass --resume to continue it, "
                                  f"or delete the folder to start over")
        return {"key": key}
    state_file = folder / STATE
    if not state_file.exists():
        raise CheckpointError(f"--resume: no checkpoints in {folder} (nothing to resume); run without --resume")
    try:
        state = json.loads(state_file.read_text())
        if not isinstance(state, dict):
            raise ValueError(f"a JSON {type(state).__name__}, not an object")
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise CheckpointError(f"--resume: the checkpoint in {folder} cannot be loaded ({STATE} is damaged: {reason}); "
                              f"delete the folder to start over") from None
    if state.get("key") != key:
        raise CheckpointError(f"--resume: the checkpoints in {folder} are from another input model or other "
                              f"separation options; rerun the interrupted command exactly, or delete the folder")
    return state


def _save_state(folder: Path | None, state: dict, **updates) -> None:
    if folder is None:
        return
    state.update(updates)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (STATE + ".partial")
    partial.write_text(json.dumps(state, indent=2, default=str))
    partial.replace(folder / STATE)
