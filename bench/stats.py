"""Summary statistics over seeds: mean with a t confidence interval, Welch's t-test, verdicts."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

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


@contextlib.contextmanager
def _seeds_may_agree():
    """scipy warns of precision loss where one group's values are all equal: a spread of zero
    there is exact (accuracies are counts), and the t-tests take it as it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Precision loss occurred in moment calculation", category=RuntimeWarning
        )
        yield


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
    with _seeds_may_agree():
        res = stats.ttest_ind(a, b, equal_var=False)
    return Welch(
        float(res.statistic), float(res.df), float(res.pvalue), float(a.mean()), float(b.mean()), len(a), len(b)
    )


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


# Below this spread two accuracies count as equal: they are counts over a test set (k / 10000),
# so seeds that agree differ only by float rounding (0.63 - 0.61 != 0.62 - 0.60 in binary).
NO_SPREAD = 1e-12
DIFFERENCE_BOUNDS = (-1.0, 1.0)  # a difference of two accuracies


@dataclass(frozen=True)
class Difference:
    """mean(b) - mean(a) with its 95 % interval and the p-value of the test that gave it."""

    n_a: int
    n_b: int
    mean: float  # nan when a side has no values
    low: float  # nan with no interval (fewer than two values a side, or no spread)
    high: float
    p: float
    test: str  # "Welch's t" or "paired t"
    no_spread: bool = False  # every value equal (Welch) or every pair's difference equal (paired)
    clipped: bool = False  # the interval reached past [-1, 1] and was cut there

    @property
    def has_interval(self) -> bool:
        return not math.isnan(self.low)


def _difference(n_a: int, n_b: int, mean: float, spread: float, test: str, run) -> Difference:
    nan = math.nan
    if min(n_a, n_b) < 2 or spread <= NO_SPREAD:
        return Difference(n_a, n_b, mean, nan, nan, nan, test, no_spread=min(n_a, n_b) >= 2)
    with _seeds_may_agree():
        res = run()
        ci = res.confidence_interval(LEVEL)
    low, high = float(ci.low), float(ci.high)
    clipped = low < DIFFERENCE_BOUNDS[0] or high > DIFFERENCE_BOUNDS[1]
    low, high = max(low, DIFFERENCE_BOUNDS[0]), min(high, DIFFERENCE_BOUNDS[1])
    return Difference(n_a, n_b, mean, low, high, float(res.pvalue), test, clipped=clipped)


def _finite(*groups: np.ndarray) -> None:
    """A NaN would turn the mean and scipy's test into NaN silently: the caller drops missing values."""
    if any(np.isnan(g).any() for g in groups):
        raise ValueError("the values hold NaN: drop the runs that lack the measure first")


def welch_difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    """mean(b) - mean(a) of two independent groups of seeds: Welch's t-test and its interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    _finite(a, b)
    mean = float(b.mean() - a.mean()) if len(a) and len(b) else math.nan
    spread = max(np.ptp(a), np.ptp(b)) if len(a) and len(b) else 0.0
    return _difference(len(a), len(b), mean, spread, "Welch's t", lambda: stats.ttest_ind(b, a, equal_var=False))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    """mean(b - a) of values measured in pairs (the same run's weights measured two ways): the
    paired t-test and its interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"paired values need as many of each: {len(a)} and {len(b)}")
    _finite(a, b)
    d = b - a
    mean = float(d.mean()) if len(d) else math.nan
    return _difference(
        len(a), len(b), mean, float(np.ptp(d)) if len(d) else 0.0, "paired t", lambda: stats.ttest_rel(b, a)
    )


def points(x: float, digits: int = 1, sign: bool = False) -> str:
    """A fraction in points with `digits` decimals: 0.021 -> "2.1" ("+2.1" with `sign`). What
    rounds to zero prints as "0.0" ("+0.0"), never "-0.0"."""
    text = f"{100 * x:{'+' if sign else ''}.{digits}f}"
    return f"{0.0:{'+' if sign else ''}.{digits}f}" if float(text) == 0 else text


def effect_verdict(diff: Difference, what: str = "test accuracy") -> str:
    """What the difference says, in words, from its interval (it excludes 0 exactly when p < 0.05),
    never from whether the two groups' own intervals overlap."""
    if diff.n_a == 0 or diff.n_b == 0:
        return "not run"
    n = f"n = {diff.n_a}" if diff.n_a == diff.n_b else f"n = {diff.n_a} and {diff.n_b}"
    signed = f"{points(diff.mean, sign=True)} pt"
    if min(diff.n_a, diff.n_b) < 2:
        return f"{signed} at {n}: one seed gives no interval; more seeds are needed to tell"
    if diff.no_spread:
        if abs(diff.mean) <= NO_SPREAD:
            return f"no difference at any seed ({n})"
        verb = "raises" if diff.mean > 0 else "lowers"
        return f"{verb} {what} by {points(abs(diff.mean))} pt at every seed (no spread, no interval)"
    cut = ", interval cut at the bound" if diff.clipped else ""
    if diff.low > 0:
        return f"raises {what} by {points(diff.mean)} pt [{points(diff.low)}, {points(diff.high)}]{cut}"
    if diff.high < 0:
        return f"lowers {what} by {points(-diff.mean)} pt [{points(-diff.high)}, {points(-diff.low)}]{cut}"
    return f"no effect detected at {n} ({signed} [{points(diff.low)}, {points(diff.high)}]{cut})"
