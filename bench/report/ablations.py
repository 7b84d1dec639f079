"""The ablation section of the report and ablations.csv, from the tables of `ablation_tables`
(whose names are re-exported here: `ablations.tables(summary)` and so on)."""

from __future__ import annotations

import math

import pandas as pd

from bench import ablation, stats
from bench.report.ablation_tables import (  # noqa: F401 (the tables, as report.ablations gives them)
    NO_RECIPE,
    REPORTED,
    WHAT,
    Line,
    Table,
    kind_text,
    not_run,
    sentence,
    studies_by_hash,
    study_links,
    tables,
)
from bench.report.markdown import ci_text, pct, table

COLUMNS = [
    "experiment",
    "variant",
    "label",
    "kind",
    "source",
    "metric",
    "seeds",
    "mean",
    "low",
    "high",
    "difference",
    "difference_low",
    "difference_high",
    "p",
    "test",
    "verdict",
    "same_as",
    "studies",
    "baseline",
]


def _final_text(line: Line) -> str:
    if line.variant == REPORTED:
        return pct(line.interval.mean) if line.interval.n else "-"
    if line.baseline is None:
        return ci_text(line.interval)
    return f"{ci_text(line.interval)} (recipe {pct(line.baseline.mean)}, {line.baseline.n} pair{'' if line.baseline.n == 1 else 's'})"


def _difference_text(line: Line, recipe: stats.Interval) -> str:
    if line.variant == REPORTED:
        return "-" if recipe.n == 0 or line.interval.n == 0 else f"{100 * (line.interval.mean - recipe.mean):+.2f} pt"
    d = line.difference
    if d is None:
        return "-"
    if not d.has_interval:
        return f"{stats.points(d.mean, 2, sign=True)} pt"
    return f"{stats.points(d.mean, 2, sign=True)} pt [{stats.points(d.low, 2)}, {stats.points(d.high, 2)}]"


P_FLOOR = 1e-4  # the last digit the table prints


def _p_text(d: stats.Difference | None) -> str:
    if d is None or math.isnan(d.p):
        return "-"
    return f"{'< 0.0001' if d.p < P_FLOOR else f'{d.p:.4f}'} ({d.test})"


def _seeds_text(line: Line) -> str:
    return "reported" if line.variant == REPORTED else str(line.interval.n)


def _verdict_text(line: Line) -> str:
    tuned = "".join(f"; tuned: study `{s}`" for s in line.studies)
    return line.verdict + tuned


HEADER = [
    "variant",
    "changes",
    "kind",
    "where it comes from",
    "seeds",
    "metric",
    "final, mean [95 % CI]",
    "difference from the recipe [95 % CI]",
    "p (test)",
    "verdict",
]


def rows(t: Table) -> list[list[str]]:
    return [
        [
            f"**{line.variant}**" if line.variant == ablation.RECIPE else line.variant,
            line.label,
            line.kind,
            line.source,
            _seeds_text(line),
            line.metric,
            _final_text(line),
            _difference_text(line, t.recipe),
            _p_text(line.difference),
            _verdict_text(line),
        ]
        for line in t.lines
    ]


INTRO = """\
Each quirk of a reported recipe flipped alone (`bench run EXPERIMENT --ablate`), and all its
standard values together. The difference is the variant's mean minus a baseline, in points, with
its 95 % interval: a trained variant against the recipe row by Welch's t-test; an evaluation-only
one against the same recipe runs' own figure of its metric (train accuracy for the re-measure
switch), measured on the same weights at the same last epoch, by the paired t-test: that baseline
and the number of pairs stand beside its figure ("recipe 61.00 %, 3 pairs"), and runs that did not
measure it are left out. The verdict follows that interval: it excludes 0 exactly when p < 0.05."""


def markdown(found: list[Table], figures: dict[str, str]) -> str:
    """The ablation section; empty when no experiment has figures beyond its recipe's."""
    shown = [t for t in found if t.shown]
    if not shown:
        return ""
    parts = ["## Ablations\n", INTRO + "\n"]
    for t in shown:
        if t.error:
            parts += [f"### `{t.experiment}`\n", f"No ablation table: {t.error}\n"]
            continue
        parts += [f"### `{t.experiment}`\n", table(HEADER, rows(t)) + "\n", t.sentence + "\n"]
        if t.experiment in figures:
            if t.why_not_comparable:
                parts.append(
                    f"The figure draws no line at the reported figure: profile `{t.profile}` is not comparable "
                    f"to it ({t.why_not_comparable}).\n"
                )
            parts.append(f"![Ablation of {t.experiment}: differences from the recipe]({figures[t.experiment]})\n")
    return "\n".join(parts)


def frame(found: list[Table]) -> pd.DataFrame:
    """One row per experiment and line of its table, for ablations.csv."""
    out = []
    for t in found:
        for line in t.lines:
            ci, d = line.interval, line.difference
            diff = (
                (line.interval.mean - t.recipe.mean)
                if line.variant == REPORTED and ci.n and t.recipe.n
                else (d.mean if d else None)
            )
            out.append(
                [
                    t.experiment,
                    line.variant,
                    line.label,
                    line.kind,
                    line.source,
                    line.metric,
                    None if line.variant == REPORTED else ci.n,
                    ci.mean if ci.n else None,
                    ci.low if ci.n >= 2 else None,
                    ci.high if ci.n >= 2 else None,
                    diff,
                    d.low if d and d.has_interval else None,
                    d.high if d and d.has_interval else None,
                    d.p if d and not math.isnan(d.p) else None,
                    d.test if d else None,
                    line.verdict,
                    line.same_as,
                    " ".join(line.studies) or None,
                    line.baseline.mean if line.baseline else None,
                ]
            )
    out = pd.DataFrame(out, columns=COLUMNS)
    out["seeds"] = out["seeds"].astype("Int64")  # the reported row's is empty, the others whole numbers
    return out
