"""One training job: a validated config trained in one MLflow run, the same way for a suite cell, a
tuning trial and `bench perf`.

The sequence is the one every reported figure was drawn with: seed, data, model (in this order:
each draws from the random streams the one before it seeded), then the run's record (environment,
the MlflowRun callback) and `engine.fit`. What differs between callers is passed in: their tags,
their own callbacks (tuning's pruning, console progress, perf's timing), the checkpoint directory,
resuming, the test set, what the run logs.

It is also the one place that turns a stop (Ctrl-C, SIGTERM) into an ended run: KILLED, tagged with
what stopped it, the store waited for STOP_WAIT_S at most.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import config, data, engine
from bench.data import cifar
from bench.engine import stops
from bench.engine.callbacks import Callback
from bench.errors import UserError, reason
from bench.models import create_model
from bench.servers import retry as outage
from bench.tracking import MlflowRun, Tracker, drop_pinned, environment_tags
from bench.tracking import model as logged_model

log = logging.getLogger(__name__)

PARTS = ("train", "val", "test")  # the data's parts a run logs as its datasets, where the data has them
STOP_WAIT_S = 10.0  # the longest a stop waits for the tracking store to hear of it


def resolve_device(name: str) -> torch.device:
    """`engine.resolve_device` for a command: the same checks, the messages naming the
    `--device` flag ("--device 'tpu' is not supported; ...")."""
    try:
        return engine.resolve_device(name)
    except UserError as exc:
        raise UserError("--" + str(exc).replace("; use device ", "; use --device ")) from None


@dataclass
class Trained:
    result: engine.FitResult
    bundle: data.DataBundle
    model: torch.nn.Module


@dataclass(frozen=True)
class Record:
    """What a job's MLflow run logs besides its params and metrics (a suite cell's: all of it)."""

    tags: dict[str, str] = field(default_factory=dict)  # the caller's (a cell's identity, ...)
    # The machine's and libraries' tags (and environment.txt when the run ends) and the data's source.
    environment: bool = True
    data_counts: bool = True  # with `environment`: also whether the data is complete, and each part's image count
    parts: Collection[str] = PARTS  # the data's parts logged as the run's datasets
    checkpoints: bool = True
    model_example: bool = True  # a few test images as the finished model's input example; none: no model logged
    journal: Path | None = None  # where the metrics the store has not taken yet are kept

    def callback(
        self,
        tracker: Tracker,
        run_id: str,
        cfg: config.RunConfig,
        bundle: data.DataBundle,
        device: torch.device,
        checkpoint_dir: Path,
    ) -> MlflowRun:
        """The callback that logs the fit into the run."""
        tags = dict(self.tags)
        if self.environment:
            tags.update(environment_tags(engine.device_name(device)))
            tags.update(_data_tags(bundle, self.data_counts))
        example = (
            bundle.test.images[: logged_model.EXAMPLE_IMAGES].permute(0, 2, 3, 1).cpu().numpy()
            if self.model_example
            else None
        )
        if self.environment:
            tracker.log_environment(run_id)
        if self.checkpoints:
            drop_pinned(checkpoint_dir)  # left by a process killed before its uploads
        return MlflowRun(
            tracker,
            run_id,
            cfg,
            tags,
            log_checkpoints=self.checkpoints,
            model_example=example,
            datasets={k: v for k, v in bundle.parts.items() if k in self.parts},
            journal=self.journal,
        )


def build(cfg: config.RunConfig, device: torch.device, files: cifar.CifarFiles):
    """Seed, data, model: in this order, whatever trains them. Returns (bundle, model on `device`)."""
    engine.seed_everything(cfg.seed, cfg.train.deterministic)
    bundle = data.build(cfg.data, seed=cfg.seed, device=device, files=files)
    model = create_model(cfg.model.name, num_classes=bundle.num_classes, **cfg.model.options).to(device)
    return bundle, model


def train(
    cfg: config.RunConfig,
    *,
    device: torch.device,
    files: cifar.CifarFiles,
    tracker: Tracker,
    run_id: str,
    checkpoint_dir: Path,
    record: Record = Record(),
    callbacks: Sequence[Callback] = (),
    resume: bool = True,
    evaluate_test: bool = True,
    alternatives: Sequence[tuple[str, config.EvalConfig]] = (),
    wrap_run: Callable[[MlflowRun], Callback] | None = None,
    before_fit: Callable[[], None] | None = None,
    clock: engine.Clock | None = None,
) -> Trained:
    """Train `cfg` on `device` in the started MLflow run `run_id`, which logs what `record` says;
    the caller ends the run. `callbacks` follow the run's own; `wrap_run` wraps the run's callback
    (perf times its calls); `before_fit` is called just before `engine.fit`. `resume`,
    `evaluate_test`, `alternatives` and `clock`: as engine.fit has them."""
    bundle, model = build(cfg, device, files)
    run = record.callback(tracker, run_id, cfg, bundle, device, checkpoint_dir)
    if before_fit is not None:
        before_fit()
    result = engine.fit(
        model,
        bundle,
        cfg,
        checkpoint_dir=checkpoint_dir,
        callbacks=[run if wrap_run is None else wrap_run(run), *callbacks],
        resume=resume,
        evaluate_test=evaluate_test,
        alternatives=alternatives,
        clock=clock,
    )
    return Trained(result, bundle, model)


def _data_tags(bundle: data.DataBundle, counts: bool) -> dict[str, str]:
    tags = {"bench.data_source": bundle.source}
    if counts:
        tags["bench.data_complete"] = str(bundle.complete).lower()
        tags.update({f"bench.data_{k}": str(v) for k, v in bundle.counts.items()})
    return tags


# --- a stop --------------------------------------------------------------------------------------


def stop_in(exc: BaseException, who: str) -> KeyboardInterrupt | None:
    """The stop (Ctrl-C, SIGTERM) that a library made into `exc` while it cleaned up after it
    (torch.save's zip writer does), if `exc` is one: an error in the clean-up of a stop is that
    stop. Logged, as the job `who` then ends as stopped."""
    stop = stops.within(exc)
    if stop is not None:
        log.warning("%s: stopped; the clean-up after the stop failed: %s", who, reason(exc))
    return stop


def stopped_by(stop: KeyboardInterrupt) -> str:
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption)."""
    return getattr(stop, "signal_name", "SIGINT")


def end_stopped(
    tracker: Tracker, run_id: str | None, stop: KeyboardInterrupt, tags: dict[str, str], *, abandon: bool = False
) -> outage.Unavailable | None:
    """The run (if there is one) KILLED by `stop`, resumable, with `tags` and bench.interrupted_by.
    Returns the outage that kept the store from hearing of it, if one did (the run is then left
    RUNNING, and taken up again)."""
    if run_id is None:
        return None
    return end_quietly(tracker, run_id, "KILLED", {**tags, "bench.interrupted_by": stopped_by(stop)}, abandon=abandon)


def end_quietly(
    tracker: Tracker, run_id: str, status: str, tags: dict[str, str], *, abandon: bool = False
) -> outage.Unavailable | None:
    """End the run with `status` and `tags`, as far as the store lets us: the job has failed or
    been interrupted already, and a second error (the store down too) must not hide the first,
    nor an outage hold the stop up (a run the store did not hear end is taken up again). Returns
    the outage met, if any."""
    with tracker.limited(STOP_WAIT_S):
        return _end(tracker, run_id, status, tags, abandon)


def _end(tracker: Tracker, run_id: str, status: str, tags: dict[str, str], abandon: bool) -> outage.Unavailable | None:
    away = None
    try:
        tracker.set_tags(run_id, tags)
    except outage.Unavailable as exc:
        if abandon:  # left RUNNING, its writer dropped: whoever next finds it stale ends it
            tracker.abandon(run_id)
            return exc
        log.warning("could not tag run %s: %s", run_id, reason(exc))
        away = exc
    except Exception as exc:
        log.warning("could not tag run %s: %s", run_id, reason(exc))
    try:
        tracker.end_run(run_id, status)
    except Exception as exc:
        log.warning("could not mark run %s %s: %s", run_id, status, reason(exc))
        away = away or (exc if isinstance(exc, outage.Unavailable) else None)
    return away
