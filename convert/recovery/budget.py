"""Rank chosen for an accuracy budget: per-layer sensitivity, then the smallest model whose predicted drop fits.

Sensitivity: each separable layer alone is separated at each candidate (each K of the depthwise-separable form, and
with the spatial form a few ranks r of its kh x 1 + 1 x kw pair; refined by least squares on calibration images when
asked, as the pipeline will do) and the model's score is measured on evaluation images: top-1 accuracy
with labels, top-1 agreement with the original without. A layer's drop at K is the original's score minus that.

Choice: drops are taken as additive (the predicted drop of a plan is the sum of its layers' drops, negative ones
counted as 0). Every layer starts at its smallest candidate; while the prediction is over budget, the move (a layer to
a larger K, or kept as it is) that removes the most predicted drop per parameter added is made. A layer kept as it is
has no drop, so the search always ends. Then each layer, largest savings first, gets back the smallest candidate that
still fits (greedy steps can overshoot). The pipeline then fine-tunes the plan and checks the budget on held-out data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np

from sepconv.convert.errors import InvalidOptionError
from sepconv.convert.export.verification import output_agreements
from sepconv.convert.graph import called_once, predict_keras
from sepconv.convert.recovery.refinement import refine
from sepconv.convert.separation.policy import (DEPTHWISE, FORMS, SPATIAL, Choice, SeparationOptions, choice_label,
                                               spatial_choice)
from sepconv.deploy.choices import choice_columns, choice_order, spatial_rank
from sepconv.deploy.scores import hit_rate, top1

KEEP = 0  # the "rank" of a layer left as it is
DEFAULT_CANDIDATES = (1, 2, 4)
# The spatial form's ranks tried per layer, as shares of the rank at which the pair has as many parameters as the
# layer (r = kh*kw*cin*cout / (kh*cin + kw*cout)): a half and a quarter of the layer's parameters and MACs.
DEFAULT_SPATIAL_SHARES = (0.25, 0.5)


@dataclass(frozen=True)
class BudgetOptions:
    """max_drop: points (percent) of accuracy (or agreement without labels) the plan may lose before fine-tuning
    recovers any. candidates: the K tried per layer (the exact K is always an option, as is keeping the layer).
    refine: measure each candidate after least-squares refinement on the calibration images."""

    max_drop: float = 1.0
    candidates: tuple[int, ...] = DEFAULT_CANDIDATES
    refine: bool = True
    forms: tuple[str, ...] = (DEPTHWISE,)  # the separable forms whose candidates are measured and chosen among
    spatial_shares: tuple[float, ...] = DEFAULT_SPATIAL_SHARES
    output: int | None = None  # the model output the budget is on (its index); None: every output (the worst drop)

    def __post_init__(self):
        if not isinstance(self.max_drop, (int, float)) or isinstance(self.max_drop, bool) or not 0 <= self.max_drop < 100:
            raise InvalidOptionError(f"Unrecognized max_drop={self.max_drop!r}. Use points of accuracy in [0, 100), "
                                     f"e.g. 1.0")
        if not self.candidates or not all(isinstance(k, int) and k >= 1 for k in self.candidates):
            raise InvalidOptionError(f"Unrecognized candidates={self.candidates!r}. Use whole numbers >= 1, e.g. "
                                     f"(1, 2, 4)")
        if not self.forms or not set(self.forms) <= set(FORMS):
            raise InvalidOptionError(f"Unrecognized forms={self.forms!r}. Use some of {list(FORMS)}")
        if not self.spatial_shares or not all(isinstance(share, (int, float)) and not isinstance(share, bool)
                                              and 0 < share < 1 for share in self.spatial_shares):
            raise InvalidOptionError(f"Unrecognized spatial_shares={self.spatial_shares!r}. Use fractions in (0, 1), "
                                     f"e.g. {DEFAULT_SPATIAL_SHARES}")


@dataclass(frozen=True)
class Candidate:
    rank: Choice  # K, KEEP (0) for the layer as it is, or "s<r>" for the spatial form at rank r (policy.Choice)
    params: int
    score: float
    drop: float  # points; measured (0 for KEEP and for the exact K)


@dataclass(frozen=True)
class LayerSensitivity:
    path: str
    full_rank: int
    candidates: tuple[Candidate, ...]  # ascending by parameters; the last one is KEEP

    def candidate(self, rank: Choice) -> Candidate:
        return next(c for c in self.candidates if c.rank == rank)


@dataclass(frozen=True)
class BudgetPlan:
    metric: str  # "accuracy" or "agreement"
    baseline: float  # the original's score on the evaluation images
    max_drop: float
    samples: int
    layers: tuple[LayerSensitivity, ...]
    ranks: dict  # chosen K (or "s<r>") per layer path; layers kept as they are are absent
    predicted_drop: float
    params_before: int  # of the separable layers
    params_after: int
    seconds: float
    latency: dict | None = None  # the latency table and choice when K was chosen for speed on a target (latency.py)
    output: int | None = None  # the output the budget is on (BudgetOptions.output); None: every output

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, plan: dict) -> BudgetPlan:
        """A plan as `to_dict()` wrote it (the state.json a resumed run reads)."""
        layers = tuple(LayerSensitivity(path=layer["path"], full_rank=layer["full_rank"],
                                        candidates=tuple(Candidate(**c) for c in layer["candidates"]))
                       for layer in plan["layers"])
        return cls(**{**plan, "layers": layers})


@dataclass(frozen=True)
class BudgetResult:
    """The budget after recovery: the plan, and what the exported (last kept) model lost. The validation figure
    decides (held); the test figure is reported beside it, never used to decide. `to_dict()`: the plan's keys and
    these (the manifest's and --json's recovery.budget)."""

    plan: BudgetPlan
    measured_drop: float  # points of the plan's metric on the validation data
    measured_on: str
    test_drop: float  # points on the test data
    test_samples: int
    held: bool
    params_ratio: float  # the original's parameters / the exported model's

    def to_dict(self) -> dict:
        return {**self.plan.to_dict(), **{key: value for key, value in asdict(self).items() if key != "plan"}}

    def table(self) -> str:
        """Per layer: the K chosen and the points lost at each K when only that layer is separated (validation), then
        the budget predicted and measured."""
        from tabulate import tabulate

        plan = self.plan
        columns = choice_columns([[c.rank for c in layer.candidates] for layer in plan.layers])
        rows = [[layer.path, choice_label(plan.ranks.get(layer.path, KEEP))]
                + [_drop_cell(layer, pick) for _, pick in columns] for layer in plan.layers]
        return (tabulate(rows, headers=["layer", "chosen"] + [f"drop {header}" for header, _ in columns],
                         tablefmt="simple", disable_numparse=True)
                + f"\nsensitivity: points of {plan.metric} lost when only that layer is separated (on {plan.samples} "
                  f"validation samples); budget {plan.max_drop}, predicted {plan.predicted_drop:.2f}, measured after "
                  f"recovery {self.measured_drop:.2f} (validation): {'held' if self.held else 'NOT held'}; on the "
                  f"test data {self.test_drop:.2f}")


def _drop_cell(layer: LayerSensitivity, pick) -> str:
    found = pick([c.rank for c in layer.candidates])
    if found is None:
        return ""
    r = spatial_rank(found)
    return f"{layer.candidate(found).drop:+.2f}" + (f" (r={r})" if r else "")


Progress = Callable[[str, str], None]


def plan_budget(model, x_eval: np.ndarray, y_eval: np.ndarray | None, x_calibration: np.ndarray | None,
                options: BudgetOptions = BudgetOptions(), *, separation=None, progress: Progress | None = None
                ) -> BudgetPlan:
    """Measure every separable layer's sensitivity and choose per-layer K for `options.max_drop` (module doc).

    separation: a SeparationOptions whose include / exclude patterns limit the layers considered.
    """
    import time


    if options.refine and (x_calibration is None or len(x_calibration) == 0):
        raise InvalidOptionError("the budget search refines candidates on calibration images; pass some or refine=False")
    started = time.perf_counter()
    separation = separation or SeparationOptions()
    say = progress or (lambda stage, message: None)
    baseline, score = _scorer(model, x_eval, y_eval, options.output)
    paths = _separable_layers(model, separation)
    if not paths:
        raise InvalidOptionError("no layer of this model can be separated (see the separation report); nothing to "
                                 "budget")
    layers = []
    for number, row in enumerate(paths, start=1):
        layers.append(_sensitivity(model, row, score, baseline, x_calibration, options, separation))
        measured = ", ".join(f"{choice_label(c.rank)} {c.drop:+.2f}" for c in layers[-1].candidates if c.rank != KEEP)
        say("sensitivity", f"[{number}/{len(paths)}] {row.path}: drop in points {measured}")
    layers = tuple(layers)
    ranks, predicted = choose(layers, options.max_drop)
    return BudgetPlan(metric="accuracy" if y_eval is not None else "agreement", baseline=baseline,
                      max_drop=float(options.max_drop), samples=len(x_eval), layers=layers, ranks=ranks,
                      predicted_drop=predicted, params_before=sum(row.params_before for row in paths),
                      params_after=plan_params(layers, ranks), seconds=round(time.perf_counter() - started, 1),
                      output=options.output)


def choose(layers, max_drop: float) -> tuple[dict, float]:
    """Per-layer K (KEEP layers absent) and the predicted drop: the greedy search of the module doc."""
    chosen = {layer.path: layer.candidates[0] for layer in layers}

    def predicted() -> float:
        return sum(max(0.0, c.drop) for c in chosen.values())

    while predicted() > max_drop + 1e-9:
        best = None
        for layer in layers:
            now = chosen[layer.path]
            for option in layer.candidates:
                gain = max(0.0, now.drop) - max(0.0, option.drop)
                cost = option.params - now.params
                if option.params > now.params and gain > 0 and (best is None or gain / cost > best[0]):
                    best = (gain / cost, layer.path, option)
        if best is None:
            break
        chosen[best[1]] = best[2]
    _fill_back(layers, chosen, max_drop, predicted)
    ranks = {path: c.rank for path, c in chosen.items() if c.rank != KEEP}
    return ranks, round(predicted(), 4)


def _fill_back(layers, chosen: dict, max_drop: float, predicted) -> None:
    """Greedy steps can overshoot (keeping a layer whose smaller K would still have fitted once another layer was
    kept): give each layer, largest savings first, the smallest candidate that keeps the prediction in budget."""
    for layer in sorted(layers, key=lambda layer: layer.candidates[0].params - layer.candidates[-1].params):
        now = chosen[layer.path]
        for option in layer.candidates:  # ascending by parameters
            if option.params >= now.params:
                break
            chosen[layer.path] = option
            if predicted() <= max_drop + 1e-9:
                break
            chosen[layer.path] = now


def plan_params(layers, ranks: dict) -> int:
    """The separable layers' parameters under a plan (ranks: K per path; absent layers kept)."""
    return sum(layer.candidate(ranks.get(layer.path, KEEP)).params for layer in layers)


