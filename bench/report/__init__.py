"""DataFrames -> the report: which runs answer each reported run, the summary, markdown.

`bench report` reads MLflow through `results.load`; everything here works on the frames it
returns, so the same runs always give the same bytes (sorted rows, fixed number formats, no
clock, no paths of the machine that wrote it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench import config, reference, stats
from bench.results import Results, Studies

BOTTLENECK_PAIR = ("bottleneck-cifar10", "resnetb-cifar10")
FULL_COUNTS = 60000  # train + val + test images of the official CIFAR-10/100


@dataclass
class Row:
    """One reported run beside the suite's runs that answer it."""

    reported: reference.ReportedRun
    figures: dict  # reference.headline(): final_test_acc, best_test_acc, best_epoch, seconds_per_epoch
    runs: pd.DataFrame  # the selected runs (finished, one profile, one config)
    final: stats.Interval
    best: stats.Interval
    verdict: str
    why_not_comparable: str | None
    recipe_diff: list[str]
    excluded: dict[str, int] = field(default_factory=dict)
    seconds_per_epoch: float | None = None

    @property
    def experiment(self) -> str:
        return self.reported.experiment


@dataclass
class Summary:
    suite: str
    profile: str
    rows: list[Row]
    comparison: stats.Welch | None
    metrics: pd.DataFrame  # per-epoch metrics of the selected runs
    curves: pd.DataFrame  # the reported per-epoch figures of the suite's experiments


def choose_profile(runs: pd.DataFrame, requested: str | None) -> str:
    """The requested profile; else "paper" when it has finished runs; else the profile with the
    most finished runs (ties by name)."""
    if requested:
        return requested
    done = runs[(runs.mlflow_status == "FINISHED") & (runs.kind == "cell")]
    if (done.profile == "paper").any() or done.empty:
        return "paper"
    counts = done.groupby("profile").size()
    return sorted(counts.index, key=lambda p: (-counts[p], p))[0]


