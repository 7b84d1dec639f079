"""The reported runs as data: experiments/reference/curves.csv and runs.toml -> DataFrames.

curves.csv holds every per-epoch figure the sources report, one row per (experiment, metric,
epoch) with the seed file and line it came from; runs.toml the facts around each run (the epoch
of the headline figure, targets, hardware, times).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench import config
from bench.errors import UserError

CURVE_COLUMNS = ["experiment", "metric", "epoch", "value", "source", "line", "raw"]


@dataclass(frozen=True)
class ReportedRun:
    experiment: str
    label: str
    final_epoch: int
    hardware: str
    hardware_source: str
    curves_source: str
    seconds_per_epoch_kind: str  # "measured": the mean of the logged durations; "estimate": stated below
    seconds_per_epoch_metric: str  # the suite's metric that times the same: train_time_s or epoch_time_s
    seconds_per_epoch: float | None = None
    target_test_acc: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def reference_dir() -> Path:
    return config.experiments_dir() / "reference"


def load_curves() -> pd.DataFrame:
    path = reference_dir() / "curves.csv"
    if not path.is_file():
        raise UserError(
            f"{path}: the reported figures are missing (restore experiments/reference/ from the repository)"
        )
    df = pd.read_csv(
        path,
        dtype={"experiment": str, "metric": str, "epoch": int, "value": float, "source": str, "line": int, "raw": str},
    )
    if list(df.columns) != CURVE_COLUMNS:
        raise UserError(f"{path}: expected the columns {', '.join(CURVE_COLUMNS)}")
    return df


def load_runs() -> dict[str, ReportedRun]:
    path = reference_dir() / "runs.toml"
    if not path.is_file():
        raise UserError(f"{path}: the reported runs are missing (restore experiments/reference/ from the repository)")
    runs = {}
    for name, entry in config.read_toml(path).items():
        try:
            runs[name] = ReportedRun(experiment=name, **{**entry, "notes": tuple(entry.get("notes", ()))})
        except TypeError as exc:
            raise UserError(f"{path}: [{name}]: {exc}") from None
    return runs


def headline(curves: pd.DataFrame, run: ReportedRun) -> dict[str, float | int | None]:
    """The reported final test accuracy (at `final_epoch`) and the best one up to that epoch.

    The reported best is the maximum over the reported test accuracies, chosen on the test set
    itself, so it flatters the run; the suite's best is chosen on validation accuracy.
    """
    acc = curves[
        (curves.experiment == run.experiment) & (curves.metric == "test_acc") & (curves.epoch <= run.final_epoch)
    ]
    final = acc[acc.epoch == run.final_epoch]
    best = acc.loc[acc.value.idxmax()] if len(acc) else None
    times = curves[(curves.experiment == run.experiment) & (curves.metric == run.seconds_per_epoch_metric)]
    seconds = (
        float(times.value.mean()) if run.seconds_per_epoch_kind == "measured" and len(times) else run.seconds_per_epoch
    )
    return {
        "final_test_acc": float(final.value.iloc[0]) if len(final) else None,
        "best_test_acc": float(best.value) if best is not None else None,
        "best_epoch": int(best.epoch) if best is not None else None,
        "seconds_per_epoch": seconds,
    }
