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


@dataclass(frozen=True)
class Recipe:
    """A config as the report compares it: its config hash (result keys only) and its result
    keys as MLflow params (seed left out)."""

    config_hash: str
    params: dict[str, str]
    earlier_hash: str | None = None  # the hash bench gave the same config before (bench.config.RunConfig.earlier_hash)


def recipe(experiment: str, profile: str) -> Recipe:
    """The experiment's recipe under the profile: `config.load` with no --set."""
    cfg = config.load(experiment, profile=profile, seed=0)
    params = cfg.params()
    return Recipe(cfg.config_hash(), {k: params[k] for k in cfg.result_keys() if k != "seed"}, cfg.earlier_hash())


@dataclass
class Row:
    """One reported run beside the suite's runs of one config: the recipe's (label None), or
    another config's (tuned values, an ablation), labelled by the keys where it differs."""

    reported: reference.ReportedRun
    figures: dict  # reference.headline(): final_test_acc, best_test_acc, best_epoch, seconds_per_epoch
    runs: pd.DataFrame  # the selected runs (finished, one profile, one config)
    final: stats.Interval
    best: stats.Interval
    verdict: str
    why_not_comparable: str | None
    recipe_diff: list[str]  # result keys where this profile's recipe differs from the paper's
    excluded: dict[str, int] = field(default_factory=dict)
    seconds_per_epoch: float | None = None  # of the metric the reported figure names (train_time_s or epoch_time_s)
    label: str | None = None

    @property
    def experiment(self) -> str:
        return self.reported.experiment

    @property
    def is_recipe(self) -> bool:
        return self.label is None


@dataclass
class Summary:
    suite: str
    profile: str
    rows: list[Row]
    comparison: stats.Welch | None
    metrics: pd.DataFrame  # per-epoch metrics of the selected runs
    curves: pd.DataFrame  # the reported per-epoch figures of the suite's experiments

    @property
    def recipe_rows(self) -> list[Row]:
        """One row per reported run: the recipe's runs, whatever other configs ran beside them."""
        return [r for r in self.rows if r.is_recipe]


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


def select(runs: pd.DataFrame, experiment: str, profile: str) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """The finished runs of one experiment and profile by config hash (the newest run of each
    seed), and how many runs were left out and why."""
    mine = runs[(runs.kind == "cell") & (runs.experiment == experiment)]
    excluded: dict[str, int] = {}
    other = int((mine.profile != profile).sum())
    if other:
        excluded["other profiles"] = other
    mine = mine[mine.profile == profile]
    done = mine[(mine.mlflow_status == "FINISHED") & (mine.status == "finished")]
    if len(mine) - len(done):
        excluded["not finished"] = len(mine) - len(done)
    # A cell re-run from scratch leaves two finished runs of one seed: keep the newest.
    done = done.sort_values("start_time").drop_duplicates(["config_hash", "seed"], keep="last")
    return {h: g.sort_values("seed", ignore_index=True) for h, g in done.groupby("config_hash", sort=True)}, excluded


def differing(params: dict[str, str], base: dict[str, str]) -> list[str]:
    """The keys of either set where the two differ, sorted."""
    return sorted(k for k in base.keys() | params.keys() if params.get(k) != base.get(k))


def variant_label(runs: pd.DataFrame, base: Recipe) -> str:
    """A config by the result keys where its runs' params differ from the recipe's:
    "optim.lr=0.05, data.batch_size=256"; its hash when the params do not show it."""
    first = runs.iloc[0]
    params = {k: str(first[k]) for k in base.params if k in runs.columns and pd.notna(first[k])}
    keys = differing(params, base.params)
    return ", ".join(f"{k}={params.get(k, '-')}" for k in keys) or f"config {first.config_hash}"


def _values(runs: pd.DataFrame, column: str) -> pd.Series:
    """One value per run of a column that runs without that metric lack entirely."""
    return runs[column].dropna() if column in runs else pd.Series(dtype=float)


