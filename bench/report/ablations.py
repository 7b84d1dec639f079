"""The ablation tables: each variant of an experiment's ablation beside the recipe's runs.

A trained variant's runs are the cells of its config hash, compared with the recipe's runs by
Welch's t (independent seeds). An evaluation-only variant trains nothing: its figure is the
recipe runs' `final_<metric>/<key>-<value>`, measured again on each run's own weights, so it is
compared with the same runs' `final_<metric>` by the paired t-test. The reported figure stays in
each table as a reference row, and one sentence says what closes the gap to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from bench import ablation, stats
from bench.report.markdown import table
from bench.report.summary import Row, Summary

WHAT = {"test_acc": "test accuracy", "train_acc": "train accuracy"}
COLUMNS = [
    "experiment", "variant", "label", "kind", "source", "metric", "seeds", "mean", "low", "high",
    "difference", "difference_low", "difference_high", "p", "test", "verdict", "same_as", "studies",
]


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

    @property
    def shown(self) -> bool:
        """Whether any variant has figures beyond the recipe's own: else the table says nothing."""
        return any(line.is_variant and line.interval.n > 0 and line.same_as != ablation.RECIPE for line in self.lines)


def kind_text(variant: ablation.Variant) -> str:
    if variant.name == ablation.RECIPE:
        return "reference"
    value = "standard value" if variant.ablation is None else ablation.KINDS[variant.ablation.kind].removeprefix("the ")
    return f"{variant.kind}, {value}"


def not_run(experiment: str, profile: str) -> str:
    return f"not run: `bench run {experiment} --ablate --profile {profile}`"


def _accuracies(runs: pd.DataFrame, column: str) -> pd.Series:
    return runs[column].dropna() if column in runs else pd.Series(dtype=float)


def _line(variant: ablation.Variant, recipe: Row, by_hash: dict[str, pd.DataFrame], experiment: str, profile: str,
          studies: dict[str, list[str]]) -> Line:
    common = dict(variant=variant.name, label=variant.label, kind=kind_text(variant), source=variant.source,
                  metric=variant.metric, same_as=variant.same_as)
    base = _accuracies(recipe.runs, "final_test_acc")
    tuned = tuple(sorted(studies.get(variant.config_hash, []))) if variant.kind == ablation.TRAINED else ()
    if variant.name == ablation.RECIPE:
        return Line(**common, interval=stats.accuracy_ci(base), difference=None, verdict="reference", studies=tuned)
    what = WHAT.get(variant.metric, variant.metric)
    if variant.kind == ablation.EVALUATION_ONLY:
        # The same runs measured two ways; runs from a bench that did not measure it are left out.
        column, own = f"final_{variant.ablation.metric_name()}", f"final_{variant.metric}"
        pairs = recipe.runs[[own, column]].dropna() if {own, column} <= set(recipe.runs) else pd.DataFrame()
        if pairs.empty:
            verdict = (not_run(experiment, profile) if recipe.runs.empty else
                       f"not measured: the recipe's runs do not log `{variant.ablation.metric_name()}` (an older bench)")
            return Line(**common, interval=stats.accuracy_ci([]), difference=None, verdict=verdict)
        diff = stats.paired_difference(pairs[own], pairs[column])
        return Line(**common, interval=stats.accuracy_ci(pairs[column]), difference=diff, verdict=stats.effect_verdict(diff, what))
    if variant.same_as == ablation.RECIPE:
        return Line(**common, interval=stats.accuracy_ci(base), difference=None, studies=tuned,
                    verdict="trains the recipe's config: its runs are the recipe's")
    values = _accuracies(by_hash.get(variant.config_hash, recipe.runs.iloc[0:0]), "final_test_acc")
    if values.empty:
        return Line(**common, interval=stats.accuracy_ci(values), difference=None, studies=tuned, verdict=not_run(experiment, profile))
    if base.empty:
        return Line(**common, interval=stats.accuracy_ci(values), difference=None, studies=tuned, verdict=NO_RECIPE)
    diff = stats.welch_difference(base, values)
    verdict = stats.effect_verdict(diff, what)
    if variant.same_as:
        verdict = f"same config as {variant.same_as}; {verdict}"
    return Line(**common, interval=stats.accuracy_ci(values), difference=diff, verdict=verdict, studies=tuned)


def _reported_line(recipe: Row) -> Line:
    value = recipe.figures["final_test_acc"]
    values = [] if value is None else [value]
    return Line(REPORTED, recipe.reported.label, "reference", recipe.reported.curves_source, "test_acc",
                stats.mean_ci(values), None, "-")


def _size(diff: stats.Difference) -> str:
    """The size of a move toward the reported figure, positive, with its interval when it has one."""
    if not diff.has_interval:
        return f"{stats.pt(abs(diff.mean))} pt at every seed"
    low, high = sorted((abs(diff.low), abs(diff.high)))
    return f"{stats.pt(abs(diff.mean))} pt [{stats.pt(low)}, {stats.pt(high)}]"


