"""Means, intervals, Welch's test and verdicts against scipy and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from bench import stats


def test_mean_ci_matches_scipy_t_interval():
    x = [0.61, 0.64, 0.62, 0.66]
    ci = stats.mean_ci(x)
    low, high = sps.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=sps.sem(x))
    assert ci.n == 4
    assert ci.mean == pytest.approx(np.mean(x))
    assert (ci.low, ci.high) == pytest.approx((low, high))
    assert ci.sd == pytest.approx(np.std(x, ddof=1))


def test_mean_ci_of_two_values_by_hand():
    # t(0.975, 1) = 12.7062; sd of (0.5, 0.7) = 0.141421; half width = 12.7062 * 0.141421 / sqrt(2) = 1.27062
    ci = stats.mean_ci([0.5, 0.7])
    assert ci.mean == pytest.approx(0.6)
    assert ci.half_width == pytest.approx(1.270620, rel=1e-5)


def test_mean_ci_with_one_or_no_values_has_no_interval():
    one = stats.mean_ci([0.3])
    assert (one.n, one.mean) == (1, 0.3) and math.isnan(one.low) and math.isnan(one.high)
    assert stats.mean_ci([]).n == 0 and math.isnan(stats.mean_ci([]).mean)
    assert stats.t_band([0.3]) == (0.3, 0.3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=12))
def test_interval_contains_the_mean_and_matches_scipy(values):
    ci = stats.mean_ci(values)
    assert ci.low <= ci.mean + 1e-12 and ci.mean <= ci.high + 1e-12
    if np.std(values) > 1e-9:
        low, high = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
        assert (ci.low, ci.high) == pytest.approx((low, high), abs=1e-9)


def test_welch_matches_scipy_unequal_variances():
    a, b = [0.60, 0.62, 0.61, 0.65], [0.66, 0.70, 0.69]
    w = stats.welch(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert (w.t, w.p) == pytest.approx((ref.statistic, ref.pvalue))
    # Welch-Satterthwaite degrees of freedom by hand.
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert w.df == pytest.approx(df)
    assert (w.n_a, w.n_b) == (4, 3) and w.mean_b == pytest.approx(np.mean(b))


def test_welch_needs_two_values_a_side():
    assert stats.welch([0.5], [0.6, 0.7]) is None
    assert stats.welch([0.5, 0.6], []) is None


@pytest.mark.parametrize(
    "reported, values, expected",
    [
        (0.6331, [0.62, 0.63, 0.64], "reproduced"),  # inside the interval
        (0.6331, [0.60, 0.605, 0.61], "below"),  # interval ends at 0.6174; + 1 pt = 0.6274 < 0.6331
        (0.50, [0.60, 0.605, 0.61], "above"),
        (0.6331, [0.6240], "reproduced"),  # one seed: 0.91 pt away, within the 1-pt tolerance
        (0.6331, [0.6220], "below"),  # one seed: 1.11 pt below
        (0.6331, [0.6440], "above"),
        (0.6331, [], "no runs"),
    ],
)
def test_verdicts(reported, values, expected):
    assert stats.verdict(reported, stats.mean_ci(values)) == expected


def test_verdict_tolerance_widens_the_interval():
    ci = stats.mean_ci([0.60, 0.605, 0.61])  # [0.5926, 0.6174]
    assert stats.verdict(0.625, ci) == "reproduced"  # 0.76 pt above the interval
    assert stats.verdict(0.625, ci, tolerance=0.0) == "below"


def test_accuracy_interval_stays_within_0_and_1_and_says_so():
    # Two seeds at 2.00 % and 6.66 %: the t interval is 4.33 % +- 29.6 points, below 0 % on its face.
    raw = stats.mean_ci([0.02, 0.0666])
    assert raw.low < 0 and not raw.clipped
    ci = stats.accuracy_ci([0.02, 0.0666])
    assert ci.clipped and ci.low == 0.0 and ci.high == pytest.approx(raw.high) and ci.mean == pytest.approx(raw.mean)
    top = stats.accuracy_ci([0.97, 0.995])
    assert top.clipped and top.high == 1.0 and top.low == pytest.approx(stats.mean_ci([0.97, 0.995]).low)
    inside = stats.accuracy_ci([0.61, 0.64, 0.62, 0.66])
    assert not inside.clipped and (inside.low, inside.high) == pytest.approx(
        (stats.mean_ci([0.61, 0.64, 0.62, 0.66]).low, stats.mean_ci([0.61, 0.64, 0.62, 0.66]).high)
    )


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=12), st.floats(0, 1))
def test_accuracy_interval_is_within_bounds_and_the_verdict_follows_it(values, reported):
    ci = stats.accuracy_ci(values)
    assert 0.0 <= ci.low <= ci.mean + 1e-12 and ci.mean <= ci.high + 1e-12 and ci.high <= 1.0
    # The verdict is read off the interval as printed, widened by the tolerance.
    expected = (
        "above"
        if reported < ci.low - stats.TOLERANCE
        else "below"
        if reported > ci.high + stats.TOLERANCE
        else "reproduced"
    )
    assert stats.verdict(reported, ci) == expected


# --- differences from the recipe ----------------------------------------------------------------


def test_welch_difference_matches_scipy_and_the_hand_computed_interval():
    a, b = [0.60, 0.62, 0.61, 0.65], [0.66, 0.70, 0.69]
    d = stats.welch_difference(a, b)
    ref = sps.ttest_ind(b, a, equal_var=False)
    assert (d.n_a, d.n_b, d.test) == (4, 3, "Welch's t")
    assert d.mean == pytest.approx(np.mean(b) - np.mean(a))
    assert d.p == pytest.approx(ref.pvalue)
    # By hand: Welch-Satterthwaite df, then mean difference +- t(0.975, df) * its standard error.
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert (d.low, d.high) == pytest.approx((d.mean - half, d.mean + half))
    assert d.low > 0 and d.p < 0.05


def test_paired_difference_matches_scipy_and_the_hand_computed_interval():
    a, b = [0.50, 0.60, 0.70], [0.52, 0.625, 0.72]  # the same runs measured two ways
    d = stats.paired_difference(a, b)
    ref = sps.ttest_rel(b, a)
    diffs = np.subtract(b, a)
    half = sps.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / math.sqrt(3)
    assert (d.mean, d.p, d.test) == (pytest.approx(diffs.mean()), pytest.approx(ref.pvalue), "paired t")
    assert (d.low, d.high) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    # Welch on the same numbers sees the seeds' spread (0.1) and no effect; pairing removes it.
    assert stats.welch_difference(a, b).low < 0 < d.low
    with pytest.raises(ValueError):
        stats.paired_difference([0.5], [0.5, 0.6])


def test_effect_verdict_follows_the_interval_of_the_difference():
    up = stats.welch_difference([0.60, 0.62, 0.61, 0.65], [0.66, 0.70, 0.69])
    assert (
        stats.effect_verdict(up) == f"raises test accuracy by 6.3 pt [{stats.points(up.low)}, {stats.points(up.high)}]"
    )
    down = stats.welch_difference([0.66, 0.70, 0.69], [0.60, 0.62, 0.61])
    assert stats.effect_verdict(down, "train accuracy").startswith("lowers train accuracy by 7.3 pt [")
    assert 0 < -down.high < -down.low  # printed as a positive size: [smallest, largest]
    flat = stats.welch_difference([0.60, 0.64, 0.62], [0.61, 0.62, 0.66])
    assert flat.low < 0 < flat.high and flat.p > 0.05
    assert (
        stats.effect_verdict(flat)
        == f"no effect detected at n = 3 (+1.0 pt [{stats.points(flat.low)}, {stats.points(flat.high)}])"
    )
    uneven = stats.welch_difference([0.60, 0.64, 0.62], [0.61, 0.65])
    assert stats.effect_verdict(uneven).startswith("no effect detected at n = 3 and 2 (+1.0 pt [")


def test_a_significant_difference_whose_groups_intervals_overlap():
    a, b = [0.600, 0.610, 0.605, 0.615, 0.600, 0.610], [0.612, 0.622, 0.617, 0.627, 0.612, 0.622]
    ca, cb = stats.accuracy_ci(a), stats.accuracy_ci(b)
    assert cb.low < ca.high  # the groups' own intervals overlap ...
    d = stats.welch_difference(a, b)
    assert d.p < 0.05 and d.low > 0  # ... yet the difference excludes zero
    assert stats.effect_verdict(d).startswith("raises test accuracy by 1.2 pt [")


def test_effect_verdict_at_the_edges():
    assert stats.effect_verdict(stats.welch_difference([0.6, 0.61], [])) == "not run"
    one = stats.welch_difference([0.60, 0.62], [0.65])
    assert not one.has_interval and math.isnan(one.p)
    assert (
        stats.effect_verdict(one) == "+4.0 pt at n = 2 and 1: one seed gives no interval; more seeds are needed to tell"
    )
    pair = stats.paired_difference([0.6], [0.63])
    assert stats.effect_verdict(pair).startswith("+3.0 pt at n = 1: one seed gives no interval")
    same = stats.welch_difference([0.62, 0.62], [0.62, 0.62])
    assert same.no_spread and stats.effect_verdict(same) == "no difference at any seed (n = 2)"
    # A constant difference whose float rounding differs per pair still has no spread.
    steady = stats.paired_difference([0.60, 0.61, 0.62], [0.62, 0.63, 0.64])
    assert steady.no_spread and not steady.has_interval
    assert stats.effect_verdict(steady) == "raises test accuracy by 2.0 pt at every seed (no spread, no interval)"
    lower = stats.welch_difference([0.64, 0.64], [0.62, 0.62])
    assert stats.effect_verdict(lower) == "lowers test accuracy by 2.0 pt at every seed (no spread, no interval)"


def test_the_difference_interval_is_cut_at_one_and_says_so():
    d = stats.welch_difference([0.0, 0.02], [0.8, 0.9])  # two seeds: t(1) = 12.7 stretches it past +1
    assert d.clipped and d.high == 1.0 and 0 < d.low < 1.0
    assert stats.effect_verdict(d) == "raises test accuracy by 84.0 pt [29.5, 100.0], interval cut at the bound"


@pytest.mark.parametrize("difference", [stats.welch_difference, stats.paired_difference])
def test_differences_reject_nan(difference):
    with pytest.raises(ValueError, match="NaN"):
        difference([0.5, 0.6, math.nan], [0.5, 0.6, 0.7])


def test_points_never_print_a_negative_zero():
    assert stats.points(-0.0004) == "0.0" and stats.points(0.0004) == "0.0" and stats.points(-0.0006) == "-0.1"
    assert stats.points(-0.00001, 2, sign=True) == "+0.00" and stats.points(0.0123, 2, sign=True) == "+1.23"
    d = stats.welch_difference([0.50, 0.52, 0.51], [0.5099, 0.50, 0.52])  # -0.003 pt
    assert "-0.0 pt" not in stats.effect_verdict(d) and "(+0.0 pt [" in stats.effect_verdict(d)


def test_a_group_whose_seeds_agree_exactly_raises_no_warning():
    """Accuracies are counts: two seeds at exactly 0.5 are a spread of zero, and scipy's warning of
    precision loss on them would reach the report's console."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diff = stats.welch_difference([0.5, 0.5, 0.5], [0.52, 0.55, 0.51])
    assert diff.has_interval and diff.mean == pytest.approx(0.0266666, abs=1e-6)
