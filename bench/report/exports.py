"""The data behind the report's tables and figures, as CSV files beside its markdown.

runs.csv      one row per run read: identifying tags, the summary row it counts in (empty: left
              out), its model's cost, status, final / best / total metrics and its params
epochs.csv    one row per run and epoch: the run's keys and every per-epoch metric (lr included)
reported.csv  the reported per-epoch figures the report compared with (experiments/reference/)
ablations.csv one row per experiment and line of its ablation table (recipe, reported figure,
              each variant): seeds, mean and interval, difference from the recipe, p, verdict
trials-<study>.csv, intermediate-<study>.csv
              per Optuna study, one row per trial; one row per trial and epoch reported to the pruner

Rows are sorted and floats written in full (pandas' shortest round-trip repr): the same store
gives the same bytes, and pandas reads back the numbers the report used.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.report import ablations
from bench.results import RUN_KEYS, Studies

RUN_LEAD = [*RUN_KEYS, "run_name", "report_row", "model_parameters", "gflops_per_image"]


def runs_frame(summary) -> pd.DataFrame:
    """Every run the report read; `report_row` is "recipe" or the other config's label for the
    runs a summary row counts, empty for the runs it left out (other profile, not finished, an
    older run of the same seed)."""
    runs = summary.results.runs.copy()
    placed = []
    for r in summary.rows:
        placed += [
            (
                run_id,
                "recipe" if r.is_recipe else r.label,
                r.cost.parameters if r.cost else None,
                r.cost.gflops if r.cost else None,
            )
            for run_id in r.runs.run_id
        ]
    rows = pd.DataFrame(placed, columns=["run_id", "report_row", "model_parameters", "gflops_per_image"])
    rows["model_parameters"] = rows.model_parameters.astype("Int64")
    runs = runs.merge(rows, on="run_id", how="left")
    return runs[RUN_LEAD + [c for c in runs.columns if c not in RUN_LEAD]]


def epochs_frame(summary) -> pd.DataFrame:
    """One row per run and epoch, one column per metric (sorted by name)."""
    m = summary.results.metrics
    wide = m.groupby(RUN_KEYS + ["epoch", "metric"], dropna=False, sort=True).value.last().unstack("metric")
    wide.columns.name = None
    return wide.reset_index()


def study_file(prefix: str, study: str) -> str:
    from bench.report.studies import file_stem  # imports optuna: only with studies

    return f"{prefix}-{file_stem(study).removeprefix('tuning_')}.csv"


def write(summary, out_dir: Path, studies: Studies | None = None, ablation_tables: list | None = None) -> list[str]:
    """Write the CSV files into `out_dir`; returns their names. `ablation_tables`
    (`ablations.tables`) adds ablations.csv when an experiment has an ablation."""
    frames = {
        "runs.csv": runs_frame(summary),
        "epochs.csv": epochs_frame(summary),
        "reported.csv": summary.curves.sort_values(["experiment", "metric", "epoch"], kind="stable"),
    }
    if ablation_tables:
        frames["ablations.csv"] = ablations.frame(ablation_tables)
    if studies is not None:
        for name in sorted(studies.handles):
            frames[study_file("trials", name)] = studies.trials[studies.trials.study == name].sort_values(
                "number", kind="stable"
            )
            steps = studies.intermediate[studies.intermediate.study == name]
            frames[study_file("intermediate", name)] = steps.sort_values(["number", "epoch"], kind="stable")
    for name, frame in frames.items():
        frame.to_csv(out_dir / name, index=False, lineterminator="\n")
    return list(frames)
