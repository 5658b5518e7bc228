"""Never slower, said aloud: each verified artifact timed against the original model converted the same way.

After verification, every artifact a runtime runs (.tflite, .onnx) is timed in one interleaved bench-model run beside
the original Keras model exported to the same format, quantization, threads and XNNPACK setting, where the run's
latency is measured (this machine, or a device over deploy-model's SSH). The speed-up is the original's p50 over the
artifact's, with an interval from the two medians' 95% order-statistic intervals (stats.median_interval): the
original's low end over the artifact's high end, and its high end over the artifact's low end. That interval holds
both medians' uncertainty at once, so it is wider (more cautious) than a 95% interval of the ratio itself.

The verdict: "faster" when the whole interval is above 1, "slower" when it is all below 1, else "equal within noise".
A slower artifact is not shipped unless the user forced the separation (--rank / --energy): the run says so in one
line and ships the original in the same mode instead, verified like every artifact (staging.py does that). Before
that, a first "slower" is timed again for CONFIRM_FACTOR times as long, and the longer timing decides: on a shared
machine a short timing's interval can exclude what a longer one measures (the zoo's resnet_bn at K=1 said 0.62x,
0.60-0.65, in its run; 0.89x in a longer bench-model run: docs/benchmarks.md, seventh session). With --quantize
auto a quantized artifact is also compared with the original in float32 (original_quantize "none"), and float32
ships instead of one over 10% slower than that (staging.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from sepconv.deploy.timing import TimingOptions, describe_xnnpack, time_artifacts

CONFIRM_FACTOR = 3  # a first "slower" is timed again this many times as long (min_seconds and min_runs; module doc)

FASTER, EQUAL, SLOWER = "faster", "equal within noise", "slower"
MISPREDICTED = 0.5  # (measured - predicted) / measured above this: the table's timings are not this model's


@dataclass(frozen=True)
class Speed:
    """An artifact's measured speed against the original converted the same way (the manifest's and --json's
    `speed`, docs/manifest.md). shipped: "separated" (the artifact as separated), or "original" when the separated one
    was slower and the original, converted the same way, was shipped instead. predicted_ms / error: the latency
    table's prediction for the plan and (measured - predicted) / measured, when the table timed this format and
    mode."""

    artifact_ms: float
    artifact_ci95_ms: tuple[float, float]
    original_ms: float
    original_ci95_ms: tuple[float, float]
    speedup: float
    speedup_ci95: tuple[float, float]
    verdict: str
    shipped: str
    where: str
    device: str | None
    runtime: str
    threads: int
    xnnpack: bool | None
    format: str
    quantize: str
    predicted_ms: float | None = None
    error: float | None = None
    target_speedup: float | None = None  # what --target-latency / --target-speedup asked, as a speed-up
    first_speedup: float | None = None  # set when a first timing said "slower" and this longer one was made to
    # confirm it (staging.py): that first timing's speed-up; the fields above are the longer timing's
    original_quantize: str | None = None  # the original's mode when it is not the artifact's: --quantize auto times
    # a quantized artifact against the original in float32 too (staging.py)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def missed_target(self) -> bool:
        """The measured speed-up is under the target by more than its interval allows."""
        return self.target_speedup is not None and self.speedup_ci95[1] < self.target_speedup

    @property
    def mispredicted(self) -> bool:
        """The artifact took more than twice what the latency table predicted for it."""
        return self.error is not None and self.error > MISPREDICTED

    def interval(self) -> str:
        low, high = self.speedup_ci95
        return f"{self.speedup:.2f}x ({low:.2f}-{high:.2f})"

    def line(self, name) -> str:
        """One line for the terminal: the verdict, both medians, where and how they were measured."""
        return (f"{name}: {self.interval()} against the original {self.format} "
                f"{self.original_quantize or self.quantize} ({self.verdict}): "
                f"{self.artifact_ms:.4f} ms against {self.original_ms:.4f} ms p50, {self.where} ({self.device}, "
                f"{self.runtime}, {self.threads} thread(s), {describe_xnnpack(self.xnnpack)})"
                + (f"; the latency table predicted {self.predicted_ms:.4f} ms (error {self.error:+.1%})"
                   if self.predicted_ms is not None else ""))


def speedup_interval(original: tuple[float, float, float], artifact: tuple[float, float, float]) \
        -> tuple[float, tuple[float, float]]:
    """(speed-up, (low, high)) from each median and its 95% interval, given as (p50, low, high) in ms."""
    (o50, olow, ohigh), (a50, alow, ahigh) = original, artifact
    if min(o50, olow, a50, alow) <= 0:
        raise ValueError(f"latencies must be positive, got original {original} and artifact {artifact}")
    return o50 / a50, (olow / ahigh, ohigh / alow)


def verdict(interval: tuple[float, float]) -> str:
    low, high = interval
    return FASTER if low > 1.0 else SLOWER if high < 1.0 else EQUAL


def compare(artifact: Path, original: Path, *, where: str | None, timing: TimingOptions, fmt: str, quantize: str,
            say=None, original_quantize: str | None = None) -> Speed:
    """Time `artifact` and `original` (the same format; the same mode unless original_quantize says the original's)
    in one interleaved run; their Speed. say: progress for a device's set-up (its lines name the host); the harness's
    per-file lines (temporary names) are not passed on, the caller says the result."""
    say = say or (lambda stage, text: None)
    measured = time_artifacts([artifact, original], where, timing,
                              progress=lambda message: say("speed", message) if where else None)
    a, o = str(artifact), str(original)
    ratio, interval = speedup_interval((measured.p50_ms[o], *measured.ci95_ms[o]),
                                       (measured.p50_ms[a], *measured.ci95_ms[a]))
    device = measured.device.get("pi_model") or measured.device.get("cpu")
    return Speed(artifact_ms=round(measured.p50_ms[a], 5), artifact_ci95_ms=_rounded(measured.ci95_ms[a]),
                 original_ms=round(measured.p50_ms[o], 5), original_ci95_ms=_rounded(measured.ci95_ms[o]),
                 speedup=round(ratio, 3), speedup_ci95=(round(interval[0], 3), round(interval[1], 3)),
                 verdict=verdict(interval), shipped="separated", where=measured.where, device=device,
                 runtime=measured.runtime, threads=timing.threads, xnnpack=measured.xnnpack, format=fmt,
                 quantize=quantize, original_quantize=original_quantize)


def with_prediction(speed: Speed, predicted_ms: float | None, target_speedup: float | None = None) -> Speed:
    """`speed` with the latency table's prediction for the plan and its error against the measurement, and the
    speed-up the plan was asked to reach."""
    if predicted_ms is None:
        return speed
    return replace(speed, predicted_ms=round(predicted_ms, 5),
                   error=round((speed.artifact_ms - predicted_ms) / speed.artifact_ms, 4),
                   target_speedup=None if target_speedup is None else round(target_speedup, 4))


def _rounded(pair) -> tuple[float, float]:
    return round(float(pair[0]), 5), round(float(pair[1]), 5)
