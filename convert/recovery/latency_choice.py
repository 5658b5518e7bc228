"""Separate where it pays on the target: each layer's K (or keep) chosen from latency measured where it will run.

The table: for every layer the accuracy budget measured (budget.py's sensitivity) and every candidate K, plus keeping
the layer, the p50 latency of that layer alone, exported as the run exports (format, quantization, threads, XNNPACK)
and timed by bench-model's harness on this machine or on a device over deploy-model's SSH connection
(latency_table.py measures it), with the whole original model in the same run.

A plan's whole-model latency is predicted from the table's sum for it (`WholeModel`, `predict_ms`): a line through
two whole models timed with the table, the original (every layer kept) and the plan with every layer at its least K
(latency_table.py). Its slope carries what running the layers together costs that running each alone does not (a
large float model's weights fall out of the caches that a single layer's stay in: the digits demo's float32 layers
take 2.3x their single-layer time inside the model), its intercept what the table leaves out (the model's other
layers, which a plan does not change: in mobilenet_v1 they are most of its 0.03 ms). Without the second model (a table
measured before it, or one where the two sums hardly differ) the sum is scaled so that keeping every layer predicts
the original's measured latency. The choice does not depend on the prediction (it minimises the sum); the targets and
what the run reports do. The pipeline times the exported artifact and reports the prediction's error.

The choice (`choose_for_latency`), with drops taken as additive like budget.py's (negative ones counted as 0):
- a separation that the table says is slower than keeping the layer is never chosen;
- without a latency target: the fastest plan whose predicted drop is within `max_drop` (ties: fewer parameters);
- with a target (whole-model ms; `--target-speedup X` is the original's ms / X): the plan that loses the least
  accuracy among those predicted to meet it within `max_drop`, and the fastest of those; none: LatencyTargetError.
It is exact, not greedy: a dynamic programme over the drop in steps of DROP_STEP points, each layer's drop rounded up
(so the predicted drop never exceeds the budget).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from sepconv.convert.errors import BudgetError, InvalidOptionError
from sepconv.convert.recovery.budget import KEEP

DROP_STEP = 1e-3  # points of accuracy: the resolution of the choice (a validation sample of 1,000 is 0.1 point)
KEEP_KEY = "keep"  # the table's key for the layer left as it is (JSON keys are strings: "1", "2", ... and "keep")
TIE_MS = 1e-9
MIN_SPREAD = 0.05  # the least gap between the two calibration sums, as a share of the kept sum, that fits a line


class LatencyTargetError(BudgetError):
    """No plan within the accuracy budget is predicted to meet the latency target."""


@dataclass(frozen=True)
class LatencyTarget:
    """At most one of: ms (the whole model's p50 latency) or speedup (against the original in the same format)."""

    ms: float | None = None
    speedup: float | None = None

    def __post_init__(self):
        if self.ms is not None and self.speedup is not None:
            raise InvalidOptionError("Got both a target latency and a target speed-up; give one of them")
        for name, value in (("target latency", self.ms), ("target speed-up", self.speedup)):
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not 0 < value < float("inf")):
                raise InvalidOptionError(f"Unrecognized {name} {value!r}. Use a number > 0, e.g. 0.5")

    @property
    def given(self) -> bool:
        return self.ms is not None or self.speedup is not None

    def whole_ms(self, original_ms: float | None) -> float | None:
        """The whole model's latency the plan must reach, or None without a target."""
        if self.speedup is None:
            return self.ms
        if original_ms is None:
            raise InvalidOptionError("a target speed-up needs the original model's measured latency")
        return original_ms / self.speedup

    def describe(self) -> str:
        return f"{self.ms} ms" if self.ms is not None else f"{self.speedup}x faster than the original"


@dataclass(frozen=True)
class LayerChoice:
    path: str
    rank: int | str  # K, KEEP (0), or "s<r>" (the spatial form: policy.Choice)
    drop: float  # its measured drop (points), as budget.py measured it
    keep_ms: float
    ms: float  # the chosen option's latency (== keep_ms when kept)
    fastest_rank: int | str  # the fastest option the table has for this layer (within the budget or not)
    slower: tuple  # the choices the table says are slower than keeping the layer: never chosen


@dataclass(frozen=True)
class LatencyChoice:
    ranks: dict  # chosen K or "s<r>" per layer path; layers kept as they are are absent (as in BudgetPlan.ranks)
    predicted_drop: float
    predicted_delta_ms: float  # sum over layers of (chosen - keep), as the table has them
    predicted_ms: float | None  # the whole model (WholeModel.predict; None without original_ms)
    original_ms: float | None
    table_sum_ms: float  # the table's sum for the chosen options (what predicted_ms follows from)
    target_ms: float | None
    layers: tuple[LayerChoice, ...]
    whole_model: dict | None = None  # the WholeModel that predicted_ms is (None without original_ms)

    def to_dict(self) -> dict:
        return asdict(self)


