"""Small statistics for the study: mean and standard error over seeds, Student-t quantiles and the
80% prediction interval of the training curves (no scipy)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Summary:
    """Mean, standard error of the mean (``nan`` below two values) and count of some per-seed values."""

    mean: float
    se: float
    n: int


def summarize(values: Sequence[float]) -> Summary:
    """Mean and standard error ``s / sqrt(n)`` with the sample standard deviation ``s`` (ddof = 1)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return Summary(math.nan, math.nan, 0)
    se = float(data.std(ddof=1) / math.sqrt(data.size)) if data.size > 1 else math.nan
    return Summary(float(data.mean()), se, int(data.size))


def student_t_cdf(x: float, df: float, intervals: int = 4000) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom: Simpson's rule on the density over [0, |x|]."""
    if df <= 0:
        raise ValueError(f"degrees of freedom df={df} must be > 0")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    b = abs(x)
    h = b / intervals
    odd = sum(density((2 * k - 1) * h) for k in range(1, intervals // 2 + 1))
    even = sum(density(2 * k * h) for k in range(1, intervals // 2))
    area = h / 3 * (density(0.0) + 4 * odd + 2 * even + density(b))
    return 0.5 + math.copysign(area, x)


def student_t_quantile(p: float, df: float, tol: float = 1e-10) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0 < p < 1:
        raise ValueError(f"probability p={p} must be in (0, 1)")
    if p < 0.5:
        return -student_t_quantile(1 - p, df, tol)
    high = 1.0
    while student_t_cdf(high, df) < p:
        high *= 2
    low = 0.0
    while high - low > tol * max(1.0, high):
        middle = (low + high) / 2
        if student_t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def prediction_interval(values: np.ndarray, coverage: float = 0.8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and two-sided ``coverage`` prediction interval of a new draw, column-wise over the rows (seeds):

    mean +/- t_{(1 + coverage) / 2, n - 1} * s * sqrt(1 + 1/n).

    With one row the interval collapses to the mean.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] == 0:
        raise ValueError(f"values must be a non-empty (seeds, points) array, got shape {data.shape}")
    n = data.shape[0]
    mean = data.mean(axis=0)
    if n < 2:
        return mean, mean.copy(), mean.copy()
    half = student_t_quantile((1 + coverage) / 2, n - 1) * data.std(axis=0, ddof=1) * math.sqrt(1 + 1 / n)
    return mean, mean - half, mean + half
