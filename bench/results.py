"""MLflow -> tidy pandas DataFrames: one row per run, and one row per (run, metric, epoch).

The report reads these frames and nothing else, so it can be tested with frames built by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

# Tags written by `bench run` (bench.<name>) that become columns of the runs frame.
TAG_COLUMNS = (
    "kind",
    "experiment",
    "profile",
    "seed",
    "config_hash",
    "status",
    "epochs_done",
    "best_epoch",
    "best_split",
    "device",
    "git_commit",
    "python",
    "torch",
    "torchvision",
    "numpy",
    "data_source",
    "data_complete",
    "data_train",
    "data_val",
    "data_test",
)
INT_COLUMNS = ("seed", "epochs_done", "best_epoch", "data_train", "data_val", "data_test")
RUN_KEYS = ["experiment", "profile", "seed", "config_hash", "run_id"]
SUMMARY_METRICS = ("best_val_acc", "best_test_acc")  # logged once, at the best epoch
TIME_METRICS = ("train_time_s", "epoch_time_s")  # per epoch; each run also gets its total_<metric>
STEP_METRICS = ("train_step_loss",)  # logged every few optimizer steps, not per epoch


def per_epoch(metric: str) -> bool:
    """Whether a metric is one value per epoch (step = epoch): not a per-step loss, nor one of
    MLflow's system metrics (system/..., sampled every few seconds). Only these are read."""
    return metric not in STEP_METRICS and not metric.startswith("system/")


@dataclass
class Results:
    runs: pd.DataFrame  # run_id, run_name, mlflow_status, start_time, the TAG_COLUMNS, final_<metric>, best_*, total_<time metric>, params by dotted key
    metrics: pd.DataFrame  # experiment, profile, seed, config_hash, run_id, metric, epoch, value


def frames(records: list[dict]) -> Results:
    """Build the two frames from run records as `tracking.Tracker.read_runs` returns them."""
    run_rows, metric_rows = [], []
    for rec in records:
        tags = rec["tags"]
        row = {
            "run_id": rec["run_id"],
            "run_name": rec["run_name"],
            "mlflow_status": rec["status"],
            "start_time": rec["start_time"],
        }
        row.update({col: tags.get(f"bench.{col}") for col in TAG_COLUMNS})
        row["kind"] = row["kind"] or "cell"  # suite cells; tuning writes "study" and "trial" runs
        for metric, history in rec["history"].items():
            if not history:
                continue
            if metric in SUMMARY_METRICS:
                row[metric] = history[-1][1]
                continue
            row[f"final_{metric}"] = history[-1][1]
            if metric in TIME_METRICS:
                row[f"total_{metric}"] = sum(value for _, value in history)
            metric_rows += [(metric, int(step), float(value)) + (rec["run_id"],) for step, value in history]
        row.update(rec["params"])
        run_rows.append(row)
    runs = pd.DataFrame(run_rows, columns=_run_columns(run_rows))
    for col in INT_COLUMNS:
        runs[col] = pd.to_numeric(runs[col], errors="coerce").astype("Int64")
    runs = runs.sort_values(["experiment", "profile", "seed", "start_time", "run_id"], kind="stable", ignore_index=True)
    metrics = pd.DataFrame(metric_rows, columns=["metric", "epoch", "value", "run_id"])
    metrics = metrics.merge(runs[RUN_KEYS], on="run_id", how="left")[RUN_KEYS + ["metric", "epoch", "value"]]
    metrics = metrics.sort_values(RUN_KEYS + ["metric", "epoch"], kind="stable", ignore_index=True)
    return Results(runs=runs, metrics=metrics)


def _run_columns(rows: list[dict]) -> list[str]:
    fixed = ["run_id", "run_name", "mlflow_status", "start_time", *TAG_COLUMNS]
    extra = sorted({k for r in rows for k in r} - set(fixed))
    return fixed + extra


def load(tracking_uri: str, experiments: list[str]) -> Results:
    """The suite's runs of the named experiments in the tracking store, with their per-epoch
    metrics. The server picks them by their bench.experiment tag, so tuning trials and the step
    and system metrics, which the report does not use, are never read. Runs of every profile are
    read: the report counts the other profiles' runs among those it leaves out."""
    from bench.tracking import Tracker

    tracker = Tracker(tracking_uri)
    records = []
    for name in experiments:
        records += tracker.read_runs(name, {"bench.experiment": name}, per_epoch)
    return frames(records)


