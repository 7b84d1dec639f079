"""The ablation tables: each variant of an experiment's ablation beside the recipe's runs.

A trained variant's runs are the cells of its config hash, compared with the recipe's runs by
Welch's t (independent seeds). An evaluation-only variant trains nothing: its figure is the
recipe runs' `final_<metric>/<key>-<value>`, measured again on each run's own weights, so it is
compared with the same runs' `final_<metric>` (logged at the same last epoch) by the paired
t-test, and the row shows that baseline. The reported figure stays in each table as a reference
row, and one sentence says what closes the gap to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from bench import ablation, stats
from bench.report.summary import Row, Summary

WHAT = {"test_acc": "test accuracy", "train_acc": "train accuracy"}


@dataclass(frozen=True)
class Line:
    """One row of an ablation table: the recipe, a variant, or the reported figure."""

    variant: str
    label: str
    kind: str
    source: str
    metric: str
    interval: stats.Interval
    difference: stats.Difference | None  # None for the recipe, the reported row and a variant of the recipe's config
    verdict: str
    same_as: str | None = None
    studies: tuple[str, ...] = ()  # Optuna studies tuned on this variant's config
    baseline: stats.Interval | None = None  # the recipe runs' own figures an evaluation-only variant is paired with

    @property
    def is_variant(self) -> bool:
        return self.variant not in (ablation.RECIPE, REPORTED)


REPORTED = "reported"
NO_RECIPE = "no recipe runs to compare with"


@dataclass(frozen=True)
class Table:
    experiment: str
    profile: str
    reported: float | None  # the reported final test accuracy
    recipe: stats.Interval
    lines: list[Line]
    sentence: str
    why_not_comparable: str | None = None  # the recipe row's: why its figures are not the reported recipe's
    error: str | None = None  # why the ablation is invalid under the profile: shown in place of the table

    @property
    def shown(self) -> bool:
        """Whether any variant has figures beyond the recipe's own (else the table says nothing),
        or the ablation is invalid (the section says why)."""
        return self.error is not None or any(
            line.is_variant and line.interval.n > 0 and line.same_as != ablation.RECIPE for line in self.lines
        )


def kind_text(variant: ablation.Variant) -> str:
    if variant.name == ablation.RECIPE:
        return "reference"
    value = "standard value" if variant.ablation is None else ablation.KINDS[variant.ablation.kind].removeprefix("the ")
    return f"{variant.kind}, {value}"


def not_run(experiment: str, profile: str) -> str:
    return f"not run: `bench run {experiment} --ablate --profile {profile}`"


def _accuracies(runs: pd.DataFrame, column: str) -> pd.Series:
    return runs[column].dropna() if column in runs else pd.Series(dtype=float)


def _pairs(runs: pd.DataFrame, metrics: pd.DataFrame, own: str, extra: str) -> pd.DataFrame:
    """The runs' final `own` and `extra` figures (final_<metric> columns), for the runs that
    logged both at the same last epoch: a run stopped between the two passes measured different
    weights. Runs from a bench that did not measure `extra` are left out."""
    columns = [f"final_{own}", f"final_{extra}"]
    if not set(columns) <= set(runs):
        return pd.DataFrame(columns=columns)
    mine = metrics[metrics.run_id.isin(runs.run_id) & metrics.metric.isin([own, extra])]
    last = mine.groupby(["run_id", "metric"]).epoch.max().unstack()
    same = last.index[last[own] == last[extra]] if {own, extra} <= set(last) else []
    return runs[runs.run_id.isin(same)][columns].dropna()


def _line(
    variant: ablation.Variant,
    recipe: Row,
    by_hash: dict[str, pd.DataFrame],
    experiment: str,
    profile: str,
    studies: dict[str, list[str]],
    metrics: pd.DataFrame,
) -> Line:
    common = dict(
        variant=variant.name,
        label=variant.label,
        kind=kind_text(variant),
        source=variant.source,
        metric=variant.metric,
        same_as=variant.same_as,
    )
    base = _accuracies(recipe.runs, "final_test_acc")
    tuned = tuple(sorted(studies.get(variant.config_hash, []))) if variant.kind == ablation.TRAINED else ()
    if variant.name == ablation.RECIPE:
        return Line(**common, interval=stats.accuracy_ci(base), difference=None, verdict="reference", studies=tuned)
    what = WHAT.get(variant.metric, variant.metric)
    if variant.kind == ablation.EVALUATION_ONLY and variant.same_as == ablation.RECIPE:
        return Line(
            **common,
            interval=stats.accuracy_ci(_accuracies(recipe.runs, f"final_{variant.metric}")),
            difference=None,
            verdict="the recipe measures this way already: its figures are the recipe's",
        )
    if variant.kind == ablation.EVALUATION_ONLY:
        return _paired_line(variant, recipe, common, experiment, profile, metrics)
    if variant.same_as == ablation.RECIPE:  # the recipe's studies are the recipe row's, not this one's
        return Line(
            **common,
            interval=stats.accuracy_ci(base),
            difference=None,
            verdict="trains the recipe's config: its runs are the recipe's",
        )
    values = _accuracies(by_hash.get(variant.config_hash, recipe.runs.iloc[0:0]), "final_test_acc")
    if values.empty:
        return Line(
            **common,
            interval=stats.accuracy_ci(values),
            difference=None,
            studies=tuned,
            verdict=not_run(experiment, profile),
        )
    if base.empty:
        return Line(**common, interval=stats.accuracy_ci(values), difference=None, studies=tuned, verdict=NO_RECIPE)
    diff = stats.welch_difference(base, values)
    verdict = stats.effect_verdict(diff, what)
    if variant.same_as:
        verdict = f"same config as {variant.same_as}; {verdict}"
    return Line(**common, interval=stats.accuracy_ci(values), difference=diff, verdict=verdict, studies=tuned)


def _paired_line(
    variant: ablation.Variant, recipe: Row, common: dict, experiment: str, profile: str, metrics: pd.DataFrame
) -> Line:
    """An evaluation-only variant's line, by the paired t-test."""
    what = WHAT.get(variant.metric, variant.metric)
    # The same runs measured two ways, against their own figure of the metric (train_acc for
    # the re-measure switch), which the recipe row (test_acc, every run) does not show.
    pairs = _pairs(recipe.runs, metrics, variant.metric, variant.ablation.metric_name())
    if pairs.empty:
        verdict = (
            not_run(experiment, profile)
            if recipe.runs.empty
            else f"not measured: the recipe's runs do not log `{variant.ablation.metric_name()}` (an older bench)"
        )
        return Line(**common, interval=stats.accuracy_ci([]), difference=None, verdict=verdict)
    own, column = pairs.columns
    diff = stats.paired_difference(pairs[own], pairs[column])
    return Line(
        **common,
        interval=stats.accuracy_ci(pairs[column]),
        difference=diff,
        verdict=stats.effect_verdict(diff, what),
        baseline=stats.accuracy_ci(pairs[own]),
    )


