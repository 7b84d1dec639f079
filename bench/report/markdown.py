"""The report's markdown: the summary table, the comparison, environment, runs and notes.

Fixed number formats and sorted rows: the same summary always gives the same text.
"""

from __future__ import annotations

import pandas as pd

from bench import stats
from bench.models import cost
from bench.report.summary import BOTTLENECK_PAIR, Row, Summary, complete_data


def pct(x: float | None) -> str:
    return "-" if x is None or pd.isna(x) else f"{100 * x:.2f} %"


def ci_text(ci: stats.Interval) -> str:
    if ci.n == 0:
        return "-"
    if ci.n == 1:
        return f"{pct(ci.mean)} (one seed, no interval)"
    clipped = " (t interval cut at the bound)" if ci.clipped else ""
    return f"{pct(ci.mean)} [{100 * ci.low:.2f}, {100 * ci.high:.2f}]{clipped}"


def _best_text(row: Row) -> str:
    """The val-chosen best; runs trained with no validation split (data.val_size = 0) have none."""
    if row.best.n == 0 and not row.runs.empty and (row.runs.data_val.fillna(-1) == 0).all():
        return "- (no validation split)"
    return ci_text(row.best)


def sd_text(ci: stats.Interval) -> str:
    return "-" if ci.n < 2 else f"{100 * ci.sd:.2f} pt"


def cost_texts(c: cost.Cost | None) -> list[str]:
    """Parameters in millions (thousands below a million) and GFLOPs to three significant digits."""
    if c is None:
        return ["-", "-"]
    params = f"{c.parameters / 1e6:.2f} M" if c.parameters >= 1e6 else f"{c.parameters / 1e3:.1f} k"
    return [params, f"{c.gflops:.3g}"]


def hours(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g} h"


def seconds(x: float | None) -> str:
    return "-" if x is None or pd.isna(x) else (f"{x:.0f} s" if x >= 10 else f"{x:.2f} s")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _data_text(runs: pd.DataFrame) -> str:
    if runs.empty:
        return "-"
    r = runs.iloc[0]
    source = r.get("data.source", "-")
    kind = "full" if complete_data(runs) else "subset"
    counts = "/".join(str(r[c]) if pd.notna(r[c]) else "?" for c in ("data_train", "data_val", "data_test"))
    return f"{source}, {kind} ({counts} train/val/test)"


def _epochs_text(row: Row) -> str:
    ours = sorted({str(e) for e in row.runs.get("train.epochs", pd.Series(dtype=str)).dropna()})
    return f"{row.reported.final_epoch} / {', '.join(ours) or '-'}"


TIMED = {"train_time_s": "training pass", "epoch_time_s": "training + evaluation"}


def _seconds_text(row: Row) -> str:
    """Theirs and ours, of the same quantity: the metric the reported figure names."""
    theirs = seconds(row.figures["seconds_per_epoch"])
    if row.reported.seconds_per_epoch_kind == "estimate" and theirs != "-":
        theirs = f"~{theirs} (est.)"
    metric = row.reported.seconds_per_epoch_metric
    ours = seconds(row.seconds_per_epoch)
    if row.seconds_per_epoch is None and not row.runs.empty:
        ours = f"- (no {metric} logged)"  # runs from before the suite logged it
    return f"{theirs} / {ours} ({TIMED.get(metric, metric)})"


def _hardware_text(row: Row) -> str:
    ours = sorted(set(row.runs.device.dropna())) if not row.runs.empty else []
    return f"{row.reported.hardware} / {', '.join(ours) or '-'}"


def summary_table(summary: Summary) -> str:
    header = [
        "reported run",
        "reported final (epoch)",
        "reported best (epoch)",
        "suite final, mean [95 % CI]",
        "seeds",
        "sd over seeds",
        "difference",
        "verdict",
        "suite best, val-chosen",
        "epochs theirs / ours",
        "s per epoch theirs / ours (timed)",
        "hardware theirs / ours",
        "device-hours per seed",
        "parameters",
        "GFLOPs per image",
        "profile, data",
    ]
    rows = []
    for r in summary.rows:
        f = r.figures
        diff = (
            "-"
            if r.final.n == 0 or f["final_test_acc"] is None
            else f"{100 * (r.final.mean - f['final_test_acc']):+.2f} pt"
        )
        verdict = f"{r.verdict} ({r.why_not_comparable})" if r.why_not_comparable else f"**{r.verdict}**"
        name = f"{r.reported.label} (`{r.experiment}`)" + ("" if r.is_recipe else f", other config: {r.label}")
        rows.append(
            [
                name,
                f"{pct(f['final_test_acc'])} ({r.reported.final_epoch})",
                f"{pct(f['best_test_acc'])} ({f['best_epoch']})",
                ci_text(r.final),
                str(r.final.n),
                sd_text(r.final),
                diff,
                verdict,
                _best_text(r),
                _epochs_text(r),
                _seconds_text(r),
                _hardware_text(r),
                hours(r.device_hours),
                *cost_texts(r.cost),
                f"{summary.profile}, {_data_text(r.runs)}",
            ]
        )
    return table(header, rows)


