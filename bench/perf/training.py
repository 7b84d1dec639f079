"""`bench perf`'s training measurement: the engine with full MLflow tracking (a temporary SQLite
store: params, per-epoch metrics, checkpoints) against a bare PyTorch loop over the same batches,
with the same model, optimizer, batch, memory format and autocast; and the time spent in the MLflow
callback and in tracking's background threads.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import config, engine, job
from bench.data import cifar
from bench.engine.callbacks import Callback

TRACKING_THREADS = ("mlflow-writer", "SystemMetricsMonitor")  # delivery.Writer's, MLflow's sampler's


def _background_cpu() -> dict[int, float]:
    """CPU seconds so far of each of tracking's background threads (the ordered writer, MLflow's
    system-metrics sampler). Empty where psutil cannot read a process's threads."""
    import threading

    import psutil

    ids = {t.native_id for t in threading.enumerate() if t.name in TRACKING_THREADS}
    try:
        return {t.id: t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids}
    except (psutil.Error, NotImplementedError):
        return {}


class _Timed(Callback):
    """Forwards every hook to `inner` and adds up the seconds spent in it: in `seconds` during
    the epochs, in `closing` at the end of the run (the last epoch's checkpoint announced and
    uploaded, `on_fit_end`'s final flush).
    The epochs run from `first_epoch_start` (the start hooks returned) to `last_epoch_end` (the
    last epoch's hooks returned); `background_cpu_s` is what tracking's background threads spent
    of the CPU between the two."""

    def __init__(self, inner: Callback) -> None:
        self.inner, self.seconds, self.closing = inner, 0.0, 0.0
        self.first_epoch_start = self.last_epoch_end = 0.0
        self._cpu_start: dict[int, float] = {}
        self.epochs = 0
        self.background_cpu_s = 0.0

    def _time(self, hook: str, *args, **kwargs):
        started = time.perf_counter()
        try:
            return getattr(self.inner, hook)(*args, **kwargs)
        finally:
            if hook == "on_epoch_end":
                now = _background_cpu()
                self.background_cpu_s = sum(cpu - self._cpu_start.get(tid, 0.0) for tid, cpu in now.items())
            ended = time.perf_counter()
            if hook == "on_fit_start":
                self.epochs = kwargs["epochs"]
            if hook == "on_fit_end" or (hook == "on_checkpoint" and args[2] == self.epochs):
                self.closing += ended - started  # the last epoch's checkpoint: once a run, after its epochs
            elif hook != "on_fit_start":  # before the epochs: in the whole run's figure, not theirs
                self.seconds += ended - started
            if hook == "on_fit_start":
                self._cpu_start = _background_cpu()
                self.first_epoch_start = time.perf_counter()
            if hook == "on_epoch_end":
                self.last_epoch_end = ended

    def on_fit_start(self, **kwargs) -> None:
        self._time("on_fit_start", **kwargs)

    def on_epoch_end(self, epoch, metrics):
        return self._time("on_epoch_end", epoch, metrics)

    def on_train_steps(self, step, metrics) -> None:
        self._time("on_train_steps", step, metrics)

    def on_checkpoint(self, kind, path, epoch) -> None:
        self._time("on_checkpoint", kind, path, epoch)

    def on_fit_end(self, result) -> None:
        self._time("on_fit_end", result)


def perf_config(experiment: str, profile: str, budget) -> config.RunConfig:
    """The recipe under the profile, trained on every embedded image for `budget.epochs` (a
    `Budget` of `bench perf` or of its --workers), with no evaluation passes: what is timed is
    training and the harness around it."""
    sets = ["data.source=embedded", "data.val_size=0", "eval.remeasure_train_acc=false"]
    if "weights" in config.load(experiment, profile=profile).model.options:
        sets.append("model.weights=none")  # the same compute without fetching pretrained weights
    return config.load(experiment, profile=profile, sets=sets, epochs=budget.epochs)


# What perf's runs log: params, metrics and checkpoints, as a suite cell's run does; not the
# environment, datasets or model, which perf never logged.
PERF_RECORD = job.Record(environment=False, parts=(), model_example=False)


@dataclass(frozen=True)
class SuiteTiming:
    images_per_s: float  # from the start of the first epoch to the end of the last
    whole_run_images_per_s: float  # the same images over the whole fit, its start and closing included
    tracking_s: float  # in MLflow hooks during the epochs, and the CPU time of tracking's background threads
    closing_s: float  # after the last epoch: the last checkpoint written and uploaded, the final flush
    closing_tracking_s: float  # the MLflow part of closing_s
    clock: engine.Clock | None  # where the epochs' time went, when a clock was given


def perf_job(cfg: config.RunConfig, files: cifar.CifarFiles, device: torch.device, tracker, workdir: Path, **kwargs):
    """`cfg` trained through job.train in a new run of `tracker` (a store of perf's own), its
    artifacts under `workdir`, the run FINISHED after it: perf's runs log what PERF_RECORD says,
    start afresh and never see the test set. `kwargs` go to job.train. Returns job.Trained."""
    # The artifacts (checkpoints) in the temporary directory too, not in ./mlruns.
    experiment_id = tracker.client.create_experiment(cfg.experiment, artifact_location=(workdir / "artifacts").as_uri())
    run_id = tracker.start_run(experiment_id, "perf", {})
    trained = job.train(
        cfg,
        device=device,
        files=files,
        tracker=tracker,
        run_id=run_id,
        checkpoint_dir=workdir / "checkpoints",
        record=PERF_RECORD,
        resume=False,
        evaluate_test=False,
        **kwargs,
    )
    tracker.end_run(run_id, "FINISHED")
    assert trained.result.status == "finished", trained.result.status
    return trained


