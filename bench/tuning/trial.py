"""One trial: the objective (the experiment trained through bench.job with the trial's values), its
pruning callback, and how its MLflow run and the trial itself end, in both stores."""

from __future__ import annotations

import logging
import math
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from bench import config, engine, job
from bench.engine.callbacks import Callback, ConsoleProgress
from bench.errors import failure_tags
from bench.servers import retry as outage
from bench.tuning import sampling
from bench.tuning.space import Param, as_sets
from bench.tuning.study import FINISHED, OBJECTIVE, STORAGE, note_run

log = logging.getLogger(__name__)


class Pruning(Callback):
    """Reports validation accuracy each epoch; asks the engine to stop when the pruner says so."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.pruned_at: int | None = None

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> bool:
        self.trial.report(metrics[OBJECTIVE], epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            return True
        return False


@dataclass
class TrialContext:
    experiment: str
    profile: str
    seed: int
    sets: list[str]
    epochs: int | None
    space: list[Param]
    device: Any
    files: Any  # cifar.CifarFiles, read once for every trial
    checkpoint_root: Path
    tracker: Any  # tracking.Tracker
    experiment_id: str
    parent_run_id: str
    current: int | None = None  # the number of the trial being run


class Surplus(Exception):
    """A trial asked for after the study's last slot was taken by another worker."""


class Repeat(Exception):
    """A trial whose values another trial holds: it ends FAIL before it trains or logs."""


class TrialFailed(Exception):
    """A trial whose training raised: it ends FAIL with the reason, and the study goes on."""


def objective(trial: optuna.Trial, ctx: TrialContext, limit: int | None = None) -> float:
    values = _values(trial, ctx, limit)
    study = trial.study.study_name
    run_id = _start_run(trial, ctx)
    ckpt = ctx.checkpoint_root / study / f"trial{trial.number}"
    state, failure = "FAIL", {}
    stop = None  # the stop (Ctrl-C, SIGTERM) that ended the trial
    away = None  # the store that stayed away past the outage limit: no call is made to it
    late = None
    try:
        result, pruning = _train(trial, ctx, values, run_id, ckpt)
        if result.status == "nonfinite":
            failure = {"bench.failure": "nonfinite_loss", "bench.failure_reason": "the training loss was not finite"}
        else:
            state = "PRUNED" if pruning.pruned_at is not None else "COMPLETE"
    except KeyboardInterrupt as exc:
        # Preempted (SIGTERM) or Ctrl-C: optuna fails the trial; `optimize` queues its retry.
        stop = exc
        raise
    except outage.Unavailable as exc:
        # The worker stops; the trial is failed and queued again with its values (the tracking
        # server) or failed by its heartbeat and queued by another worker (the database).
        away = exc.what
        failure = {
            "bench.failure": "tracking_unavailable" if away != STORAGE else "storage_unavailable",
            "bench.failure_reason": str(exc),
        }
        raise
    except Exception as exc:  # out of memory at a large batch, values the model cannot take, ...: one trial's failure
        if (stop := job.stop_in(exc, f"trial {trial.number} of study {study}")) is not None:
            raise stop from None
        # The same tags as a failed cell's run: bench.failure (out_of_memory or error) and bench.failure_reason.
        failure = failure_tags(exc)
        # Where it failed, as a failed cell shows it: optuna's own warning with it is hidden without --debug.
        log.error("trial %d of study %s failed:\n%s", trial.number, study, traceback.format_exc())
        raise TrialFailed(failure["bench.failure_reason"]) from exc
    finally:
        if stop is not None:
            _end_stopped(trial, ctx, run_id, stop)
        else:
            late = _end_trial(trial, ctx, run_id, state, failure, away)
        shutil.rmtree(ckpt, ignore_errors=True)
    if late is not None:  # trained, but its run could not be ended: failed, and queued again with its values
        raise late
    if state == "PRUNED":
        raise optuna.TrialPruned(f"epoch {pruning.pruned_at}")
    return float(result.best_val_acc) if state == "COMPLETE" else math.nan  # optuna fails a trial whose value is nan


def _train(
    trial: optuna.Trial, ctx: TrialContext, values: dict[str, Any], run_id: str, ckpt: Path
) -> tuple[engine.FitResult, Pruning]:
    """The experiment trained with the trial's values in its run, with the pruning callback."""
    cfg = config.load(
        ctx.experiment, profile=ctx.profile, seed=ctx.seed, sets=[*ctx.sets, *as_sets(values)], epochs=ctx.epochs
    )
    trial.set_user_attr("data.val_size", cfg.data.val_size)  # the split the objective was measured on
    pruning = Pruning(trial)
    trained = job.train(
        cfg,
        device=ctx.device,
        files=ctx.files,
        tracker=ctx.tracker,
        run_id=run_id,
        checkpoint_dir=ckpt,
        # Trials keep their metrics, not their weights, and never see the test set.
        record=job.Record(data_counts=False, parts=("train", "val"), checkpoints=False, model_example=False),
        callbacks=[pruning, ConsoleProgress(f"trial {trial.number}")],
        resume=False,
        evaluate_test=False,
    )
    return trained.result, pruning


