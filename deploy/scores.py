"""Top-1 scoring, numpy only, one implementation for both sides (conversion, verification, recovery, bench-model):
the class a classifier's output picks for each sample, and the share of samples on which two sets of classes agree
(accuracy against labels, agreement against another model's classes)."""

from __future__ import annotations

import numpy as np


def top1(output) -> np.ndarray:
    """The class each row of a classifier's output (samples x classes) picks."""
    return np.argmax(np.asarray(output), axis=-1)


def class_labels(y) -> np.ndarray:
    """Labels as one class index per sample: one-hot rows become their class; anything else is flattened."""
    y = np.asarray(y)
    return np.argmax(y, axis=1) if y.ndim == 2 and y.shape[1] > 1 else y.reshape(-1)


def hit_rate(predicted, truth) -> float:
    """The share (0..1) of samples whose class in `predicted` equals the one in `truth`."""
    return float(np.mean(np.asarray(predicted) == np.asarray(truth)))


def percent(value) -> str:
    """A share as a table cell: "" for None."""
    return "" if value is None else f"{value:.2%}"
