"""Optuna: the search space, the objective, pruning, storage with heartbeats, MLflow parent/child runs.

A study is one (experiment, profile) search. Each trial trains the experiment with the trial's
values at the dotted config paths it samples (`optim.lr`, ...), reports validation accuracy every
epoch to the pruner and returns the best validation accuracy; the test set never steers the search.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shlex
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from bench import config, console, data, engine
from bench.engine import stops
from bench.engine.callbacks import Callback, ConsoleProgress
from bench.errors import UserError, failure_tags, reason, unusable
from bench.models import create_model
from bench.servers import retry as outage
from bench.servers.urls import redact
from bench.tuning import sampling

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OBJECTIVE = "val_acc"
log = logging.getLogger(__name__)
console.quiet("optuna")


# --- the search space ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str  # a dotted config path
    kind: str  # float, int or categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def distribution(self) -> BaseDistribution:
        """The distribution `suggest` asks Optuna for."""
        if self.kind == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"categorical {list(self.choices)}"
        return f"{self.kind} [{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


def _default_space(cfg: config.RunConfig) -> dict[str, dict[str, Any]]:
    """A decade either side of the recipe's lr and weight decay; half and double its batch."""
    lr, wd, batch = cfg.optim.lr, cfg.optim.weight_decay, cfg.data.batch_size
    return {
        "optim.lr": {"type": "float", "low": lr / 10, "high": lr * 10, "log": True},
        "optim.weight_decay": {"type": "float", "low": max(wd, 1e-7) / 10, "high": max(wd, 1e-7) * 10, "log": True},
        "data.batch_size": {"type": "categorical", "choices": [batch // 2, batch, batch * 2]},
    }


def search_space(experiment: str, cfg: config.RunConfig) -> list[Param]:
    """The experiment file's [search] table (dotted path -> distribution), else the default.

    A categorical space always holds the recipe's own value, so the reported recipe can be the
    first trial.
    """
    table = config.read_experiment(experiment).get("search") or _default_space(cfg)
    flat = cfg.flat()
    where = f"{experiment}: [search]"
    if not isinstance(table, dict):
        raise UserError(f"{where} should be a table of dotted config keys, got {table!r}")
    params = []
    for name, spec in sorted(table.items()):
        if name not in flat or name == "seed":
            raise UserError(f"{where}: {name!r} is not a config key (see `bench run {experiment} --dry-run`)")
        if not isinstance(spec, dict):
            raise UserError(f'{where}: {name}: should be a table such as {{ type = "float", low = 0.01, high = 0.5 }}')
        kind = spec.get("type")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices or not all(_same_kind(c, flat[name]) for c in choices):
                raise UserError(f"{where}: {name}: a categorical needs choices = [...] of values like {flat[name]!r}")
            choices = list(choices)
            if flat[name] not in choices:
                choices.append(flat[name])
            params.append(Param(name, kind, choices=tuple(sorted(choices))))
        elif kind in ("float", "int"):
            low, high = spec.get("low"), spec.get("high")
            if any(type(v) not in (int, float) or not math.isfinite(v) for v in (low, high)) or not low < high:
                raise UserError(f"{where}: {name}: needs numbers low < high, got low={low!r} high={high!r}")
            if spec.get("log") and low <= 0:
                raise UserError(f"{where}: {name}: a log scale needs low > 0, got {low!r}")
            params.append(Param(name, kind, float(low), float(high), bool(spec.get("log", False))))
        else:
            raise UserError(f"{where}: {name}: type must be float, int or categorical, got {kind!r}")
    return params


def _same_kind(choice: Any, recipe: Any) -> bool:
    """A choice the config key can take: of the recipe value's type (an int where it is a float)."""
    if isinstance(recipe, float):
        return type(choice) in (int, float) and math.isfinite(choice)
    return type(choice) is type(recipe)


def recipe_values(space: list[Param], cfg: config.RunConfig) -> dict[str, Any]:
    """The recipe's own values of the searched keys, clipped into the space: the first trial."""
    flat = cfg.flat()
    values = {}
    for p in space:
        v = flat[p.name]
        values[p.name] = v if p.kind == "categorical" else min(max(v, p.low), p.high)
    return values


def as_sets(values: dict[str, Any]) -> list[str]:
    """Trial values as `--set` assignments (TOML values), in key order."""
    return [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in sorted(values.items())]


def tuning_val_size(cfg: config.RunConfig, train_images: int) -> int | None:
    """The validation split tuning holds out when the recipe trains on every training image
    (data.val_size 0, as R1 and R2 did): trials are chosen by validation accuracy, never by the
    test set. A tenth of the training images: CIFAR's usual 5000 of 50,000, 100 of the smoke
    profile's 1000. None when the recipe holds out a split already."""
    return None if cfg.data.val_size else train_images // 10


# --- storage, pruner, study (the sampler: bench.sampling) ---------------------------------------------------------------


def storage(url: str, heartbeat_s: int) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats: a trial whose process died is failed once its heartbeat is
    older than twice the interval, and re-queued with the same parameters. Its calls wait out an
    outage of the database (bench.optuna_storage)."""
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


# --- one trial ---------------------------------------------------------------------------------


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


def objective(trial: optuna.Trial, ctx: TrialContext, limit: int | None = None) -> float:
    from bench.tracking import NOTE, MlflowRun, environment_tags, run_url

    if limit is not None and _surplus(trial, limit):
        trial.set_user_attr("bench.surplus", True)
        raise Surplus(f"trial {trial.number}: the study already has {limit} trials")
    ctx.current = trial.number
    values = {p.name: p.suggest(trial) for p in ctx.space}
    if sampling.repeats(trial):
        trial.set_user_attr("bench.failure", "repeat")
        raise Repeat(f"trial {trial.number}: another trial has these values")
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
    ckpt = ctx.checkpoint_root / study / f"trial{trial.number}"
    state, failure, status = "FAIL", {}, None
    away = None  # the store that stayed away past the outage limit: no call is made to it
    try:
        cfg = config.load(
            ctx.experiment, profile=ctx.profile, seed=ctx.seed, sets=[*ctx.sets, *as_sets(values)], epochs=ctx.epochs
        )
        trial.set_user_attr("data.val_size", cfg.data.val_size)  # the split the objective was measured on
        engine.seed_everything(cfg.seed, cfg.train.deterministic)
        bundle = data.build(cfg.data, seed=cfg.seed, device=ctx.device, files=ctx.files)
        model = create_model(cfg.model.name, num_classes=bundle.num_classes, **cfg.model.options).to(ctx.device)
        env = {**environment_tags(engine.device_name(ctx.device)), "bench.data_source": bundle.source}
        ctx.tracker.log_environment(run_id)
        pruning = Pruning(trial)
        datasets = {k: v for k, v in bundle.parts.items() if k != "test"}  # trials never see the test set
        callbacks = [
            MlflowRun(ctx.tracker, run_id, cfg, env, log_checkpoints=False, datasets=datasets),
            pruning,
            ConsoleProgress(f"trial {trial.number}"),
        ]
        result = engine.fit(
            model, bundle, cfg, checkpoint_dir=ckpt, callbacks=callbacks, resume=False, evaluate_test=False
        )
        if result.status == "nonfinite":
            failure = {"bench.failure": "nonfinite_loss", "bench.failure_reason": "the training loss was not finite"}
        else:
            state = "PRUNED" if pruning.pruned_at is not None else "COMPLETE"
    except KeyboardInterrupt as exc:
        # Preempted (SIGTERM) or Ctrl-C: optuna fails the trial; `optimize` queues its retry.
        failure, status = _interrupted(exc)
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
        if (stop := stops.within(exc)) is not None:  # an error a library made of a stop: that stop
            log.warning(
                "trial %d of study %s: stopped; the clean-up after the stop failed: %s",
                trial.number,
                study,
                reason(exc),
            )
            failure, status = _interrupted(stop)
            raise stop from None
        # The same tags as a failed cell's run: bench.failure (out_of_memory or error) and bench.failure_reason.
        failure = failure_tags(exc)
        # Where it failed, as a failed cell shows it: optuna's own warning with it is hidden without --debug.
        log.error("trial %d of study %s failed:\n%s", trial.number, study, traceback.format_exc())
        raise TrialFailed(failure["bench.failure_reason"]) from exc
    finally:
        # An interrupted trial's stop waits for the stores seconds at most, not the outage limit.
        with ctx.tracker.limited(STOP_WAIT_S) if status == "KILLED" else contextlib.nullcontext():
            late = _end_trial(trial, ctx, run_id, state, failure, status, away)
        shutil.rmtree(ckpt, ignore_errors=True)
    if late is not None:  # trained, but its run could not be ended: failed, and queued again with its values
        raise late
    if state == "PRUNED":
        raise optuna.TrialPruned(f"epoch {pruning.pruned_at}")
    return float(result.best_val_acc) if state == "COMPLETE" else math.nan  # optuna fails a trial whose value is nan


def _interrupted(stop: KeyboardInterrupt) -> tuple[dict[str, str], str]:
    """The failure tags and the MLflow status of a trial `stop` ended."""
    return {"bench.failure": "interrupted", "bench.interrupted_by": getattr(stop, "signal_name", "SIGINT")}, "KILLED"


STORAGE = "Optuna storage"  # outage.Unavailable.what of the study's database
STOP_WAIT_S = 10.0  # the longest an interrupted trial waits for the tracking store to hear of it


def _end_trial(
    trial: optuna.Trial, ctx: TrialContext, run_id: str, state: str, failure: dict, status: str | None, away: str | None
) -> Exception | None:
    """End the trial's MLflow run and record how it ended in both stores, as far as they answer:
    nothing is asked of a store that stayed away past the outage limit (`away`). A tracking
    server that does so now, after the trial trained, is returned as the trial's failure
    (tracking_unavailable: queued again), with the run left RUNNING, its writer dropped."""
    late = None
    tracking_away = away is not None and away != STORAGE
    try:
        if not tracking_away:
            try:
                try:
                    ctx.tracker.set_tags(run_id, {"optuna.state": state, **failure})
                except outage.Unavailable:
                    raise
                except Exception:  # the run ends, and its system-metrics sampling with it, whatever the store said
                    ctx.tracker.end_run(run_id, status or ("FAILED" if state == "FAIL" else "FINISHED"))
                    raise
                ctx.tracker.end_run(run_id, status or ("FAILED" if state == "FAIL" else "FINISHED"))
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


class Surplus(Exception):
    """A trial asked for after the study's last slot was taken by another worker."""


class Repeat(Exception):
    """A trial whose values another trial holds: it ends FAIL before it trains or logs."""


class TrialFailed(Exception):
    """A trial whose training raised: it ends FAIL with the reason, and the study goes on."""


# Trials that fail one after another, whatever their values, point at the setup (the data, the
# device, a --set every trial takes), not at the values: the study stops rather than try forever.
MAX_FAILURES_IN_A_ROW = 5


def _surplus(trial: optuna.Trial, limit: int) -> bool:
    """True when `limit` trials that are finished or running were asked for before this one."""
    alive = trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    return sum(t.number < trial.number for t in alive) >= limit


def optimize(
    study: optuna.Study, ctx: TrialContext, *, trials: int, timeout: float | None, parent: ParentRun, poll_s: float
) -> str | None:
    """Run trials until the study has `trials` finished ones (or `timeout` seconds have passed).

    Safe with many workers on one study, on one machine or many: a worker starts a trial only while
    finished and running trials are fewer than `trials`. When the rest are running elsewhere it
    waits, every `poll_s`, for them to finish or for their heartbeat to go stale: a dead worker's
    trial is then failed and re-queued with its parameters, and the next free worker runs it. Two
    workers that take the last slot at the same instant are told apart by trial number; the later
    trial ends FAIL at once with the user attribute bench.surplus, before it trains or logs.

    A trial that raises ends FAIL (user attributes bench.failure and bench.failure_reason) and
    does not count: the next one is started. Returns why it stopped short of `trials` finished
    trials, if it did: MAX_FAILURES_IN_A_ROW of its own trials failed one after another, or a
    finite search space has no untried set of values left."""
    deadline = None if timeout is None else time.monotonic() + timeout
    report = print_trial(trials)
    ended: list[optuna.trial.FrozenTrial] = []
    failures = 0
    waiting = False
    while deadline is None or time.monotonic() < deadline:
        with warnings.catch_warnings():  # experimental, as the heartbeats are
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        done = sum(s in FINISHED for s in states)
        running = states.count(TrialState.RUNNING)
        if done >= trials:
            return None
        if done + running >= trials:
            if not waiting:
                print(
                    f"waiting for {running} running trial(s) to finish (or to be failed by their heartbeat)",
                    file=sys.stderr,
                    flush=True,
                )
            waiting = True
            time.sleep(poll_s)
            continue
        waiting = False
        if sampling.spent(study, ctx.space):
            return f"every set of values of the search space has been tried: {done} of {trials} trials finished"
        try:
            study.optimize(
                lambda trial: objective(trial, ctx, limit=trials),
                n_trials=1,
                gc_after_trial=True,
                callbacks=[parent, report, lambda _, trial: ended.append(trial)],
                catch=(Surplus, Repeat, TrialFailed),
            )
        # Optuna has failed the trial by now. Only this worker's: every worker of the study stops at
        # the same moment, and each queues its own trial again.
        except KeyboardInterrupt:
            sampling.queue_interrupted(study, only=ctx.current)
            raise
        except outage.Unavailable as exc:
            if exc.what != STORAGE:
                sampling.queue_interrupted(study, only=ctx.current)
            raise
        except UnboundLocalError as exc:
            # Optuna's end of a trial whose state could not be told (the database away past the
            # limit) reads a state it never set: the outage is what happened.
            if isinstance(exc.__context__, outage.Unavailable):
                raise exc.__context__ from None
            raise
        last = ended[-1]
        # Failures of the trials themselves; one turned away before training is not one.
        failed = last.state == TrialState.FAIL and "bench.failure" in last.user_attrs and not sampling.turned_away(last)
        failures = failures + 1 if failed else 0
        if failures >= MAX_FAILURES_IN_A_ROW:
            why = last.user_attrs.get("bench.failure_reason", last.user_attrs["bench.failure"])
            return f"{failures} trials in a row failed, the last with {why}; stopped with {finished(study)} of {trials} trials finished"
    return None


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