def _scorer(model, x_eval, y_eval, output: int | None = None):
    """(the original's score, a function scoring a model) in percent: accuracy with labels, else agreement, of the
    first output. A model with several outputs scores the worst of them: a candidate's score is the baseline less
    the largest drop among the first output's metric and every other output's agreement with the original's
    (verification.output_agreements), so that the budget covers each output. output: the budget on that output
    alone (the first: as above without the others; another: its agreement with the original's, baseline 100)."""
    original = predict_keras(model, x_eval)
    if output:
        return 100.0, lambda candidate: 100.0 * output_agreements(
            [original[output]], [predict_keras(candidate, x_eval)[output]])[0]
    reference = top1(original[0])
    truth = np.asarray(y_eval) if y_eval is not None else reference
    baseline = 100.0 * hit_rate(reference, truth)

    def score(candidate) -> float:
        outputs = predict_keras(candidate, x_eval)
        value = 100.0 * hit_rate(top1(outputs[0]), truth)
        if len(outputs) < 2 or output == 0:
            return value
        others = output_agreements(original[1:], outputs[1:])
        return baseline - max([baseline - value] + [100.0 * (1.0 - agreement) for agreement in others])

    return baseline, score


def _separable_layers(model, separation) -> list:
    """The separation report's rows (path, exact K, parameters, kernel, channels) of the layers separation would
    rewrite at K=1, nested models included."""
    from sepconv.convert.separation.walk import separate_with

    _, report = separate_with(model, replace(separation, rank=1, energy=None, ranks=None, form=DEPTHWISE))
    return [row for row in report.separated if called_once(model, row.path)]