def _comparison_text(summary: Summary) -> str:
    w = summary.comparison
    if w is None:
        return (
            "Welch's t-test needs at least two finished seeds of each model; run "
            "`bench run --suite cifar10 --seeds 2` (or more) and report again."
        )
    significant = "differ" if w.p < 0.05 else "do not differ"
    return (
        f"Final test accuracy, bottleneck {pct(w.mean_a)} (n = {w.n_a}) against ResNet-B {pct(w.mean_b)} "
        f"(n = {w.n_b}): Welch's t = {w.t:.3f}, df = {w.df:.2f}, p = {w.p:.4f}. At the 5 % level the two "
        f"models {significant}."
    )


def environment_table(summary: Summary) -> str:
    runs = pd.concat([r.runs for r in summary.rows], ignore_index=True) if summary.rows else pd.DataFrame()

    def values(col: str) -> str:
        if runs.empty or col not in runs:
            return "-"
        return ", ".join(sorted({str(v) for v in runs[col].dropna()})) or "-"

    rows = [
        ["git commit", values("git_commit")],
        ["python", values("python")],
        ["torch", values("torch")],
        ["torchvision", values("torchvision")],
        ["numpy", values("numpy")],
        ["device", values("device")],
    ]
    for r in summary.rows:
        seeds = ", ".join(str(s) for s in r.runs.seed) if not r.runs.empty else "-"
        rows.append(
            [f"`{r.experiment}`" + (f", {r.label}" if r.label else ""), f"seeds {seeds}; data {_data_text(r.runs)}"]
        )
    return table(["", "value"], rows)


def runs_table(summary: Summary) -> str:
    rows = []
    for r in summary.rows:
        for _, run in r.runs.iterrows():
            rows.append(
                [
                    f"`{run.run_name}`",
                    r.label or "recipe",
                    str(run.seed),
                    str(run.epochs_done),
                    pct(run.get("final_test_acc")),
                    pct(run.get("best_test_acc")),
                    str(run.best_epoch) if pd.notna(run.best_epoch) else "-",
                    f"`{run.run_id}`",
                ]
            )
    header = [
        "run",
        "config",
        "seed",
        "epochs",
        "final test acc",
        "best test acc (val-chosen)",
        "best epoch",
        "MLflow run id",
    ]
    return table(header, rows)


def notes_text(summary: Summary) -> str:
    out = []
    for r in summary.recipe_rows:
        out.append(f"**{r.reported.label}** (`{r.experiment}`)\n")
        out.append(f"- Reported figures: {r.reported.curves_source}; hardware: {r.reported.hardware_source}.")
        out += [f"- {note}" for note in r.reported.notes]
        if r.recipe_diff:
            out.append(
                f"- The recipe of profile `{summary.profile}` differs from the paper recipe in: {', '.join(f'`{k}`' for k in r.recipe_diff)}."
            )
        others = [o.label for o in summary.rows if o.experiment == r.experiment and not o.is_recipe]
        if others:
            out.append(f"- Other configs, in rows of their own: {'; '.join(f'`{o}`' for o in others)}.")
        if not r.runs.empty and (r.runs.data_val.fillna(-1) == 0).all():
            out.append(
                "- Trained on the whole training set (`data.val_size = 0`), as reported: no validation split, "
                "so no val-chosen best; the comparison is the test accuracy at the last epoch."
            )
        if r.excluded:
            left = ", ".join(f"{n} ({why})" for why, n in sorted(r.excluded.items()))
            out.append(f"- Runs left out: {left}.")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


