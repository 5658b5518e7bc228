"""Run an exported artifact and the Keras model it came from on the same inputs, and judge the artifact.

Float32 artifacts must reproduce the model (relative max error <= 1e-4). Quantized ones (float16 weights included)
are judged by what users feel: top-1 agreement with the Keras model for classifier outputs, cosine similarity for
other outputs, and accuracy when labels are given. On synthetic inputs (no data given) the top-1 class of a
classifier is decided by noise, so a correct quantized artifact can disagree on many of them: there, classifier
outputs are judged by cosine similarity too, and the criterion says so.

A few hundred held-out images measure agreement and accuracy with an error of a point or more (one image of 225 is
0.44 points), so a bar is failed only when the images show it (`Tolerance.confidence`): top-1 agreement fails when
its one-sided Wilson upper bound is below `min_agreement`, the accuracy budget when the drop's lower bound (on the
images where the two models differ, `drop_bound`) is over it. A measurement under the bar that the images cannot
tell from it passes, and its criterion says so with the bound and the sample count that would resolve it.
Confidence 0 judges the measured values themselves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from sepconv.convert.errors import InvalidOptionError, VerificationError
from sepconv.convert.graph import MAX_BATCH, batch_size_for, batched, predict_keras
from sepconv.convert.loading import load
from sepconv.deploy.runtime import Runtime, open_runtime
from sepconv.deploy.scores import hit_rate, top1
from sepconv.deploy.stats import share_bound


@dataclass(frozen=True)
class Tolerance:
    """The pass marks, each with its reason.

    max_relative_error: float32 artifacts compute the same function with other kernels and summation orders, so
        they agree to ~1e-6 of the output scale; 1e-4 leaves room for that and catches any real difference.
    min_agreement: quantized classifiers lose a little precision; 98% top-1 agreement with the Keras model is the
        usual bar for an int8 model that "gives the same answers".
    min_cosine: quantized non-classifier outputs (feature maps, embeddings) must keep their direction.
    confidence: how sure the held-out images must make a failure (module doc): 0.95 fails an agreement or a budget
        only when the images show it at 95% one-sided confidence; 0 fails every measured value under the bar.
    """

    max_relative_error: float = 1e-4
    min_agreement: float = 0.98
    min_cosine: float = 0.98
    confidence: float = 0.95

    def __post_init__(self):
        for name in ("max_relative_error", "min_agreement", "min_cosine", "confidence"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                raise InvalidOptionError(f"Unrecognized {name}={value!r}. Use a number in [0, 1]")
        if self.confidence >= 1:
            raise InvalidOptionError(f"Unrecognized confidence={self.confidence!r}. Use a number in [0, 1): a "
                                     f"confidence of 1 can never fail anything")

    @property
    def measured(self) -> Tolerance:
        """The same bars on the measured values alone (confidence 0): what repair aims at."""
        return replace(self, confidence=0.0)

    def agreement_verdict(self, agreement: float, samples: int) -> tuple[bool, str]:
        """(passed, criterion) of a top-1 agreement measured on `samples` images."""
        bar = self.min_agreement
        if agreement >= bar:
            return True, f"top-1 agreement {agreement:.2%} >= {bar:.2%}"
        if not self.confidence:
            return False, f"top-1 agreement {agreement:.2%} < {bar:.2%}"
        bound = share_bound(round(agreement * samples), samples, self.confidence, upper=True)
        level = f"{self.confidence:.0%} upper bound {bound:.2%}"
        if bound < bar:
            return False, f"top-1 agreement {agreement:.2%} < {bar:.2%} on {samples} samples ({level})"
        return True, (f"top-1 agreement {agreement:.2%} under {bar:.2%} by less than {samples} samples can show "
                      f"({level}; about {_samples_to_resolve(agreement, bar, self.confidence)} would)")


def _samples_to_resolve(share: float, bar: float, confidence: float) -> int:
    """How many samples measuring `share` would put its upper bound under `bar` (doubling, then halving in)."""
    low, high = 1, 2
    while share_bound(round(share * high), high, confidence, upper=True) >= bar and high < 1 << 24:
        low, high = high, high * 2
    while high - low > max(1, low // 100):
        middle = (low + high) // 2
        low, high = (low, middle) if share_bound(round(share * middle), middle, confidence, upper=True) < bar \
            else (middle, high)
    return high


@dataclass(frozen=True)
class OutputCheck:
    name: str
    max_abs_diff: float
    mean_abs_diff: float
    max_relative_error: float  # max |artifact - keras| / max |keras|
    cosine: float
    agreement: float | None  # top-1 agreement with the Keras model (classifier outputs)
    accuracy: float | None  # the artifact's top-1 accuracy on labelled data
    keras_accuracy: float | None  # the Keras model's, on the same data
    criterion: str
    passed: bool


@dataclass(frozen=True)
class BudgetCheck:
    """The accuracy budget (--max-accuracy-drop) applied to what ships: the artifact's drop against the original model
    on the validation data, quantization included (the recovery checked the Keras model only)."""

    metric: str  # accuracy, or agreement with the original without labels
    original: float  # the original model's score on the validation data
    artifact: float  # the artifact's
    drop: float  # points
    max_drop: float
    samples: int
    least_drop: float | None = None  # points: the drop's lower bound at the tolerance's confidence (None: not bounded)
    confidence: float = 0.0

    @property
    def held(self) -> bool:
        return min(self.drop, self.drop if self.least_drop is None else self.least_drop) <= self.max_drop + 1e-9

    def criterion(self) -> str:
        if self.drop <= self.max_drop + 1e-9 or self.least_drop is None:
            return (f"validation {self.metric} drop {self.drop:.2f} {'<=' if self.held else '>'} {self.max_drop} "
                    f"points (budget)")
        bound = f"{self.confidence:.0%} lower bound {self.least_drop:.2f}"
        if self.held:
            return (f"validation {self.metric} drop {self.drop:.2f} over the {self.max_drop}-point budget by less "
                    f"than {self.samples} samples can show ({bound})")
        return f"validation {self.metric} drop {self.drop:.2f} > {self.max_drop} points (budget; {bound})"

    def failure(self) -> str:
        shown = "" if self.least_drop is None else \
            f", at least {self.least_drop:.2f} at {self.confidence:.0%} confidence"
        return (f"the artifact lost {self.drop:.2f} points of {self.metric} on {self.samples} validation samples "
                f"({self.original:.2%} -> {self.artifact:.2%}{shown}), over the budget of {self.max_drop} "
                f"(--max-accuracy-drop; quantization counts)")


def drop_bound(worse: int, better: int, samples: int, confidence: float) -> float:
    """The lower bound, in points, on how much worse than the original an artifact scores, from the `worse` images
    only the original gets right and the `better` ones only the artifact does, of `samples` (paired: the images
    both get right or both wrong say nothing about the difference). Given the d = worse + better images where they
    differ, `worse` is Binomial(d, q) and the drop is d (2q - 1) / samples: the bound is that of q (share_bound)."""
    differ = worse + better
    if not differ or not confidence:
        return 100.0 * (worse - better) / max(samples, 1)
    q = share_bound(worse, differ, confidence, upper=False)
    return 100.0 * differ * (2 * q - 1) / samples


@dataclass(frozen=True)
class Verification:
    artifact: str
    quantize: str
    samples: int
    inputs: str  # where the inputs came from
    outputs: tuple[OutputCheck, ...]
    original_agreement: float | None = None  # top-1 agreement with the model before separation
    original_accuracy: float | None = None
    budget: BudgetCheck | None = None  # with --max-accuracy-drop: the artifact's own drop on the validation data

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.outputs) and (self.budget is None or self.budget.held)

    def to_dict(self) -> dict:
        budget = None if self.budget is None else {**asdict(self.budget), "held": self.budget.held}
        return {**asdict(self), "budget": budget, "passed": self.passed}

    def failures(self) -> list[str]:
        failed = [f"output {c.name}: {c.criterion}" for c in self.outputs if not c.passed]
        return failed + ([self.budget.failure()] if self.budget is not None and not self.budget.held else [])

    def raise_for_failure(self) -> None:
        if not self.passed:
            raise VerificationError(f"{self.artifact} ({self.quantize}) failed verification on {self.samples} "
                                    f"{self.inputs}: {'; '.join(self.failures())}; try another --quantize mode, "
                                    f"more representative --data, or lower --min-agreement")


def within_budget(verification: Verification, runtime, held, recovery, *, layout: str = "nhwc",
                  confidence: float = 0.0) -> Verification:
    """`verification` with the accuracy budget checked on the artifact itself (BudgetCheck): a run with
    --max-accuracy-drop whose artifact loses more than the budget on the validation data (shown at `confidence`,
    drop_bound) fails verification like any other criterion. A model with several outputs: the worst output's drop
    (each after the first by its agreement with the original's), or the named output's (budget.plan.output).
    Unchanged when the run had no budget (recovery.budget None) or no validation data. held: the pipeline's HeldOut
    (validation data, the original's top-1 classes on it, and its outputs when there are several)."""
    validation = held.validation
    budget = recovery.budget if recovery is not None else None
    if budget is None or validation is None:
        return verification
    outputs = run_artifact(runtime, validation.x, layout=layout)  # once, for every output's check
    named = budget.plan.output
    if named:  # the budget on an output after the first: the artifact's agreement with the original's there
        return replace(verification, budget=_output_budget(outputs, held, budget, named, confidence))
    predicted = top1(outputs[0])
    original = held.original_top1
    if validation.y is not None:
        truth, metric, before = np.asarray(validation.y).reshape(-1), "accuracy", recovery.stages[0].val_accuracy
    else:
        truth, metric, before = original, "agreement", 1.0
    after = hit_rate(predicted, truth)
    least = None
    if original is not None:
        right_before, right_after = original == truth, predicted == truth
        least = round(drop_bound(int(np.sum(right_before & ~right_after)), int(np.sum(right_after & ~right_before)),
                                 len(truth), confidence), 4)
    check = BudgetCheck(metric=metric, original=before, artifact=after, drop=round(100.0 * (before - after), 4),
                        max_drop=budget.plan.max_drop, samples=len(validation.x), least_drop=least,
                        confidence=confidence)
    if named is None and held.original_outputs is not None:  # every output counts: the worst one's drop
        others = [_output_budget(outputs, held, budget, index, confidence)
                  for index in range(1, len(held.original_outputs))]
        check = max([check, *others], key=lambda each: each.drop)
    return replace(verification, budget=check)


def _output_budget(outputs: list[np.ndarray], held, budget, index: int, confidence: float) -> BudgetCheck:
    """The budget on output `index` (after the first) of the artifact's `outputs` on the validation data: top-1
    agreement with the original's classes there (bounded like the first output's), or the mean cosine of a
    non-classifier output (its drop as measured)."""
    reference, actual = held.original_outputs[index], outputs[index]
    after = output_agreements([reference], [actual])[0]
    least = None
    if _is_classifier(reference):
        disagree = int(np.sum(top1(reference) != top1(actual)))
        least = round(drop_bound(disagree, 0, len(reference), confidence), 4)
    return BudgetCheck(metric="agreement", original=1.0, artifact=after, drop=round(100.0 * (1.0 - after), 4),
                       max_drop=budget.plan.max_drop, samples=len(reference), least_drop=least, confidence=confidence)


def run_artifact(runtime, x: np.ndarray, *, layout: str = "nhwc", batch_size: int = MAX_BATCH) -> list[np.ndarray]:
    """The artifact's outputs on `x` (an array, or data.Images streamed from disk), batch by batch."""
    if layout == "nchw":
        return batched(lambda batch: runtime.run([np.ascontiguousarray(np.transpose(batch, (0, 3, 1, 2)))]), x,
                       batch_size)
    return batched(lambda batch: runtime.run([batch]), x, batch_size)


def verify(model, artifact, x: np.ndarray, y: np.ndarray | None = None, *, quantized: bool, quantize: str = "none",
           tolerance: Tolerance = Tolerance(), layout: str = "nhwc", inputs: str = "held-out samples",
           original=None, synthetic: bool = False, expected: list[np.ndarray] | None = None) -> Verification:
    """Compare `artifact` (a path, or an opened sepconv.deploy Runtime) with `model` on inputs `x` (and labels `y`).

    original: the model before separation, if any (or `Outputs` of it on `x`); its top-1 agreement with the artifact
    is reported too. synthetic: `x` is made-up input (no data): quantized classifiers are judged by cosine similarity
    (module doc). expected: `predict_keras(model, x)` when the caller has it already (several artifacts of one model).
    """
    runtime = artifact if isinstance(artifact, Runtime) else open_runtime(artifact)
    batch = batch_size_for(model)  # the artifact holds what the Keras model holds, give or take its arena planning
    return compare_outputs(predict_keras(model, x, batch) if expected is None else expected,
                           run_artifact(runtime, x, layout=layout, batch_size=batch),
                           [spec.name for spec in runtime.outputs], x, y, quantized=quantized, quantize=quantize,
                           tolerance=tolerance, inputs=inputs, original=original, synthetic=synthetic,
                           artifact=str(artifact if not isinstance(artifact, Runtime) else "artifact"))


class Outputs:
    """A Keras model's outputs on inputs `x`, computed on first use and then kept: the pipeline verifies every
    artifact against the same model on the same inputs, and a large model's forward pass is its slowest step."""

    def __init__(self, model, x: np.ndarray):
        self.model, self.x, self._values = model, x, None

    @property
    def values(self) -> list[np.ndarray]:
        if self._values is None:
            self._values = predict_keras(self.model, self.x)
            self.model = None  # not kept alive for its outputs' sake
        return self._values


def compare_outputs(expected, actual, names, x, y, *, quantized: bool, quantize: str, tolerance: Tolerance,
                    inputs: str, original, artifact: str, synthetic: bool = False) -> Verification:
    """Judge each output (`expected`: the Keras model's outputs on `x`, `actual`: the artifact's, `names`: its output
    names), and score the model before separation against the artifact's first output."""
    if len(expected) != len(actual):
        raise VerificationError(f"{artifact}: has {len(actual)} outputs but the Keras model has {len(expected)}")
    checks = tuple(_check(name, e, a, y, quantized, tolerance, synthetic) for name, e, a in zip(names, expected,
                                                                                                actual))
    original_agreement = original_accuracy = None
    if original is not None and _is_classifier(actual[0]):
        reference = (original.values if isinstance(original, Outputs) else predict_keras(original, x))[0]
        original_agreement, original_accuracy = _agreement(reference, actual[0]), _accuracy(reference, y)
    return Verification(artifact=artifact, quantize=quantize, samples=len(x), inputs=inputs, outputs=checks,
                        original_agreement=original_agreement, original_accuracy=original_accuracy)


def _is_classifier(output: np.ndarray) -> bool:
    return output.ndim == 2 and output.shape[1] >= 2


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return hit_rate(top1(a), top1(b))


def _accuracy(output: np.ndarray, y) -> float | None:
    if y is None or not _is_classifier(output):
        return None
    return hit_rate(top1(output), y)


def output_agreements(reference: list[np.ndarray], outputs: list[np.ndarray]) -> list[float]:
    """How far each output of a model keeps the reference model's, as a share in [0, 1]: top-1 agreement for a
    classifier output, the mean cosine similarity (floored at 0) for any other (feature maps, a regression head)."""
    return [_agreement(r, o) if _is_classifier(r) else max(0.0, mean_cosine(np.asarray(r, np.float64),
                                                                            np.asarray(o, np.float64)))
            for r, o in zip(reference, outputs)]


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The mean over samples of the cosine similarity of two outputs' rows (each sample flattened)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, axis=1) / np.maximum(norms, 1e-30)))


def _check(name, expected, actual, y, quantized: bool, tolerance: Tolerance, synthetic: bool = False) -> OutputCheck:
    expected = expected.astype(np.float64)
    actual = actual.astype(np.float64).reshape(expected.shape)
    diff = np.abs(actual - expected)
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    relative = float(np.max(diff)) / scale
    cosine = mean_cosine(expected, actual)
    classifier = _is_classifier(expected)
    agreement = _agreement(expected, actual) if classifier else None
    non_finite = _non_finite(expected, actual)
    if non_finite:  # NaN agrees with NaN on argmax: no criterion below may pass such a model
        passed, criterion = False, non_finite
    elif not quantized:
        passed = relative <= tolerance.max_relative_error
        criterion = f"relative max error {relative:.2e} {'<=' if passed else '>'} {tolerance.max_relative_error:g}"
    elif classifier and not synthetic:
        passed, criterion = tolerance.agreement_verdict(agreement, len(expected))
    else:
        passed = cosine >= tolerance.min_cosine
        criterion = f"cosine similarity {cosine:.4f} {'>=' if passed else '<'} {tolerance.min_cosine:g}"
        if classifier:
            criterion += (f" (synthetic inputs: top-1 agreement on noise, {agreement:.2%}, is not a meaningful test; "
                          f"pass --data for it)")
    return OutputCheck(name=name, max_abs_diff=float(np.max(diff)), mean_abs_diff=float(np.mean(diff)),
                       max_relative_error=relative, cosine=cosine, agreement=agreement,
                       accuracy=_accuracy(actual, y), keras_accuracy=_accuracy(expected, y), criterion=criterion,
                       passed=bool(passed))


def _non_finite(expected: np.ndarray, actual: np.ndarray) -> str:
    """'' when every value is finite; else which side has how many NaN / infinite values."""
    counts = [(what, int(values.size - np.count_nonzero(np.isfinite(values))))
              for what, values in (("the artifact", actual), ("the Keras model", expected))]
    return "; ".join(f"{what} outputs {count:,} non-finite values (NaN or infinity) of {values.size:,}"
                     for (what, count), values in zip(counts, (actual, expected)) if count)


def verify_keras(model, path, x: np.ndarray, y: np.ndarray | None = None, *, tolerance: Tolerance = Tolerance(),
                 inputs: str = "held-out samples", original=None, safe_mode: bool = True,
                 expected: list[np.ndarray] | None = None) -> Verification:
    """A saved .keras file, loaded back through sepconv's loader, must compute what `model` computes.

    safe_mode=False only when the model was loaded that way (its Lambda layers are trusted). original and expected:
    as for `verify`."""
    reloaded = load(path, safe_mode=safe_mode)
    return compare_outputs(predict_keras(model, x) if expected is None else expected, predict_keras(reloaded, x),
                           [t.name for t in reloaded.outputs], x, y, quantized=False, quantize="none",
                           tolerance=tolerance, inputs=inputs, original=original, artifact=str(path))