def spatial_ranks(row, shares) -> list[int]:
    """The spatial form's ranks tried for a layer (a separation report row): `shares` of the rank at which the pair
    has as many parameters as the layer, at least 1, each once."""
    (kh, kw), cin, cout = row.kernel, row.in_channels, row.out_channels
    if kh == 1 or kw == 1:
        return []
    even = kh * kw * cin * cout / (kh * cin + kw * cout)
    return sorted({max(1, round(share * even)) for share in shares})


def _sensitivity(model, row, score, baseline: float, x_calibration, options: BudgetOptions,
                 separation) -> LayerSensitivity:
    from sepconv.convert.separation.walk import separate_with

    path, full_rank = row.path, row.full_rank
    tried = []
    if DEPTHWISE in options.forms:
        tried += [(rank, rank, DEPTHWISE) for rank in sorted({k for k in options.candidates if k < full_rank}
                                                              | {full_rank})]
    if SPATIAL in options.forms:
        tried += [(spatial_choice(rank), rank, SPATIAL) for rank in spatial_ranks(row, options.spatial_shares)]
    candidates = []
    for choice, rank, form in tried:
        single = replace(separation, rank=rank, energy=None, include=(path,), ranks=None, form=form)
        separated, report = separate_with(model, single)
        if not report.separated:  # not smaller at this rank: larger ones of its form will not be either
            continue
        if form == DEPTHWISE and rank == full_rank:  # exact: nothing to measure
            candidates.append(Candidate(choice, report.separated[0].params_after, baseline, 0.0))
            continue
        if options.refine:
            refine(model, separated, x_calibration, report)
        value = score(separated)
        candidates.append(Candidate(choice, report.separated[0].params_after, value, round(baseline - value, 4)))
    candidates.sort(key=lambda c: (c.params, choice_order(c.rank)))
    candidates.append(Candidate(KEEP, row.params_before, baseline, 0.0))
    return LayerSensitivity(path=path, full_rank=full_rank, candidates=tuple(candidates))