def _reported_line(recipe: Row) -> Line:
    value = recipe.figures["final_test_acc"]
    values = [] if value is None else [value]
    return Line(
        REPORTED,
        recipe.reported.label,
        "reference",
        recipe.reported.curves_source,
        "test_acc",
        stats.mean_ci(values),
        None,
        "-",
    )


def _toward(diff: stats.Difference, direction: int) -> tuple[float, float] | None:
    """The interval of a move toward the reported figure (the difference times `direction`, the
    sign of the gap) when it lies wholly above 0, at every seed without spread; else None."""
    if not diff.has_interval:
        move = direction * diff.mean
        return (move, move) if diff.no_spread and move > 0 else None
    low, high = sorted((direction * diff.low, direction * diff.high))
    return (low, high) if low > 0 else None


def _closes(line: Line, direction: int, gap: float) -> str:
    """How much of the gap a variant closes, or that it overshoots it (its near end beyond the gap)."""
    low, high = _toward(line.difference, direction)
    move = direction * line.difference.mean
    size = (
        f"{stats.points(move)} pt at every seed"
        if not line.difference.has_interval
        else f"{stats.points(move)} pt [{stats.points(low)}, {stats.points(high)}]"
    )
    if low > gap:
        return f"{line.variant} overshoots it ({size}, the gap is {stats.points(gap)} pt)"
    if high >= gap:
        return f"{line.variant} may close all of it ({size})"
    return f"{line.variant} closes {size} of it"