def _row(results: Results, run: reference.ReportedRun, figures: dict, runs: pd.DataFrame, diff: list[str],
         excluded: dict[str, int], label: str | None) -> Row:
    final = stats.accuracy_ci(_values(runs, "final_test_acc"))
    best = stats.accuracy_ci(_values(runs, "best_test_acc"))
    if runs.empty:
        why = "no finished runs"
    elif not _complete_data(runs):
        why = "subset of CIFAR"
    elif label is not None:
        why = "another config"
    elif diff:
        why = "recipe differs"
    else:
        why = None
    verdict = "not comparable" if why else stats.verdict(figures["final_test_acc"], final)
    metrics = results.metrics
    times = metrics[metrics.run_id.isin(runs.run_id) & (metrics.metric == run.seconds_per_epoch_metric)]
    return Row(
        reported=run, figures=figures, runs=runs, final=final, best=best, verdict=verdict, why_not_comparable=why,
        recipe_diff=diff, excluded=excluded, seconds_per_epoch=float(times.value.mean()) if len(times) else None, label=label,
    )


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
    recipes: dict[str, Recipe] | None = None,
    paper: dict[str, Recipe] | None = None,
) -> Summary:
    """Put each experiment's runs beside its reported figures: a row for the recipe's runs (the
    config hash of the experiment under the profile, no --set), then one per other config.
    `curves` and `reported` default to experiments/reference/, `recipes` to each experiment's
    recipe under the chosen profile and `paper` to its recipe under the paper profile."""
    curves = reference.load_curves() if curves is None else curves
    reported = reference.load_runs() if reported is None else reported
    profile = choose_profile(results.runs, profile)
    rows = []
    for name in experiments:
        if name not in reported:
            continue
        groups, excluded = select(results.runs, name, profile)
        mine = recipes[name] if recipes is not None else recipe(name, profile)
        theirs = paper[name] if paper is not None else recipe(name, "paper")
        diff = [] if mine.config_hash == theirs.config_hash else differing(mine.params, theirs.params)
        figures = reference.headline(curves, reported[name])
        empty = results.runs.iloc[0:0]
        # Runs of the recipe made before the hash counted only result keys (not yet carried over
        # by a `bench run`) are the recipe's too; a seed run under both counts once, the newest.
        parts = [g for g in (groups.pop(mine.config_hash, None), groups.pop(mine.earlier_hash, None)) if g is not None]
        ours = pd.concat(parts).sort_values("start_time").drop_duplicates("seed", keep="last").sort_values("seed", ignore_index=True) if parts else empty
        rows.append(_row(results, reported[name], figures, ours, diff, excluded, None))
        variants = [(variant_label(runs, mine), runs) for runs in groups.values()]
        rows += [_row(results, reported[name], figures, runs, diff, {}, label) for label, runs in sorted(variants, key=lambda v: v[0])]
    by_name = {r.experiment: r for r in rows if r.is_recipe}
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
    clipped = " (t interval cut at the bound)" if ci.clipped else ""
    return f"{pct(ci.mean)} [{100 * ci.low:.2f}, {100 * ci.high:.2f}]{clipped}"


def _best_text(row: "Row") -> str:
    """The val-chosen best; runs trained with no validation split (data.val_size = 0) have none."""
    if row.best.n == 0 and not row.runs.empty and (row.runs.data_val.fillna(-1) == 0).all():
        return "- (no validation split)"
    return ci_text(row.best)


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
        "reported run", "reported final (epoch)", "reported best (epoch)", "suite final, mean [95 % CI]",
        "seeds", "difference", "verdict", "suite best, val-chosen", "epochs theirs / ours",
        "s per epoch theirs / ours (timed)", "hardware theirs / ours", "profile, data",
    ]
    rows = []
    for r in summary.rows:
        f = r.figures
        diff = "-" if r.final.n == 0 or f["final_test_acc"] is None else f"{100 * (r.final.mean - f['final_test_acc']):+.2f} pt"
        verdict = f"{r.verdict} ({r.why_not_comparable})" if r.why_not_comparable else f"**{r.verdict}**"
        name = f"{r.reported.label} (`{r.experiment}`)" + ("" if r.is_recipe else f", other config: {r.label}")
        rows.append([
            name,
            f"{pct(f['final_test_acc'])} ({r.reported.final_epoch})",
            f"{pct(f['best_test_acc'])} ({f['best_epoch']})",
            ci_text(r.final), str(r.final.n), diff, verdict, _best_text(r),
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
        rows.append([f"`{r.experiment}`" + (f", {r.label}" if r.label else ""), f"seeds {seeds}; data {_data_text(r.runs)}"])
    return table(["", "value"], rows)


def runs_table(summary: Summary) -> str:
    rows = []
    for r in summary.rows:
        for _, run in r.runs.iterrows():
            rows.append([
                f"`{run.run_name}`", r.label or "recipe", str(run.seed), str(run.epochs_done), pct(run.get("final_test_acc")),
                pct(run.get("best_test_acc")), str(run.best_epoch) if pd.notna(run.best_epoch) else "-",
                f"`{run.run_id}`",
            ])
    header = ["run", "config", "seed", "epochs", "final test acc", "best test acc (val-chosen)", "best epoch", "MLflow run id"]
    return table(header, rows)


def notes_text(summary: Summary) -> str:
    out = []
    for r in summary.recipe_rows:
        out.append(f"**{r.reported.label}** (`{r.experiment}`)\n")
        out.append(f"- Reported figures: {r.reported.curves_source}; hardware: {r.reported.hardware_source}.")
        out += [f"- {note}" for note in r.reported.notes]
        if r.recipe_diff:
            out.append(f"- The recipe of profile `{summary.profile}` differs from the paper recipe in: {', '.join(f'`{k}`' for k in r.recipe_diff)}.")
        others = [o.label for o in summary.rows if o.experiment == r.experiment and not o.is_recipe]
        if others:
            out.append(f"- Other configs, in rows of their own: {'; '.join(f'`{o}`' for o in others)}.")
        if not r.runs.empty and (r.runs.data_val.fillna(-1) == 0).all():
            out.append("- Trained on the whole training set (`data.val_size = 0`), as reported: no validation split, "
                       "so no val-chosen best; the comparison is the test accuracy at the last epoch.")
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
(training and the epoch's evaluation)."""


def _caveat(summary: Summary) -> list[str]:
    rows = summary.recipe_rows
    apart = [r for r in rows if r.why_not_comparable]
    if not apart:
        return []
    which = "None of these runs is" if len(apart) == len(rows) else f"{len(apart)} of {len(rows)} reported runs' rows are not"
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
        "The reported run as a line with markers; the suite's seeds of the recipe as their mean with a 95 % band.\n",
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