def select(runs: pd.DataFrame, experiment: str, profile: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """The finished runs of one experiment and profile with the config most of them share (ties:
    the most recently started), and how many runs were left out and why."""
    mine = runs[(runs.kind == "cell") & (runs.experiment == experiment)]
    excluded: dict[str, int] = {}
    other = int((mine.profile != profile).sum())
    if other:
        excluded["other profiles"] = other
    mine = mine[mine.profile == profile]
    done = mine[(mine.mlflow_status == "FINISHED") & (mine.status == "finished")]
    if len(mine) - len(done):
        excluded["not finished"] = len(mine) - len(done)
    if done.empty:
        return done, excluded
    groups = done.groupby("config_hash").agg(n=("run_id", "size"), last=("start_time", "max"))
    chosen = groups.sort_values(["n", "last"], ascending=False).index[0]
    if (done.config_hash != chosen).sum():
        excluded["other configs"] = int((done.config_hash != chosen).sum())
    picked = done[done.config_hash == chosen]
    # A cell re-run from scratch leaves two finished runs of one seed: keep the newest.
    picked = picked.sort_values("start_time").drop_duplicates("seed", keep="last").sort_values("seed", ignore_index=True)
    return picked, excluded


def paper_recipe(experiment: str) -> dict[str, str]:
    return {k: v for k, v in config.load(experiment, profile="paper", seed=0).params().items() if k != "seed"}


def recipe_diff(runs: pd.DataFrame, recipe: dict[str, str]) -> list[str]:
    """The dotted keys where the runs' params differ from the reported recipe."""
    if runs.empty:
        return []
    first = runs.iloc[0]
    return sorted(k for k, v in recipe.items() if k not in runs.columns or str(first[k]) != v)


def _values(runs: pd.DataFrame, column: str) -> pd.Series:
    """One value per run of a column that runs without that metric lack entirely."""
    return runs[column].dropna() if column in runs else pd.Series(dtype=float)


def _complete_data(runs: pd.DataFrame) -> bool:
    if runs.data_complete.notna().all():
        return bool((runs.data_complete == "true").all())
    counts = runs.data_train.fillna(0) + runs.data_val.fillna(0) + runs.data_test.fillna(0)
    return bool((counts == FULL_COUNTS).all())


def summarize(
    results: Results,
    experiments: list[str],
    *,
    suite: str,
    profile: str | None = None,
    curves: pd.DataFrame | None = None,
    reported: dict[str, reference.ReportedRun] | None = None,
    recipes: dict[str, dict[str, str]] | None = None,
) -> Summary:
    """Put each experiment's runs beside its reported figures. `curves`, `reported` and `recipes`
    default to experiments/reference/ and the paper profile's configs."""
    curves = reference.load_curves() if curves is None else curves
    reported = reference.load_runs() if reported is None else reported
    profile = choose_profile(results.runs, profile)
    rows = []
    for name in experiments:
        if name not in reported:
            continue
        picked, excluded = select(results.runs, name, profile)
        recipe = recipes[name] if recipes is not None else paper_recipe(name)
        diff = recipe_diff(picked, recipe)
        final = stats.mean_ci(_values(picked, "final_test_acc"))
        best = stats.mean_ci(_values(picked, "best_test_acc"))
        figures = reference.headline(curves, reported[name])
        if picked.empty:
            why = "no finished runs"
        elif not _complete_data(picked):
            why = "subset of CIFAR"
        elif diff:
            why = "recipe differs"
        else:
            why = None
        verdict = "not comparable" if why else stats.verdict(figures["final_test_acc"], final)
        times = results.metrics[results.metrics.run_id.isin(picked.run_id) & (results.metrics.metric == "epoch_time_s")]
        rows.append(Row(
            reported=reported[name], figures=figures, runs=picked, final=final, best=best, verdict=verdict,
            why_not_comparable=why, recipe_diff=diff, excluded=excluded,
            seconds_per_epoch=float(times.value.mean()) if len(times) else None,
        ))
    by_name = {r.experiment: r for r in rows}
    comparison = None
    if all(n in by_name for n in BOTTLENECK_PAIR):
        a, b = (_values(by_name[n].runs, "final_test_acc") for n in BOTTLENECK_PAIR)
        comparison = stats.welch(a, b)
    selected = pd.concat([r.runs.run_id for r in rows]) if rows else pd.Series(dtype=str)
    metrics = results.metrics[results.metrics.run_id.isin(selected)]
    return Summary(suite, profile, rows, comparison, metrics, curves[curves.experiment.isin(experiments)])


# --- markdown ------------------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "-" if x is None or pd.isna(x) else f"{100 * x:.2f} %"


def ci_text(ci: stats.Interval) -> str:
    if ci.n == 0:
        return "-"
    if ci.n == 1:
        return f"{pct(ci.mean)} (one seed, no interval)"
    return f"{pct(ci.mean)} [{100 * ci.low:.2f}, {100 * ci.high:.2f}]"


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
    kind = "full" if _complete_data(runs) else "subset"
    counts = "/".join(str(r[c]) if pd.notna(r[c]) else "?" for c in ("data_train", "data_val", "data_test"))
    return f"{source}, {kind} ({counts} train/val/test)"


def _epochs_text(row: Row) -> str:
    ours = sorted({str(e) for e in row.runs.get("train.epochs", pd.Series(dtype=str)).dropna()})
    return f"{row.reported.final_epoch} / {', '.join(ours) or '-'}"


def _seconds_text(row: Row) -> str:
    theirs = seconds(row.figures["seconds_per_epoch"])
    if row.reported.seconds_per_epoch_kind == "estimate" and theirs != "-":
        theirs = f"~{theirs} (est.)"
    return f"{theirs} / {seconds(row.seconds_per_epoch)}"


def _hardware_text(row: Row) -> str:
    ours = sorted(set(row.runs.device.dropna())) if not row.runs.empty else []
    return f"{row.reported.hardware} / {', '.join(ours) or '-'}"


def summary_table(summary: Summary) -> str:
    header = [
        "reported run", "reported final (epoch)", "reported best (epoch)", "suite final, mean [95 % CI]",
        "seeds", "difference", "verdict", "suite best, val-chosen", "epochs theirs / ours",
        "s per epoch theirs / ours", "hardware theirs / ours", "profile, data",
    ]
    rows = []
    for r in summary.rows:
        f = r.figures
        diff = "-" if r.final.n == 0 or f["final_test_acc"] is None else f"{100 * (r.final.mean - f['final_test_acc']):+.2f} pt"
        verdict = f"{r.verdict} ({r.why_not_comparable})" if r.why_not_comparable else f"**{r.verdict}**"
        rows.append([
            f"{r.reported.label} (`{r.experiment}`)",
            f"{pct(f['final_test_acc'])} ({r.reported.final_epoch})",
            f"{pct(f['best_test_acc'])} ({f['best_epoch']})",
            ci_text(r.final), str(r.final.n), diff, verdict, ci_text(r.best),
            _epochs_text(r), _seconds_text(r), _hardware_text(r),
            f"{summary.profile}, {_data_text(r.runs)}",
        ])
    return table(header, rows)


def _comparison_text(summary: Summary) -> str:
    w = summary.comparison
    if w is None:
        return ("Welch's t-test needs at least two finished seeds of each model; run "
                "`bench run --suite cifar10 --seeds 2` (or more) and report again.")
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
        ["python", values("python")], ["torch", values("torch")], ["torchvision", values("torchvision")],
        ["numpy", values("numpy")], ["device", values("device")],
    ]
    for r in summary.rows:
        seeds = ", ".join(str(s) for s in r.runs.seed) if not r.runs.empty else "-"
        rows.append([f"`{r.experiment}`", f"seeds {seeds}; data {_data_text(r.runs)}"])
    return table(["", "value"], rows)


