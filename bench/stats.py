"""Summary statistics over seeds: mean with a t confidence interval, Welch's t-test, verdicts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

LEVEL = 0.95
# A reported figure within this many accuracy points of the suite's interval counts as reproduced:
# one point absorbs the rounding of the sources and the run-to-run noise a single reported seed hides.
TOLERANCE = 0.01
VERDICTS = ("reproduced", "above", "below", "no runs")


@dataclass(frozen=True)
class Interval:
    n: int
    mean: float
    low: float  # nan with fewer than two values
    high: float
    sd: float
    clipped: bool = False  # the t interval crossed a bound of the values (0 or 1 for an accuracy) and was cut there

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def mean_ci(values: Sequence[float], level: float = LEVEL, bounds: tuple[float, float] | None = None) -> Interval:
    """Mean and two-sided t interval over the seeds (sample sd, n - 1 degrees of freedom).

    `bounds`: the range the quantity can take. A t interval of a few seeds can reach past it
    (an accuracy of 4 % over two seeds: [-2 %, 11 %]); it is cut at the bound and marked
    `clipped`. The cut loses no coverage: the true mean lies within the bounds, so it lies in
    the cut interval exactly when it lies in the whole one.
    """
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        nan = math.nan
        return Interval(0, nan, nan, nan, nan)
    mean = float(x.mean())
    if n < 2:
        return Interval(1, mean, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is None or bounds[0] <= low <= high <= bounds[1]:
        return Interval(n, mean, low, high, sd)
    return Interval(n, mean, max(low, bounds[0]), min(high, bounds[1]), sd, clipped=True)


ACCURACY = (0.0, 1.0)


def accuracy_ci(values: Sequence[float], level: float = LEVEL) -> Interval:
    """`mean_ci` of accuracies (fractions): the interval kept within [0, 1]."""
    return mean_ci(values, level, bounds=ACCURACY)


def t_band(values: Sequence[float]) -> tuple[float, float]:
    """(low, high) of the 95 % t interval, for seaborn's `errorbar=`; no band for one value."""
    ci = mean_ci(values)
    return (ci.low, ci.high) if ci.n >= 2 else (ci.mean, ci.mean)


@dataclass(frozen=True)
class Welch:
    t: float
    df: float
    p: float
    mean_a: float
    mean_b: float
    n_a: int
    n_b: int


def welch(a: Sequence[float], b: Sequence[float]) -> Welch | None:
    """Welch's unequal-variance t-test of mean(a) = mean(b); None with fewer than two values a side."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None
    res = stats.ttest_ind(a, b, equal_var=False)
    return Welch(float(res.statistic), float(res.df), float(res.pvalue), float(a.mean()), float(b.mean()), len(a), len(b))


def verdict(reported: float, ci: Interval, tolerance: float = TOLERANCE) -> str:
    """Where the suite stands against a reported figure.

    reproduced: the reported figure lies in the suite's 95 % interval widened by `tolerance` on
    each side (with a single seed: within `tolerance` of it); above / below: the widened interval
    lies wholly above / below the reported figure. The interval is `ci` as it is printed, clipped
    at a bound when it was.
    """
    if ci.n == 0:
        return "no runs"
    low, high = (ci.low, ci.high) if ci.n >= 2 else (ci.mean, ci.mean)
    if reported < low - tolerance:
        return "above"
    if reported > high + tolerance:
        return "below"
    return "reproduced"