VERDICT_TEXT = f"""\
How to read the verdict: the suite's final test accuracy is the mean over seeds with a 95 %
t-interval (n - 1 degrees of freedom); where that interval reaches below 0 % or above 100 % it is
cut there and says so (the cut loses no coverage: an accuracy lies within them). **reproduced**:
the reported final figure lies inside the printed interval widened by {100 * stats.TOLERANCE:.0f} point on each
side (with one seed: within {100 * stats.TOLERANCE:.0f} point of it). **above** / **below**: the widened
interval lies wholly above / below the reported figure. **not comparable**: the runs are not the
reported recipe on the full dataset (a subset of CIFAR, as in the smoke profile, or other
settings: see the notes), so the numbers show that the suite runs and learns, not whether it
reproduces. The recipe's runs are those of the experiment's config under the profile, as
`bench run` gives it with no `--set`; settings that change no result (`train.compile`,
`train.channels_last`, checkpoint and logging intervals, ...) do not make a run another config.
Runs of other configs (tuned values, ablations) are rows of their own, named by the keys where
they differ from the recipe, beside the recipe's row.
The reported best is the highest reported test accuracy (chosen on the test set); the suite's best
is the test accuracy at the epoch with the highest validation accuracy. Seconds per epoch compare
the same quantity: R3 and R4 logged the training loop's duration, the suite's `train_time_s`;
R1 and R2's figures are estimates from the whole job's time, the suite's `epoch_time_s`
(training and the epoch's evaluation). Device-hours per seed: each run's `epoch_time_s` summed
(training and evaluation, not start-up or checkpoint uploads), the mean over seeds. Parameters
and GFLOPs per image (one image's forward pass at the config's input size, a multiply-add
counted as two) are counted on the config's model by torch's FlopCounterMode."""


def _caveat(summary: Summary) -> list[str]:
    rows = summary.recipe_rows
    apart = [r for r in rows if r.why_not_comparable]
    if not apart:
        return []
    which = (
        "None of these runs is"
        if len(apart) == len(rows)
        else f"{len(apart)} of {len(rows)} reported runs' rows are not"
    )
    return [
        f"> {which} the reported recipe on the full dataset (profile `{summary.profile}`): the figures show "
        "that the suite runs and learns, and are not comparable to the reported ones. Run "
        f"`bench run --suite {summary.suite} --profile paper` for a comparison.\n"
    ]


CURVE_TITLES = {
    "test_acc": "Test accuracy against epoch",
    "train_loss": "Training loss against epoch",
    "val_acc": "Validation accuracy against epoch",
    "lr": "Learning rate against epoch",
}


def markdown(
    summary: Summary, figures: dict[str, str], tuning: str = "", data: list[str] | None = None, ablations: str = ""
) -> str:
    parts = [
        f"# Report: suite `{summary.suite}`, profile `{summary.profile}`\n",
        *_caveat(summary),
        "Generated by `bench report` from the runs in MLflow and the reported figures in `experiments/reference/`.\n",
        "## Did it reproduce?\n",
        summary_table(summary) + "\n",
        VERDICT_TEXT + "\n",
        "## Curves\n",
        "The reported run as a line with markers; the suite's seeds of the recipe as thin lines, one per "
        "seed, beside their mean with a 95 % band. Validation accuracy exists only for runs with a "
        "validation split; the learning rate is the one each epoch trained with (log scale).\n",
    ]
    for key, title in CURVE_TITLES.items():
        if key in figures:
            parts.append(f"![{title}]({figures[key]})\n")
    if "spread" in figures:
        parts += [
            "The final test accuracy of each seed, one row per config (other configs included), "
            "with the reported final figure as a cross.\n",
            f"![Final test accuracy per seed and config]({figures['spread']})\n",
        ]
    if all(n in [r.experiment for r in summary.rows] for n in BOTTLENECK_PAIR):
        parts += ["## Bottleneck against ResNet-B\n", _comparison_text(summary) + "\n"]
        if "comparison" in figures:
            parts.append(f"![Bottleneck against ResNet-B, test accuracy]({figures['comparison']})\n")
    if ablations:
        parts.append(ablations)
    if tuning:
        parts.append(tuning)
    parts += [
        "## Environment\n",
        environment_table(summary) + "\n",
        "## Runs\n",
        runs_table(summary) + "\n",
        "## Sources and notes\n",
        notes_text(summary),
    ]
    if data:
        parts += [
            "## Data\n",
            "The numbers behind every table and figure, for pandas (`pd.read_csv`): "
            + ", ".join(f"[`{name}`]({name})" for name in data)
            + ". `runs.csv` has one row per run "
            "(`report_row` names the row of the summary it counts in), `epochs.csv` one per run and epoch.\n",
        ]
    return "\n".join(parts)