def runs_table(summary: Summary) -> str:
    rows = []
    for r in summary.rows:
        for _, run in r.runs.iterrows():
            rows.append([
                f"`{run.run_name}`", str(run.seed), str(run.epochs_done), pct(run.get("final_test_acc")),
                pct(run.get("best_test_acc")), str(run.best_epoch) if pd.notna(run.best_epoch) else "-",
                f"`{run.run_id}`",
            ])
    return table(["run", "seed", "epochs", "final test acc", "best test acc (val-chosen)", "best epoch", "MLflow run id"], rows)


def notes_text(summary: Summary) -> str:
    out = []
    for r in summary.rows:
        out.append(f"**{r.reported.label}** (`{r.experiment}`)\n")
        out.append(f"- Reported figures: {r.reported.curves_source}; hardware: {r.reported.hardware_source}.")
        out += [f"- {note}" for note in r.reported.notes]
        if r.recipe_diff:
            out.append(f"- These runs differ from the paper recipe in: {', '.join(f'`{k}`' for k in r.recipe_diff)}.")
        if r.excluded:
            left = ", ".join(f"{n} ({why})" for why, n in sorted(r.excluded.items()))
            out.append(f"- Runs left out: {left}.")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


VERDICT_TEXT = f"""\
How to read the verdict: the suite's final test accuracy is the mean over seeds with a 95 %
t-interval (n - 1 degrees of freedom). **reproduced**: the reported final figure lies inside that
interval widened by {100 * stats.TOLERANCE:.0f} point on each side (with one seed: within
{100 * stats.TOLERANCE:.0f} point of it). **above** / **below**: the suite's widened interval lies wholly
above / below the reported figure. **not comparable**: the runs are not the reported recipe on the
full dataset (a subset of CIFAR, as in the smoke profile, or other settings: see the notes), so
the numbers show that the suite runs and learns, not whether it reproduces.
The reported best is the highest reported test accuracy (chosen on the test set); the suite's best
is the test accuracy at the epoch with the highest validation accuracy."""


def _caveat(summary: Summary) -> list[str]:
    apart = [r for r in summary.rows if r.why_not_comparable]
    if not apart:
        return []
    which = "None of these runs is" if len(apart) == len(summary.rows) else f"{len(apart)} of {len(summary.rows)} rows are not"
    return [
        f"> {which} the reported recipe on the full dataset (profile `{summary.profile}`): the figures show "
        "that the suite runs and learns, and are not comparable to the reported ones. Run "
        f"`bench run --suite {summary.suite} --profile paper` for a comparison.\n"
    ]


def markdown(summary: Summary, figures: dict[str, str], tuning: str = "") -> str:
    parts = [
        f"# Report: suite `{summary.suite}`, profile `{summary.profile}`\n",
        "Generated by `bench report` from the runs in MLflow and the reported figures in "
        "`experiments/reference/`.\n",
        "## Did it reproduce?\n",
        *_caveat(summary),
        summary_table(summary) + "\n",
        VERDICT_TEXT + "\n",
        "## Curves\n",
        "The reported run as a line with markers; the suite's seeds as their mean with a 95 % band.\n",
    ]
    for key, title in (("test_acc", "Test accuracy against epoch"), ("train_loss", "Training loss against epoch")):
        if key in figures:
            parts.append(f"![{title}]({figures[key]})\n")
    if all(n in [r.experiment for r in summary.rows] for n in BOTTLENECK_PAIR):
        parts += ["## Bottleneck against ResNet-B\n", _comparison_text(summary) + "\n"]
        if "comparison" in figures:
            parts.append(f"![Bottleneck against ResNet-B, test accuracy]({figures['comparison']})\n")
    if tuning:
        parts.append(tuning)
    parts += [
        "## Environment\n", environment_table(summary) + "\n",
        "## Runs\n", runs_table(summary) + "\n",
        "## Sources and notes\n", notes_text(summary),
    ]
    return "\n".join(parts)


def write(summary: Summary, out_dir: Path, studies: Studies | None = None) -> Path:
    """Write README.md and the figures into `out_dir`; image links are relative to the markdown.
    `studies` (from `results.load_studies`) adds the tuning section."""
    from bench.report import figures

    out_dir.mkdir(parents=True, exist_ok=True)
    written = figures.draw_all(summary, out_dir)
    tuning = ""
    if studies is not None and studies.handles:
        from bench.report import studies as study_section  # imports optuna: only when there are studies

        tuning = study_section.markdown(studies, study_section.draw(studies, out_dir))
    path = out_dir / "README.md"
    path.write_text(markdown(summary, written, tuning), encoding="utf-8")
    return path
