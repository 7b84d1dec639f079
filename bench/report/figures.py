"""The report's figures (seaborn on matplotlib's Agg canvas, no pyplot state).

Each reported curve is a line with markers; the suite's seeds are thin lines, one per seed, beside
their mean with a 95 % t band, the same interval as the report's tables. The spread figure puts
each seed's final test accuracy as a point, one row per config. Figures are drawn in
matplotlib's default style (not the user's matplotlibrc) and saved without a software or date
stamp, so the same runs give the same bytes.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from bench import ablation, report, stats

LABELS = {
    "test_acc": "test accuracy",
    "train_loss": "training loss",
    "val_acc": "validation accuracy",
    "lr": "learning rate",
}
CURVES = ("test_acc", "train_loss", "val_acc", "lr")  # val_acc and lr drawn when some run or reported curve has them
FILES = {
    **{m: f"{m}.png" for m in CURVES},
    "comparison": "bottleneck_vs_resnet_b.png",
    "spread": "final_test_acc_spread.png",
}
REPORTED_STYLE = {"color": "0.15", "marker": "o", "markersize": 3, "linewidth": 1}
SEED_STYLE = {"linewidth": 0.7, "alpha": 0.45}
DPI = 100


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, metadata={"Software": None})


def _suite_line(ax, ours: pd.DataFrame, label: str, color: str, seed_label: str = "one seed") -> None:
    for i, (_, seed) in enumerate(ours.groupby("run_id", sort=False)):  # in the frame's order: by seed
        ax.plot(seed.epoch, seed.value, color=color, label=seed_label if i == 0 else "_nolegend_", **SEED_STYLE)
    sns.lineplot(
        data=ours, x="epoch", y="value", estimator="mean", errorbar=stats.t_band, ax=ax, label=label, color=color
    )


def _clip(ax, metric: str, values: pd.Series) -> None:
    """Keep the axis inside what the metric can take: a wide band of a few seeds would otherwise
    stretch it below zero (or above one for an accuracy). Learning rates, which schedules divide
    by tens, are on a log scale."""
    if metric == "lr" and len(values) and (values > 0).all():
        ax.set_yscale("log")
        return
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0.0), min(high, 1.0) if metric.endswith("_acc") else high)


def _seeds(ours: pd.DataFrame) -> int:
    return ours.run_id.nunique()


def metric_figure(summary, metric: str, path: Path) -> None:
    rows = summary.recipe_rows  # one panel per reported run: its recipe's seeds
    ncols = 2 if len(rows) > 1 else 1
    nrows = max(1, math.ceil(len(rows) / ncols))
    fig = Figure(figsize=(6 * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, row in zip(axes, rows):
        theirs = summary.curves[(summary.curves.experiment == row.experiment) & (summary.curves.metric == metric)]
        ours = summary.metrics[summary.metrics.run_id.isin(row.runs.run_id) & (summary.metrics.metric == metric)]
        if len(theirs):
            ax.plot(theirs.epoch, theirs.value, label="reported", **REPORTED_STYLE)
        if len(ours):
            _suite_line(ax, ours, f"suite, {summary.profile} ({_seeds(ours)} seeds)", "C0")
        else:
            missing = "no suite runs" if row.runs.empty else f"no {metric} logged"
            if metric == "val_acc" and not row.runs.empty and (row.runs.data_val.fillna(-1) == 0).all():
                missing = "no validation split (data.val_size = 0)"
            ax.text(0.5, 0.5, missing, transform=ax.transAxes, ha="center", va="center")
        ax.set_title(f"{row.reported.label}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(LABELS[metric])
        _clip(ax, metric, pd.concat([theirs.value, ours.value]))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    for ax in axes[len(rows) :]:
        ax.set_visible(False)
    _save(fig, path)


def comparison_figure(summary, path: Path) -> None:
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    recipes = {r.experiment: r.runs.run_id for r in summary.recipe_rows}
    for name, label, color in zip(report.BOTTLENECK_PAIR, ("bottleneck", "ResNet-B"), ("C0", "C1")):
        theirs = summary.curves[(summary.curves.experiment == name) & (summary.curves.metric == "test_acc")]
        ours = summary.metrics[summary.metrics.run_id.isin(recipes[name]) & (summary.metrics.metric == "test_acc")]
        if len(ours):
            _suite_line(ax, ours, f"{label}, suite ({_seeds(ours)} seeds)", color, f"{label}, one seed")
        if len(theirs):
            ax.plot(
                theirs.epoch,
                theirs.value,
                label=f"{label}, reported",
                color=color,
                marker="o",
                markersize=4,
                linestyle="--",
                linewidth=1,
            )
    w = summary.comparison
    test = f"Welch's t-test on the final accuracy: p = {w.p:.4f}" if w else "Welch's t-test needs two seeds of each"
    ax.set_title(f"Bottleneck against ResNet-B on CIFAR-10\n{test}", fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    _clip(ax, "test_acc", pd.Series(dtype=float))
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)


def row_name(row) -> str:
    """The experiment, and below it another config's label wrapped to fit beside the axis."""
    return row.experiment if row.is_recipe else row.experiment + "\n" + textwrap.fill(row.label, 34)