def sentence(recipe: Row, lines: list[Line], profile: str) -> str:
    """What closes the gap between the recipe and the reported figure, as far as the data say."""
    reported = recipe.figures["final_test_acc"]
    if reported is None:
        return "No reported final figure to close a gap to."
    target = f"the reported {100 * reported:.2f} %"
    if recipe.runs.empty:
        return f"The recipe has no finished runs of profile `{profile}`: nothing to compare with {target} yet."
    if recipe.why_not_comparable:
        return (f"Profile `{profile}` is not the reported recipe on the full dataset ({recipe.why_not_comparable}): "
                f"the differences show what each switch does here, and the figures are not comparable to {target}.")
    if recipe.verdict == "reproduced":
        return f"The recipe already reproduces {target}."
    gap = reported - recipe.final.mean
    direction = 1 if gap > 0 else -1
    # A variant that trains another's config is that one again: counted once.
    tested = [l for l in lines if l.is_variant and l.metric == "test_acc" and l.difference is not None and not l.same_as]
    toward = [l for l in tested if direction * l.difference.mean > 0
              and (direction * l.difference.low > 0 if l.difference.has_interval else l.difference.no_spread)]
    reaching = [l.variant for l in tested if l.interval.n and stats.verdict(reported, l.interval) == "reproduced"]
    parts = [f"The recipe is {stats.pt(abs(gap))} pt {'below' if gap > 0 else 'above'} {target}"]
    if toward:
        parts += [f"{l.variant} closes {_size(l.difference)} of it" for l in toward]
    else:
        parts.append(f"no variant moves toward it at n = {recipe.final.n}")
    if reaching:
        parts.append(f"{', '.join(reaching)} reproduce{'s' if len(reaching) == 1 else ''} it "
                     f"(within {100 * stats.TOLERANCE:.0f} pt of its interval)")
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
        variants = summary.ablations.get(recipe.experiment, [])
        if not variants:
            continue
        by_hash = {r.runs.config_hash.iloc[0]: r.runs for r in summary.rows
                   if r.experiment == recipe.experiment and not r.is_recipe and not r.runs.empty}
        lines = [_line(v, recipe, by_hash, recipe.experiment, summary.profile, tuned) for v in variants]
        lines.insert(1, _reported_line(recipe))
        out.append(Table(recipe.experiment, summary.profile, recipe.figures["final_test_acc"], recipe.final, lines,
                         sentence(recipe, lines, summary.profile)))
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


# --- the markdown --------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _interval_text(ci: stats.Interval) -> str:
    if ci.n == 0:
        return "-"
    if ci.n == 1:
        return f"{_pct(ci.mean)} (one seed)"
    cut = " (cut at the bound)" if ci.clipped else ""
    return f"{_pct(ci.mean)} [{100 * ci.low:.2f}, {100 * ci.high:.2f}]{cut}"


def _difference_text(line: Line, recipe: stats.Interval) -> str:
    if line.variant == REPORTED:
        return "-" if recipe.n == 0 or line.interval.n == 0 else f"{100 * (line.interval.mean - recipe.mean):+.2f} pt"
    d = line.difference
    if d is None:
        return "-"
    if not d.has_interval:
        return f"{100 * d.mean:+.2f} pt"
    return f"{100 * d.mean:+.2f} pt [{100 * d.low:.2f}, {100 * d.high:.2f}]"


def _p_text(d: stats.Difference | None) -> str:
    if d is None or math.isnan(d.p):
        return "-"
    return f"{d.p:.4f} ({d.test})"


def _seeds_text(line: Line) -> str:
    return "reported" if line.variant == REPORTED else str(line.interval.n)


def _verdict_text(line: Line) -> str:
    tuned = "".join(f"; tuned: study `{s}`" for s in line.studies)
    return line.verdict + tuned


HEADER = ["variant", "changes", "kind", "where it comes from", "seeds", "metric", "final, mean [95 % CI]",
          "difference from the recipe [95 % CI]", "p (test)", "verdict"]


def rows(t: Table) -> list[list[str]]:
    return [[
        f"**{line.variant}**" if line.variant == ablation.RECIPE else line.variant, line.label, line.kind, line.source,
        _seeds_text(line), line.metric, _pct(line.interval.mean) if line.variant == REPORTED else _interval_text(line.interval), _difference_text(line, t.recipe),
        _p_text(line.difference), _verdict_text(line),
    ] for line in t.lines]


INTRO = """\
Each quirk of a reported recipe flipped alone (`bench run EXPERIMENT --ablate`), and all its
standard values together. The difference is the variant's mean minus the recipe's, in points,
with its 95 % interval: a trained variant against the recipe's runs by Welch's t-test, an
evaluation-only one on the recipe runs' own weights, measured both ways, by the paired t-test. The
verdict follows that interval: it excludes 0 exactly when p < 0.05."""


def markdown(found: list[Table], figures: dict[str, str]) -> str:
    """The ablation section; empty when no experiment has figures beyond its recipe's."""
    shown = [t for t in found if t.shown]
    if not shown:
        return ""
    parts = ["## Ablations\n", INTRO + "\n"]
    for t in shown:
        parts += [f"### `{t.experiment}`\n", table(HEADER, rows(t)) + "\n", t.sentence + "\n"]
        if t.experiment in figures:
            parts.append(f"![Ablation of {t.experiment}: differences from the recipe]({figures[t.experiment]})\n")
    return "\n".join(parts)


def frame(found: list[Table]) -> pd.DataFrame:
    """One row per experiment and line of its table, for ablations.csv."""
    out = []
    for t in found:
        for line in t.lines:
            ci, d = line.interval, line.difference
            diff = (line.interval.mean - t.recipe.mean) if line.variant == REPORTED and ci.n and t.recipe.n else (d.mean if d else None)
            out.append([
                t.experiment, line.variant, line.label, line.kind, line.source, line.metric, ci.n,
                ci.mean if ci.n else None, ci.low if ci.n >= 2 else None, ci.high if ci.n >= 2 else None,
                diff, d.low if d and d.has_interval else None, d.high if d and d.has_interval else None,
                d.p if d and not math.isnan(d.p) else None, d.test if d else None, line.verdict, line.same_as,
                " ".join(line.studies) or None,
            ])
    return pd.DataFrame(out, columns=COLUMNS)
