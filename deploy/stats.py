"""Statistics, numpy only. Latency: percentiles interpolated linearly (numpy's default, as `benchmark_model` and
`onnxruntime_perf_test` report them) and a distribution-free confidence interval for the median.

The median's interval uses order statistics: the number of samples below the true median is Binomial(n, 1/2), so
the sorted samples at ranks n/2 -/+ z*sqrt(n)/2 (z = 1.96 for 95%) bracket it without assuming any distribution -
latencies are skewed and multi-modal, so a mean +- t*std interval would be wrong.

Shares (top-1 agreement, accuracy): `share_bound`, a one-sided Wilson score bound, what a verdict on a few hundred
images can claim (verification's `Tolerance.confidence`).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

PERCENTILES = (50, 90, 95, 99)
Z95 = 1.959963984540054


def summarize(samples_s, batch: int = 1) -> dict:
    """count, mean, std, min, p50, p90, p95, p99, max (milliseconds), ci95_p50 [low, high] (ms), inferences/s."""
    x = np.asarray(samples_s, dtype=np.float64) * 1000.0
    if x.size == 0:
        raise ValueError("no samples")
    p = np.percentile(x, PERCENTILES)
    low, high = median_interval(x)
    return {
        "count": int(x.size),
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "min": float(x.min()),
        **{f"p{q}": float(v) for q, v in zip(PERCENTILES, p)},
        "max": float(x.max()),
        "ci95_p50": [low, high],
        "inferences_per_second": float(batch * x.size / (x.sum() / 1000.0)) if x.sum() > 0 else math.inf,
    }


def median_interval(x, z: float = Z95) -> tuple[float, float]:
    """The order-statistic confidence interval of the median (min and max when there are too few samples)."""
    ordered = np.sort(np.asarray(x, dtype=np.float64))
    n = ordered.size
    half = z * math.sqrt(n) / 2.0
    low = max(1, math.floor(n / 2.0 - half))  # 1-based ranks
    high = min(n, math.ceil(n / 2.0 + half) + 1)
    return float(ordered[low - 1]), float(ordered[high - 1])


def share_bound(hits: int, n: int, confidence: float, *, upper: bool) -> float:
    """The one-sided Wilson score bound at `confidence` (0 < confidence < 1) on the true share of which `hits` of `n`
    samples are a measurement: the share is below the upper bound (above the lower one) with that confidence. The
    Wilson bound, unlike the normal approximation p +- z*sqrt(p(1-p)/n), stays inside [0, 1] and stays honest at 0 or
    n hits (Brown, Cai & DasGupta 2001). n = 0 says nothing: 1.0 upper, 0.0 lower."""
    if n <= 0:
        return 1.0 if upper else 0.0
    z = NormalDist().inv_cdf(confidence)
    p = hits / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, max(0.0, (centre + spread if upper else centre - spread) / (1 + z * z / n)))