def spread_figure(summary, path: Path) -> None:
    """Each seed's final test accuracy, one row per config (other configs included), a box behind
    the points and the reported final figure as a cross."""
    finals = pd.DataFrame(
        [(row_name(r), v) for r in summary.rows for v in r.runs.get("final_test_acc", pd.Series(dtype=float)).dropna()],
        columns=["config", "final_test_acc"],
    )
    names = [row_name(r) for r in summary.rows]
    fig = Figure(figsize=(8, 1.2 + 0.2 * sum(n.count("\n") + 2 for n in names)), layout="constrained")
    ax = fig.subplots()
    sns.boxplot(
        data=finals, x="final_test_acc", y="config", order=names, ax=ax, color="0.9", width=0.5, showfliers=False
    )
    sns.swarmplot(data=finals, x="final_test_acc", y="config", order=names, ax=ax, color="C0", size=5, label="one seed")
    reported = [
        (i, r.figures["final_test_acc"]) for i, r in enumerate(summary.rows) if r.figures["final_test_acc"] is not None
    ]
    if reported:
        ax.scatter(
            [v for _, v in reported], [i for i, _ in reported], marker="x", color="0.15", zorder=3, label="reported"
        )
    ax.set_xlabel(f"final test accuracy ({summary.profile})")
    ax.set_ylabel("")
    ax.tick_params(axis="y", labelsize=8)
    handles, labels = ax.get_legend_handles_labels()
    keep = dict(zip(labels, handles))  # seaborn labels every swarm; one entry each
    ax.legend(keep.values(), keep.keys(), fontsize=8, loc="best")
    _save(fig, path)


def ablation_plot(t) -> Figure:
    """Each variant's difference from the recipe in points with its 95 % interval (a bare point
    where it has none; the table's "not run" or "not measured" where it has no figures), a line at
    zero and, where the recipe is comparable to the reported figure, a dashed one at the reported
    figure minus the recipe, in the table's order."""
    lines = [l for l in t.lines if l.is_variant]
    names = [l.variant + ("" if l.metric == "test_acc" else f" ({l.metric})") for l in lines]
    fig = Figure(figsize=(7, 1.6 + 0.35 * len(lines)), layout="constrained")
    ax = fig.subplots()
    ax.axvline(0, color="0.5", linewidth=0.8)
    for y, line in enumerate(lines):
        d = line.difference
        if d is None:
            why = (
                ("not measured" if line.verdict.startswith("not measured") else "not run")
                if line.interval.n == 0
                else "the recipe's config"
                if line.same_as == ablation.RECIPE
                else "no recipe runs"
            )
            ax.text(0, y, f" {why}", va="center", fontsize=8, color="0.3")
            continue
        err = [[100 * (d.mean - d.low)], [100 * (d.high - d.mean)]] if d.has_interval else None
        ax.errorbar(
            [100 * d.mean],
            [y],
            xerr=err,
            fmt="o",
            color="C1" if line.kind.startswith(ablation.EVALUATION_ONLY) else "C0",
            capsize=3,
            markersize=5,
        )
    # Off a comparable profile (smoke) the gap is meaningless and would squeeze the effects.
    if t.reported is not None and t.recipe.n and t.why_not_comparable is None:
        ax.axvline(
            100 * (t.reported - t.recipe.mean), color="0.15", linestyle="--", linewidth=1, label="reported - recipe"
        )
        ax.legend(fontsize=8, loc="best")
    ax.set_yticks(range(len(lines)), names)
    ax.set_ylim(len(lines) - 0.5, -0.5)
    ax.set_xlabel(f"difference from the recipe, points of accuracy ({t.profile}, 95 % CI)")
    ax.set_title(f"Ablation of {t.experiment}\ntrained variants blue, evaluation-only orange", fontsize=10)
    return fig


def _drawn(summary, metric: str) -> bool:
    """Whether a recipe's runs or a reported curve has the metric."""
    experiments = [r.experiment for r in summary.recipe_rows]
    return (summary.metrics.metric == metric).any() or (
        summary.curves.experiment.isin(experiments) & (summary.curves.metric == metric)
    ).any()


def draw_all(summary, out_dir: Path, ablation_tables: list | None = None) -> dict[str, str]:
    """Draw every figure into `out_dir`, one per ablation table given (`ablations.tables`);
    returns {figure key: file name relative to out_dir}."""
    written = {}
    # matplotlib's defaults (not the user's matplotlibrc) and seaborn's theme, undone afterwards.
    with (
        matplotlib.style.context("default"),
        sns.axes_style("whitegrid"),
        sns.plotting_context("notebook", font_scale=0.85),
    ):
        for metric in CURVES:
            if metric in ("test_acc", "train_loss") or _drawn(summary, metric):
                metric_figure(summary, metric, out_dir / FILES[metric])
                written[metric] = FILES[metric]
        if any(not r.runs.empty for r in summary.rows):
            spread_figure(summary, out_dir / FILES["spread"])
            written["spread"] = FILES["spread"]
        names = {r.experiment for r in summary.recipe_rows}
        if set(report.BOTTLENECK_PAIR) <= names:
            comparison_figure(summary, out_dir / FILES["comparison"])
            written["comparison"] = FILES["comparison"]
        for t in [t for t in ablation_tables or [] if t.error is None]:
            name = f"ablation-{t.experiment}"
            _save(ablation_plot(t), out_dir / f"{name}.png")
            written[name] = f"{name}.png"
    return written