def rank_key(rank) -> str:
    """The table's key of a choice: "keep", "2" (K=2), "s16" (the spatial form at r=16)."""
    return KEEP_KEY if rank == KEEP else str(rank)


def layer_ms(row: dict, rank) -> float | None:
    """A layer's latency at `rank` (KEEP for the layer as it is) from its table row, or None when not measured."""
    value = row.get(rank_key(rank), row.get(rank))
    return None if value is None else float(value)


@dataclass(frozen=True)
class WholeModel:
    """The whole model's p50 (ms) for a plan whose table sum is `sum_ms`: rest_ms + scale * sum_ms. method: "fitted"
    (through the original and the plan at every layer's least K, both timed) or "proportional" (through the original
    and zero)."""

    scale: float
    rest_ms: float
    method: str

    def predict(self, sum_ms):
        return self.rest_ms + self.scale * sum_ms

    @classmethod
    def proportional(cls, keep_sum_ms: float, original_ms: float) -> "WholeModel":
        return cls(scale=original_ms / keep_sum_ms, rest_ms=0.0, method="proportional")

    @classmethod
    def fit(cls, keep_sum_ms: float, original_ms: float, plan_sum_ms: float | None = None,
            plan_ms: float | None = None, least_sum_ms: float | None = None) -> "WholeModel":
        """The line through (keep_sum_ms, original_ms) and (plan_sum_ms, plan_ms); proportional when the second point
        is missing, too close to the first to fix a slope (MIN_SPREAD), or gives a line that is not increasing or that
        predicts no time at all at the table's least sum `least_sum_ms` (a noisy measurement: trusted less than the
        scale)."""
        if plan_sum_ms is None or plan_ms is None or not keep_sum_ms - plan_sum_ms > MIN_SPREAD * keep_sum_ms:
            return cls.proportional(keep_sum_ms, original_ms)
        scale = (original_ms - plan_ms) / (keep_sum_ms - plan_sum_ms)
        fitted = cls(scale=scale, rest_ms=original_ms - scale * keep_sum_ms, method="fitted")
        least = plan_sum_ms if least_sum_ms is None else min(least_sum_ms, plan_sum_ms)
        if not (math.isfinite(scale) and scale > 0 and fitted.predict(least) > 0):
            return cls.proportional(keep_sum_ms, original_ms)
        return fitted


def predict_ms(table: dict, ranks: dict, original_ms: float, whole: WholeModel | None = None) -> float:
    """The whole model's predicted latency for a plan (ranks: K per path, absent or KEEP: kept): the table's sum for
    it through `whole` (default: scaled so that keeping every layer of the table predicts `original_ms`)."""
    keep_sum = sum(layer_ms(row, KEEP) for row in table.values())
    chosen = sum(layer_ms(row, ranks.get(path, KEEP)) for path, row in table.items())
    return (whole or WholeModel.proportional(keep_sum, original_ms)).predict(chosen)


def choose_for_latency(layers, table: dict, max_drop: float, *, original_ms: float | None = None,
                       target: LatencyTarget = LatencyTarget(), whole: WholeModel | None = None) -> LatencyChoice:
    """Per-layer K or keep from the sensitivity `layers` (budget.LayerSensitivity) and the latency `table`
    ({path: {"keep": ms, "1": ms, ...}}): see the module doc. whole: how the whole model's latency follows from the
    table's sum (default: proportional to the original's, with `original_ms`)."""
    missing = [layer.path for layer in layers if layer.path not in table or layer_ms(table[layer.path], KEEP) is None]
    if missing:
        raise InvalidOptionError(f"the latency table has no 'keep' latency for {missing}; measure those layers")
    target_ms = target.whole_ms(original_ms)
    if target_ms is not None and original_ms is None:
        raise InvalidOptionError("a target latency needs the original model's measured latency")
    budget = math.floor(max_drop / DROP_STEP + 1e-6)
    options = [_options(layer, table[layer.path], budget) for layer in layers]
    keep_sum = sum(layer_ms(table[layer.path], KEEP) for layer in layers)
    if original_ms is None:
        whole = None
    elif whole is None:
        whole = WholeModel.proportional(keep_sum, original_ms)
    latency, params, picks = _programme(options, budget)
    spent = _spend(None if whole is None else whole.predict(keep_sum + latency), budget, target_ms, original_ms,
                   max_drop)
    chosen = _backtrack(options, picks, spent)
    rows = tuple(_row(layer, table[layer.path], option) for layer, option in zip(layers, chosen))
    delta = sum(row.ms - row.keep_ms for row in rows)
    predicted = None if whole is None else whole.predict(keep_sum + delta)
    return LatencyChoice(ranks={row.path: row.rank for row in rows if row.rank != KEEP},
                         predicted_drop=round(sum(max(0.0, row.drop) for row in rows), 4),
                         predicted_delta_ms=delta, predicted_ms=predicted,
                         original_ms=original_ms, target_ms=target_ms, table_sum_ms=keep_sum + delta, layers=rows,
                         whole_model=None if whole is None else asdict(whole))


