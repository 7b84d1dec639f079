"""The report's tuning section: one part per Optuna study, with optuna's matplotlib plots
(optimization history, parameter importances, parallel coordinates, the intermediate values the
pruner saw and the timeline of the trials) and a table of the best trials.

Tables come from the trials frame of `results.load_studies`; the plots are optuna's own, drawn on
the study handles it returns. Both are sorted and formatted so the same studies give the same bytes.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

import matplotlib
import optuna
import pandas as pd

from bench import process
from bench.report import pct, table
from bench.results import TRIAL_COLUMNS, Studies

process.quiet("optuna")  # its import resets its logger; the in-memory copies of a study would each log a line

TOP = 5  # best trials in each study's table
PLOTS = {
    "history": "Optimization history",
    "importances": "Parameter importances",
    "parallel": "Parallel coordinates",
    "intermediate": "Intermediate values (val_acc per epoch, as the pruner saw them)",
    "timeline": "Timeline (when each trial ran, and how it ended)",
}
DPI = 100


def file_stem(study: str) -> str:
    """A file name for the study's plots and tables; where characters had to be replaced, a short
    hash of the name keeps two studies ("a b", "a_b") from writing the same files."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", study)
    if safe != study:
        safe += "-" + hashlib.sha256(study.encode()).hexdigest()[:8]
    return "tuning_" + safe


def params_of(trials: pd.DataFrame) -> list[str]:
    return [c for c in trials.columns if c not in TRIAL_COLUMNS and trials[c].notna().any()]


def _draw(kind: str, study: optuna.Study):
    vis = optuna.visualization.matplotlib
    if kind == "history":
        return vis.plot_optimization_history(study, target_name="val_acc")
    if kind == "importances":
        # PED-ANOVA, optuna's default evaluator, is deterministic; it needs two complete trials.
        return vis.plot_param_importances(study, target_name="val_acc")
    if kind == "intermediate":
        return vis.plot_intermediate_values(study)
    if kind == "timeline":
        return vis.plot_timeline(_ended(study))
    return vis.plot_parallel_coordinate(study, target_name="val_acc")


def _ended(study: optuna.Study) -> optuna.Study:
    """The study's trials that have ended, in memory: optuna draws a running trial up to the clock
    of the moment it draws, and the same store must give the same figure."""
    copy = optuna.create_study(directions=study.directions)
    copy.add_trials([t for t in study.get_trials(deepcopy=False) if t.state.is_finished()])
    return copy


def drawable(kind: str, trials: pd.DataFrame) -> bool:
    """Whether optuna can draw the plot: the timeline needs a started trial, the intermediate
    values a reported epoch, importances two complete trials with different values, the others
    a complete trial."""
    complete = trials[trials.state == "COMPLETE"]
    if kind == "timeline":
        return bool((trials.datetime_start.notna() & trials.state.isin(["COMPLETE", "PRUNED", "FAIL"])).any())
    if kind == "intermediate":  # optuna draws the complete, pruned and running trials only
        return bool(((trials.epochs > 0) & trials.state.isin(["COMPLETE", "PRUNED", "RUNNING"])).any())
    if kind == "importances":
        return complete.value.nunique() >= 2
    return not complete.empty


def draw(studies: Studies, out_dir: Path) -> dict[str, dict[str, str]]:
    """Draw each study's plots into `out_dir`; returns {study: {plot kind: file name}}.

    A plot needs complete trials (importances need two with different values); one that cannot be
    drawn is left out, and the markdown says why."""
    from matplotlib import pyplot as plt

    written: dict[str, dict[str, str]] = {}
    plt.switch_backend("Agg")  # optuna draws through pyplot; no window, whatever the user's backend
    # optuna sets its ggplot style inside; the context puts the user's settings back afterwards.
    with matplotlib.style.context("default"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        for name, study in sorted(studies.handles.items()):
            trials = studies.trials[studies.trials.study == name]
            written[name] = {}
            for kind in PLOTS:
                if not drawable(kind, trials):
                    continue
                ax = _draw(kind, study)
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                path = out_dir / f"{file_stem(name)}_{kind}.png"
                fig.savefig(path, dpi=DPI, metadata={"Software": None}, bbox_inches="tight")
                plt.close(fig)
                written[name][kind] = path.name
    return written


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def best_table(trials: pd.DataFrame) -> list[str]:
    """The best complete trials by validation accuracy (ties: the earlier trial), and the recipe's
    trial below them when it is not among them."""
    params = params_of(trials)
    complete = trials[trials.state == "COMPLETE"].sort_values(
        ["value", "number"], ascending=[False, True], kind="stable"
    )
    shown = complete.head(TOP)
    recipe = trials[trials.recipe & ~trials.number.isin(shown.number)]
    rows = []
    for _, t in pd.concat([shown, recipe]).iterrows():
        label = f"{t.number}" + (" (recipe)" if t.recipe else "")
        value = pct(t.value) if t.state == "COMPLETE" else t.state.lower()
        rows.append([label, value, str(t.epochs), *[_value(t[p]) for p in params]])
    return [table(["trial", "best val_acc", "epochs", *params], rows)]


def counts_text(trials: pd.DataFrame) -> str:
    states = trials.state.value_counts()
    parts = [f"{states.get(s, 0)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL") if states.get(s, 0)]
    running = states.get("RUNNING", 0) + states.get("WAITING", 0)
    if running:
        parts.append(f"{running} running or waiting")
    return f"{len(trials)} trials ({', '.join(parts) or 'none finished'}), {int(trials.epochs.sum())} epochs trained"


def markdown(studies: Studies, figures: dict[str, dict[str, str]], ablations: dict[str, str] | None = None) -> str:
    """The tuning section: per study the counts, the best trial, the plots and the best-trials table.
    `ablations`: study name -> the ablation whose config it tuned (`ablations.study_links`)."""
    if not studies.handles:
        return ""
    parts = [
        "## Tuning\n",
        "Optuna studies of the suite's experiments (`bench tune`). The objective is the best "
        "validation accuracy of a trial; the test set is never evaluated during a search. Trial 0 is "
        "the reported recipe.\n",
    ]
    for name in sorted(studies.handles):
        trials = studies.trials[studies.trials.study == name].sort_values("number", kind="stable")
        if trials.empty:
            parts.append(f"### Study `{name}`\n\nNo trials yet.\n")
            continue
        first = trials.iloc[0]
        parts.append(f"### Study `{name}`: {first.experiment}, profile `{first.profile}`\n")
        if ablations and name in ablations:
            parts.append(f"Tuned on the config of {ablations[name]}.\n")
        parts.append(counts_text(trials) + ".\n")
        complete = trials[trials.state == "COMPLETE"]
        drawn = figures.get(name, {})
        if complete.empty:
            parts.append("No complete trial yet.\n")
            parts += [
                f"![{PLOTS[kind]}, {name}]({drawn[kind]})\n" for kind in ("intermediate", "timeline") if kind in drawn
            ]
            continue
        best = complete.sort_values(["value", "number"], ascending=[False, True], kind="stable").iloc[0]
        parts.append(
            f"Best: trial {best.number}, val_acc {best.value:.4f}. The command that trains it for several "
            f"seeds: `bench tune {first.experiment} --profile {first.profile} --study {name} --best`.\n"
        )
        parts += best_table(trials)
        parts.append("")
        for kind, title in PLOTS.items():
            if kind in drawn:
                parts.append(f"![{title}, {name}]({drawn[kind]})\n")
        if "importances" not in drawn:
            parts.append("Parameter importances need two complete trials with different values.\n")
    return "\n".join(parts)
