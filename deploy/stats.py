"""Latency statistics, numpy only: percentiles interpolated linearly (numpy's default, as `benchmark_model` and
`onnxruntime_perf_test` report them) and a distribution-free confidence interval for the median.

The median's interval uses order statistics: the number of samples below the true median is Binomial(n, 1/2), so
the sorted samples at ranks n/2 -/+ z*sqrt(n)/2 (z = 1.96 for 95%) bracket it without assuming any distribution -
latencies are skewed and multi-modal, so a mean +- t*std interval would be wrong.
"""

from __future__ import annotations

import math

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