def _values(trial: optuna.Trial, ctx: TrialContext, limit: int | None) -> dict[str, Any]:
    """The trial's values; a trial past the study's `limit`, or one whose values another trial
    holds, is turned away before it trains or logs."""
    if limit is not None and _surplus(trial, limit):
        trial.set_user_attr("bench.surplus", True)
        raise Surplus(f"trial {trial.number}: the study already has {limit} trials")
    ctx.current = trial.number
    values = {p.name: p.suggest(trial) for p in ctx.space}
    if sampling.repeats(trial):
        trial.set_user_attr("bench.failure", "repeat")
        raise Repeat(f"trial {trial.number}: another trial has these values")
    return values


def _surplus(trial: optuna.Trial, limit: int) -> bool:
    """True when `limit` trials that are finished or running were asked for before this one."""
    alive = trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    return sum(t.number < trial.number for t in alive) >= limit


def _start_run(trial: optuna.Trial, ctx: TrialContext) -> str:
    """The trial's MLflow run, a child of the study's, named in the trial's user attributes."""
    from bench.tracking import NOTE, run_url

    study = trial.study.study_name
    # No cell tags (bench.experiment, .profile, .seed, .config_hash): `bench run` must never take a
    # trial's run for a suite cell's, nor `bench report` count it among the seeds.
    tags = {
        "mlflow.parentRunId": ctx.parent_run_id,
        "optuna.study": study,
        "optuna.trial": str(trial.number),
        "bench.kind": "trial",
        NOTE: f"{config.about_markdown(ctx.experiment)}\n**This run:** trial {trial.number} of study `{study}`, profile `{ctx.profile}`\n",
    }
    run_name = f"{study}-trial{trial.number}"
    run_id = ctx.tracker.start_run(ctx.experiment_id, run_name, tags)
    trial.set_user_attr("mlflow_run_id", run_id)
    url = run_url(ctx.tracker.uri, ctx.experiment_id, run_id)
    trial.set_user_attr("mlflow_run_url", url)
    note_run(trial, run_name, url, ctx.tracker.uri)
    return run_id


def _end_stopped(trial: optuna.Trial, ctx: TrialContext, run_id: str, stop: KeyboardInterrupt) -> None:
    """The run of a trial `stop` ended KILLED (as a stopped cell's, bench.job.end_stopped) and the
    trial's user attributes saying so: bench.failure interrupted (or tracking_unavailable, when
    the store stayed away: the run is then left RUNNING for the next worker that finds the trial
    failed to end), which `optimize` queues again."""
    away = job.end_stopped(
        ctx.tracker, run_id, stop, {"optuna.state": "FAIL", "bench.failure": "interrupted"}, abandon=True
    )
    if away is not None:
        failure = {"bench.failure": "tracking_unavailable", "bench.failure_reason": str(away)}
    else:
        failure = {"bench.failure": "interrupted", "bench.interrupted_by": job.stopped_by(stop)}
    for key, value in failure.items():
        trial.set_user_attr(key, value)


def _end_trial(
    trial: optuna.Trial, ctx: TrialContext, run_id: str, state: str, failure: dict, away: str | None
) -> Exception | None:
    """End the trial's MLflow run and record how it ended in both stores, as far as they answer:
    nothing is asked of a store that stayed away past the outage limit (`away`). A tracking
    server that does so now, after the trial trained, is returned as the trial's failure
    (tracking_unavailable: queued again), with the run left RUNNING, its writer dropped."""
    late = None
    tracking_away = away is not None and away != STORAGE
    status = "FAILED" if state == "FAIL" else "FINISHED"
    try:
        if not tracking_away:
            try:
                try:
                    ctx.tracker.set_tags(run_id, {"optuna.state": state, **failure})
                except outage.Unavailable:
                    raise
                except Exception:  # the run ends, and its system-metrics sampling with it, whatever the store said
                    ctx.tracker.end_run(run_id, status)
                    raise
                ctx.tracker.end_run(run_id, status)
            except outage.Unavailable as exc:
                tracking_away, late = True, exc
                failure = {"bench.failure": "tracking_unavailable", "bench.failure_reason": str(exc)}
    finally:
        if tracking_away:
            ctx.tracker.abandon(run_id)  # the next worker to see the trial failed ends its run
        if away != STORAGE:
            for key, value in failure.items():
                trial.set_user_attr(key, value)
    return late
