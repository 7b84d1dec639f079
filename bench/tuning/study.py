"""A study: its storage (with heartbeats), pruner, opening and continuation, its MLflow parent run,
and how its trials are shown (the sampler: bench.tuning.sampling).

A study is one (experiment, profile) search. Each trial trains the experiment with the trial's
values at the dotted config paths it samples (`optim.lr`, ...), reports validation accuracy every
epoch to the pruner and returns the best validation accuracy; the test set never steers the search.
"""

from __future__ import annotations

import math
import shlex
import sys
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from bench import process
from bench.errors import UserError, redact, unusable
from bench.tuning.space import Param, as_sets

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OBJECTIVE = "val_acc"
STORAGE = "Optuna storage"  # outage.Unavailable.what of the study's database
process.quiet("optuna")


def storage(url: str, heartbeat_s: int) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats: a trial whose process died is failed once its heartbeat is
    older than twice the interval, and re-queued with the same parameters. Its calls wait out an
    outage of the database (bench.tuning.database)."""
    from bench.tuning.database import Storage

    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 5; they are what we want
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
            return Storage(
                url,
                heartbeat_interval=heartbeat_s,
                grace_period=2 * heartbeat_s,
                heartbeat_stale_trial_callback=retry,
                engine_kwargs={"connect_args": {"timeout": 30}} if url.startswith("sqlite") else None,
            )
    except Exception as exc:  # SQLAlchemy and optuna raise many types for a bad or unreachable URL
        raise unusable("Optuna storage", url, exc) from None


def pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        # After four finished trials, stop a trial whose validation accuracy at an epoch is below
        # the median of the earlier trials at that epoch.
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(
    store,
    name: str,
    *,
    sampler_,
    pruner_,
    first_trial: dict[str, Any],
    experiment: str,
    profile: str,
    base_config_hash: str | None = None,
) -> optuna.Study:
    """Create the study or load it; a new study gets the reported recipe as its first trial.

    The study records its experiment and profile (user attributes), so that `bench report` finds
    it whatever its name, and names its objective val_acc. `base_config_hash`: the config hash of
    what the trials start from (the recipe under the profile and the command's --set), recorded
    as `bench.base_config_hash` so that the report links a study of an ablation's config to it."""
    study = optuna.create_study(
        study_name=name, storage=store, sampler=sampler_, pruner=pruner_, direction="maximize", load_if_exists=True
    )
    if study.metric_names != [
        OBJECTIVE
    ]:  # optuna-dashboard's name for the value; also for a study made before it was set
        with warnings.catch_warnings():  # experimental since Optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([OBJECTIVE])
    before = study.user_attrs.get("bench.base_config_hash")
    trials = study.get_trials(deepcopy=False)
    trained = any(t.state != optuna.trial.TrialState.WAITING for t in trials)  # beyond a queued recipe trial
    if base_config_hash and before and before != base_config_hash and trained:
        raise UserError(
            f"study {name} tunes another config (hash {before}) than this command's ({base_config_hash}): "
            "its trials would mix the two; give this one its own --study NAME"
        )
    # A study that has trained trials and no recorded base was made by an older bench: what it
    # tuned is unknown. One with only its queued recipe trial (made by --best) has trained nothing.
    known_base = before is not None or not trained
    attrs = {
        "bench.experiment": experiment,
        "bench.profile": profile,
        "bench.base_config_hash": base_config_hash if known_base else None,
    }
    for key, value in attrs.items():
        if value is not None and study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)
    if not trials and not study.user_attrs.get("bench.recipe_enqueued"):
        study.set_user_attr("bench.recipe_enqueued", True)
        study.enqueue_trial(first_trial, user_attrs={"bench.recipe": True})
    return study


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def note_run(trial: optuna.Trial, run_name: str, url: str, tracking_uri: str) -> None:
    """The trial's note in optuna-dashboard (markdown, shown beside its values): its MLflow run,
    as a link on a tracking server, else with the `mlflow ui` command to open it. Nothing without
    optuna-dashboard: the user attributes mlflow_run_id and mlflow_run_url hold the same."""
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    from bench.tracking import absolute_uri, ui_command

    if url.startswith("http"):
        body = f"MLflow run [{run_name}]({url})"
    else:
        body = f"MLflow run `{run_name}`: `{ui_command(redact(absolute_uri(tracking_uri)))}`, then open `{url}` at the address it serves"
    save_note(trial, body + "\n")


# --- the study's MLflow parent run ------------------------------------------------------------------