def _options(layer, row: dict, budget: int) -> list[tuple]:
    """(weight in DROP_STEPs, ms change against keeping, parameters, candidate) of each option the choice may take:
    measured, within the budget alone, and not slower than keeping the layer. KEEP is always one of them."""
    keep_ms = layer_ms(row, KEEP)
    found = []
    for candidate in layer.candidates:
        ms = layer_ms(row, candidate.rank)
        if ms is None or (candidate.rank != KEEP and ms > keep_ms + TIE_MS):
            continue
        weight = math.ceil(max(0.0, candidate.drop) / DROP_STEP - 1e-6)
        if weight <= budget:
            found.append((weight, ms - keep_ms, candidate.params, candidate))
    return found


def _programme(options: list[list[tuple]], budget: int):
    """best[b]: the least latency change (then parameters) of the layers so far with a total weight <= b; picks[l][b]:
    the option of layer l in it."""
    latency = np.zeros(budget + 1)
    params = np.zeros(budget + 1)
    picks = []
    for layer_options in options:
        best_latency = np.full(budget + 1, np.inf)
        best_params = np.full(budget + 1, np.inf)
        pick = np.full(budget + 1, -1, dtype=np.int64)
        for index, (weight, delta, count, _) in enumerate(layer_options):
            shifted_latency = np.full(budget + 1, np.inf)
            shifted_params = np.full(budget + 1, np.inf)
            shifted_latency[weight:] = latency[:budget + 1 - weight] + delta
            shifted_params[weight:] = params[:budget + 1 - weight] + count
            with np.errstate(invalid="ignore"):  # inf - inf where neither reaches b
                better = (shifted_latency < best_latency - TIE_MS) | (
                    (np.abs(shifted_latency - best_latency) <= TIE_MS) & (shifted_params < best_params))
            best_latency = np.where(better, shifted_latency, best_latency)
            best_params = np.where(better, shifted_params, best_params)
            pick = np.where(better, index, pick)
        latency, params = best_latency, best_params
        picks.append(pick)
    return latency, params, picks


def _spend(predicted: np.ndarray | None, budget: int, target_ms, original_ms, max_drop: float) -> int:
    """The drop (in steps) the plan may use: all of the budget without a target, else the least whose fastest plan is
    predicted (`predicted[b]`: the whole model's ms) to meet it."""
    if target_ms is None:
        return budget
    meets = np.flatnonzero(predicted <= target_ms + TIE_MS)
    if not len(meets):
        raise LatencyTargetError(
            f"no plan within --max-accuracy-drop {max_drop} is predicted to reach {target_ms:.4g} ms: the fastest is "
            f"{predicted[budget]:.4g} ms (the original: {original_ms:.4g} ms); raise --max-accuracy-drop or relax "
            f"the latency target")
    return int(meets[0])


def _backtrack(options, picks, spent: int) -> list[tuple]:
    chosen = []
    for layer_options, pick in zip(reversed(options), reversed(picks)):
        option = layer_options[int(pick[spent])]
        chosen.append(option)
        spent -= option[0]
    return chosen[::-1]


def _row(layer, row: dict, option: tuple) -> LayerChoice:
    keep_ms = layer_ms(row, KEEP)
    measured = [(layer_ms(row, c.rank), c.rank) for c in layer.candidates if layer_ms(row, c.rank) is not None]
    candidate = option[3]
    return LayerChoice(path=layer.path, rank=candidate.rank, drop=candidate.drop, keep_ms=keep_ms,
                       ms=keep_ms + option[1], fastest_rank=min(measured, key=lambda found: found[0])[1],
                       slower=tuple(rank for ms, rank in measured if rank != KEEP and ms > keep_ms + TIE_MS))