def suite_training(
    cfg: config.RunConfig,
    files: cifar.CifarFiles,
    device: torch.device,
    workdir: Path,
    clock: engine.Clock | None = None,
) -> SuiteTiming:
    """A job (job.train) with MLflow tracking to a fresh SQLite store, timed (part by part by `clock`)."""
    from bench.tracking import Tracker

    timing: dict[str, Any] = {}

    def timed(run: Callback) -> _Timed:  # the run's callback, timed call by call
        timing["calls"] = _Timed(run)
        return timing["calls"]

    def start() -> None:
        engine.synchronize(device)
        timing["started"] = time.perf_counter()

    tracker = Tracker(f"sqlite:///{workdir / 'mlflow.db'}")
    trained = perf_job(cfg, files, device, tracker, workdir, wrap_run=timed, before_fit=start, clock=clock)
    ended = time.perf_counter()
    timed, started = timing["calls"], timing["started"]
    images = trained.result.epochs_done * trained.bundle.train.num_images
    return SuiteTiming(
        images / (timed.last_epoch_end - timed.first_epoch_start),
        images / (ended - started),
        timed.seconds + timed.background_cpu_s,
        ended - timed.last_epoch_end,
        timed.closing,
        clock,
    )


def _median_pair(pairs: list[tuple[float, SuiteTiming]]) -> tuple[float, SuiteTiming]:
    """The (bare images/s, suite timing) pair of median ratio (the upper of the middle two for an
    even count): the figures of one pair stay together."""
    return sorted(pairs, key=lambda pair: pair[1].images_per_s / pair[0])[len(pairs) // 2]


def _suite_in_tmp(
    cfg: config.RunConfig, files: cifar.CifarFiles, device: torch.device, clock: engine.Clock | None = None
) -> SuiteTiming:
    with tempfile.TemporaryDirectory() as tmp:
        return suite_training(cfg, files, device, Path(tmp), clock)


def bare_training(
    cfg: config.RunConfig, files: cifar.CifarFiles, device: torch.device, clock: engine.Clock | None = None
) -> float:
    """Images/s of a minimal loop: the same model, optimizer, memory format and autocast, and the
    same batches (drawn from the same on-device augmentation: work any loop training this recipe
    does, and measured against torchvision's on its own); no metrics, checkpoints or tracking.
    A `clock` is told where each step's time went."""
    bundle, model = job.build(cfg, device, files)
    step = engine.step_for(cfg.train, device)
    model.to(memory_format=step.memory_format).train()
    optimizer = engine.build_optimizer(model.parameters(), cfg.optim)
    lap = engine.laps(clock)
    engine.synchronize(device)
    started = time.perf_counter()
    if clock is not None:
        clock.start()
    for _ in range(cfg.train.epochs):
        for x, y in bundle.train:
            lap("data")
            optimizer.zero_grad(set_to_none=True)
            _, loss = step.forward(model, x, y)
            loss.backward()
            lap("forward and backward")
            optimizer.step()
            lap("optimizer")
        if clock is not None:
            clock.steps += len(bundle.train)
    engine.synchronize(device)
    return cfg.train.epochs * bundle.train.num_images / (time.perf_counter() - started)


def _step_ms(clock: engine.Clock) -> dict[str, float]:
    """Milliseconds per training step of each part of a step's time (the run's closing is not a
    step's: it is in `closing_s`)."""
    return {part: 1000 * clock.seconds[part] / clock.steps for part in engine.Clock.PARTS}


@dataclass(frozen=True)
class Comparison:
    """The engine against the bare loop: every pair of runs, the pair of median ratio, and where
    a step's time went in each loop (ms per step, part by part)."""

    pairs: list[tuple[float, SuiteTiming]]  # (bare images/s, the engine's timing), run back to back
    bare_images_per_s: float
    suite: SuiteTiming
    step_ms: dict[str, float]
    bare_step_ms: dict[str, float]


def engine_against_bare(
    cfg: config.RunConfig, files: cifar.CifarFiles, device: torch.device, repeats: int
) -> Comparison:
    """`repeats` pairs of the bare loop and the engine, after a warm-up epoch of the bare loop."""
    bare_training(cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})}), files, device)  # warm
    # On the CPU a part's work is done when its call returns: the timed runs carry the clocks. An
    # accelerator would have to wait at every lap, so its breakdown comes from runs of its own.
    laps_ride_along = device.type == "cpu"
    pairs: list[tuple[float, SuiteTiming]] = []
    bare_clocks: list[engine.Clock | None] = []
    for i in range(repeats):
        # A pair: the bare loop and the suite back to back, taking turns going first. The
        # machine's speed drifts (a neighbour's load, a warming cache) over minutes, more than
        # the harness costs; both runs of a pair see nearly the same machine, so the ratio is
        # taken within each pair, and the pair of median ratio counts.
        bare_clock, suite_clock = (engine.Clock(), engine.Clock()) if laps_ride_along else (None, None)
        if i % 2 == 0:
            bare = bare_training(cfg, files, device, bare_clock)
            pairs.append((bare, _suite_in_tmp(cfg, files, device, suite_clock)))
        else:
            suite = _suite_in_tmp(cfg, files, device, suite_clock)
            pairs.append((bare_training(cfg, files, device, bare_clock), suite))
        bare_clocks.append(bare_clock)
    bare_rate, suite = _median_pair(pairs)
    if laps_ride_along:
        bare_clock, suite_clock = bare_clocks[pairs.index((bare_rate, suite))], suite.clock
    else:
        bare_clock, suite_clock = engine.Clock(device), engine.Clock(device)
        bare_training(cfg, files, device, bare_clock)
        _suite_in_tmp(cfg, files, device, suite_clock)
    return Comparison(pairs, bare_rate, suite, _step_ms(suite_clock), _step_ms(bare_clock))