class ParentRun:
    """One MLflow run per study: the search space as params, the best value and params as it goes.
    The run's tags name the study and its storage (password hidden); the study's user attributes
    mlflow_run_id and mlflow_run_url name the run (`url`, set where the study is opened, not in a worker)."""

    def __init__(
        self, tracker, experiment_id: str, study: optuna.Study, space: list[Param], *, profile: str, storage_url: str
    ) -> None:
        from bench.tracking import run_url

        self.tracker, self.client = tracker, tracker.client
        name = study.study_name
        found = tracker.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`optuna.study` = '{name}' and tags.`bench.kind` = 'study'",
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        if found:
            self.run_id = found[0].info.run_id
            tracker.reopen_run(self.run_id)
        else:
            tags = {
                "optuna.study": name,
                "bench.kind": "study",
                "bench.tuned_profile": profile,
                "optuna.storage": redact(storage_url),
            }
            self.run_id = tracker.start_run(experiment_id, name, tags)
            for p in space:
                self.client.log_param(self.run_id, f"search.{p.name}", p.describe())
        self.url = run_url(tracker.uri, experiment_id, self.run_id)
        for key, value in (("mlflow_run_id", self.run_id), ("mlflow_run_url", self.url)):
            if study.user_attrs.get(key) != value:
                study.set_user_attr(key, value)

    @classmethod
    def attach(cls, tracker, experiment_id: str, run_id: str) -> ParentRun:
        """The parent run another process created (a worker's view of it), checked to be a study's
        parent run in this experiment."""
        try:
            run = tracker.client.get_run(run_id)
        except Exception as exc:  # mlflow raises for an unknown id
            raise UserError(f"no MLflow run {run_id} in {redact(tracker.uri)}: {str(exc).splitlines()[0]}") from None
        if run.info.experiment_id != experiment_id or run.data.tags.get("bench.kind") != "study":
            raise UserError(f"MLflow run {run_id} is not a study's parent run in experiment {experiment_id}")
        self = cls.__new__(cls)
        self.tracker, self.client, self.run_id = tracker, tracker.client, run_id
        return self

    def close_dead_trials(self, study: optuna.Study) -> None:
        """A trial whose process died leaves its MLflow run RUNNING; once its heartbeat has failed
        it in Optuna, mark the run FAILED too."""
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            run_id = t.user_attrs.get("mlflow_run_id")
            if run_id and self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_tag(run_id, "optuna.state", "FAIL")
                self.tracker.end_run(run_id, "FAILED")

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.close_dead_trials(study)
        try:
            best = study.best_trial
        except ValueError:  # no complete trial yet
            return
        self.client.log_metric(self.run_id, "best_val_acc", best.value, step=trial.number)
        self.client.set_tag(self.run_id, "optuna.best_trial", str(best.number))
        for k, v in best.params.items():
            self.client.set_tag(self.run_id, f"best.{k}", str(v))
        self.client.log_metric(self.run_id, "finished_trials", finished(study), step=trial.number)

    def end(self, study: optuna.Study) -> None:
        self.close_dead_trials(study)
        self.tracker.end_run(self.run_id, "FINISHED")


def best_command(
    experiment: str,
    profile: str,
    params: dict[str, Any],
    *,
    fixed: list[str] = (),
    epochs: int | None = None,
    seeds: int = 3,
) -> str:
    """The `bench run` command that trains the trial's values (with the study's fixed overrides)."""
    parts = ["bench", "run", experiment, "--profile", profile, "--seeds", str(seeds)]
    if epochs is not None:
        parts += ["--epochs", str(epochs)]
    for s in [*fixed, *as_sets(params)]:
        parts += ["--set", shlex.quote(s)]
    return " ".join(parts)


def trial_line(trial: optuna.trial.FrozenTrial, done: int, total: int) -> str:
    values = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(trial.params.items()))
    result = f"val_acc {trial.value:.4f}" if trial.value is not None and not math.isnan(trial.value) else ""
    last = max(trial.intermediate_values) if trial.intermediate_values else 0
    attrs = trial.user_attrs
    if attrs.get("bench.surplus"):
        failed = "not run: the study was full"
    elif attrs.get("bench.failure") == "repeat":
        failed = "not run: another trial has these values"
    else:
        failed = "failed" + (f": {attrs['bench.failure_reason']}" if "bench.failure_reason" in attrs else "")
    state = {"COMPLETE": result, "PRUNED": f"pruned after epoch {last}", "FAIL": failed}.get(
        trial.state.name, trial.state.name
    )
    return f"trial {trial.number} [{done}/{total}] {values}: {state}"


def print_trial(total: int):
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        print(trial_line(trial, finished(study), total), file=sys.stderr, flush=True)

    return callback