# --- Optuna studies ------------------------------------------------------------------------------

TRIAL_COLUMNS = [
    "study",
    "experiment",
    "profile",
    "number",
    "state",
    "value",
    "epochs",
    "duration_s",
    "datetime_start",
    "datetime_complete",
    "recipe",
    "mlflow_run_id",
]
INTERMEDIATE_COLUMNS = ["study", "number", "epoch", "value"]


@dataclass
class Studies:
    trials: pd.DataFrame  # TRIAL_COLUMNS, then the trial's params by dotted key
    handles: dict  # study name -> optuna.Study, for optuna's own plots
    intermediate: pd.DataFrame  # INTERMEDIATE_COLUMNS: what each trial reported to the pruner, per epoch


def study_owner(name: str, user_attrs: dict, experiments: list[str]) -> tuple[str, str] | None:
    """(experiment, profile) of a study: its bench.* attributes, else its name `<experiment>-<profile>`."""
    if "bench.experiment" in user_attrs:
        return user_attrs["bench.experiment"], user_attrs.get("bench.profile", "")
    for experiment in sorted(experiments, key=len, reverse=True):
        if name.startswith(experiment + "-"):
            return experiment, name[len(experiment) + 1 :]
    return None


def trial_frame(study: str, experiment: str, profile: str, trials: list) -> pd.DataFrame:
    """One row per trial (optuna FrozenTrials) of one study."""
    rows = []
    for t in trials:
        row = {
            "study": study,
            "experiment": experiment,
            "profile": profile,
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "epochs": len(t.intermediate_values),
            "duration_s": t.duration.total_seconds() if t.duration is not None else None,
            "datetime_start": _iso(t.datetime_start),
            "datetime_complete": _iso(t.datetime_complete),
            "recipe": bool(t.user_attrs.get("bench.recipe", False)),
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
        }
        row.update(t.params)
        rows.append(row)
    extra = sorted({k for r in rows for k in r} - set(TRIAL_COLUMNS))
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS + extra)


def _iso(when) -> str | None:
    return when.isoformat() if when is not None else None


def intermediate_frame(study: str, trials: list) -> pd.DataFrame:
    """One row per (trial, epoch) of one study: the value the trial reported to the pruner."""
    rows = [(study, t.number, int(step), float(v)) for t in trials for step, v in sorted(t.intermediate_values.items())]
    return pd.DataFrame(rows, columns=INTERMEDIATE_COLUMNS)


def load_studies(storage_url: str, experiments: list[str]) -> Studies:
    """Every Optuna study in the storage that tunes one of the named experiments, sorted by name.
    Studies are told apart by their names and attributes alone: the trials of other studies are
    never read (optuna.get_all_study_summaries would read them all to count them)."""
    import optuna

    store = optuna.storages.RDBStorage(storage_url, skip_table_creation=True)  # read only: never make tables
    frames, steps, handles = [], [], {}
    for s in sorted(store.get_all_studies(), key=lambda s: s.study_name):
        owner = study_owner(s.study_name, s.user_attrs, experiments)
        if owner is None or owner[0] not in experiments:
            continue
        study = optuna.load_study(study_name=s.study_name, storage=store)
        handles[s.study_name] = study
        trials = study.get_trials(deepcopy=False)
        frames.append(trial_frame(s.study_name, *owner, trials))
        steps.append(intermediate_frame(s.study_name, trials))
    if not frames:
        return Studies(
            trials=pd.DataFrame(columns=TRIAL_COLUMNS),
            handles={},
            intermediate=pd.DataFrame(columns=INTERMEDIATE_COLUMNS),
        )
    trials = pd.concat(frames, ignore_index=True)
    trials = trials[TRIAL_COLUMNS + sorted(set(trials.columns) - set(TRIAL_COLUMNS))]
    return Studies(trials=trials, handles=handles, intermediate=pd.concat(steps, ignore_index=True))