def sentence(recipe: Row, lines: list[Line], profile: str) -> str:
    """What closes the gap between the recipe and the reported figure, as far as the data say."""
    reported = recipe.figures["final_test_acc"]
    if reported is None:
        return "No reported final figure to close a gap to."
    target = f"the reported {100 * reported:.2f} %"
    if recipe.runs.empty:
        return f"The recipe has no finished runs of profile `{profile}`: nothing to compare with {target} yet."
    if recipe.why_not_comparable:
        return (
            f"Profile `{profile}` is not the reported recipe on the full dataset ({recipe.why_not_comparable}): "
            f"the differences show what each switch does here, and the figures are not comparable to {target}."
        )
    if recipe.verdict == "reproduced":
        return f"The recipe already reproduces {target}."
    gap = reported - recipe.final.mean
    direction = 1 if gap > 0 else -1
    # A variant that trains another's config is that one again: counted once.
    tested = [
        l for l in lines if l.is_variant and l.metric == "test_acc" and l.difference is not None and not l.same_as
    ]
    toward = [l for l in tested if _toward(l.difference, direction)]
    # Reproducing asks for a move toward the figure that the data tell apart from noise, not an
    # interval so wide (n = 2: t = 12.7) that it holds the figure by itself.
    reaching = [l for l in toward if l.interval.n >= 2 and stats.verdict(reported, l.interval) == "reproduced"]
    parts = [f"The recipe is {stats.points(abs(gap))} pt {'below' if gap > 0 else 'above'} {target}"]
    if toward:
        parts += [_closes(l, direction, abs(gap)) for l in toward]
    else:
        variants = [l for l in lines if l.is_variant]
        missing = sum(l.verdict.startswith("not run") for l in variants)
        parts.append(
            f"no variant moves toward it at n = {recipe.final.n}"
            + (f"; {missing} of {len(variants)} variants not run yet" if missing else "")
        )
    if reaching:
        names = ", ".join(f"{l.variant} (n = {l.interval.n})" for l in reaching)
        parts.append(
            f"{names} reproduce{'s' if len(reaching) == 1 else ''} it "
            f"(within {100 * stats.TOLERANCE:.0f} pt of {'its interval' if len(reaching) == 1 else 'their intervals'})"
        )
    else:
        parts.append("no variant reaches it")
    return "; ".join(parts) + "."


def studies_by_hash(studies) -> dict[str, list[str]]:
    """Optuna study names by the config hash their search started from (`bench.base_config_hash`)."""
    out: dict[str, list[str]] = {}
    if studies is None:
        return out
    for name, study in sorted(studies.handles.items()):
        base = study.user_attrs.get("bench.base_config_hash")
        if base:
            out.setdefault(base, []).append(name)
    return out


def tables(summary: Summary, studies=None) -> list[Table]:
    """One table per experiment of the summary that has an ablation, in the summary's order."""
    tuned = studies_by_hash(studies)
    out = []
    for recipe in summary.recipe_rows:
        error = summary.ablation_errors.get(recipe.experiment)
        if error:
            out.append(
                Table(
                    recipe.experiment,
                    summary.profile,
                    recipe.figures["final_test_acc"],
                    recipe.final,
                    [],
                    "",
                    recipe.why_not_comparable,
                    error,
                )
            )
            continue
        variants = summary.ablations.get(recipe.experiment, [])
        if not variants:
            continue
        # A variant's row holds its runs under its config's earlier hash too (summarize merged them).
        by_hash = {r.config_hash: r.runs for r in summary.rows if r.experiment == recipe.experiment and not r.is_recipe}
        lines = [
            _line(v, recipe, by_hash, recipe.experiment, summary.profile, tuned, summary.metrics) for v in variants
        ]
        lines.insert(1, _reported_line(recipe))
        out.append(
            Table(
                recipe.experiment,
                summary.profile,
                recipe.figures["final_test_acc"],
                recipe.final,
                lines,
                sentence(recipe, lines, summary.profile),
                recipe.why_not_comparable,
            )
        )
    return out


def study_links(found: list[Table]) -> dict[str, str]:
    """Study name -> the ablation whose config it tuned (the first of variants that train the
    same config), for the tuning section. A study of the recipe itself is the ordinary case: not linked."""
    out: dict[str, str] = {}
    for t in found:
        for line in t.lines:
            if line.is_variant:
                for s in line.studies:
                    out.setdefault(s, f"ablation `{line.variant}` of `{t.experiment}` ({line.label})")
    return out
