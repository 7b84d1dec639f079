"""fit: the epoch loop, checkpoint resume and the checkpoints' cadence.

The engine knows nothing of MLflow, Optuna or reports: it reports through callbacks, and a
stop (requested by a callback, or a non-finite loss) is a returned status, not an exception.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from bench.engine import checkpoint, evaluation, stops
from bench.engine.callbacks import Callback
from bench.engine.clock import Clock, laps, synchronize
from bench.engine.step import (
    build_optimizer,
    build_scheduler,
    compile_and_warm_up,
    peak_memory_mb,
    reset_peak_memory,
    step_for,
    train_one_epoch,
)

if TYPE_CHECKING:
    from bench.config import EvalConfig

LAST, BEST = "last.pt", "best.pt"


@dataclass
class FitResult:
    status: str  # "finished", "stopped" (a callback asked) or "nonfinite" (loss NaN or Inf)
    epochs_done: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    best_epoch: int | None = None
    best_val_acc: float | None = None
    best_test_acc: float | None = None
    checkpoint_dir: Path | None = None
    nonfinite_epoch: int | None = None  # the epoch whose loss was NaN or Inf


def _rng_state(data_gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The random state a resume restores: the CPU's, the data generator's and, on CUDA, the
    generator of the device the run trains on (dropout draws from it; a run on cuda:1 never
    touches GPU 0's)."""
    state = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], data_gen: torch.Generator, device: torch.device) -> None:
    """The inverse of `_rng_state`. "cuda" goes to the run's device, whichever it resumes on.
    Checkpoints written before held the current device's (GPU 0's), the run's own when it ran there."""
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def fit(
    model: nn.Module,
    data,
    cfg,
    *,
    checkpoint_dir: Path,
    callbacks: Sequence[Callback] = (),
    resume: bool = True,
    max_epochs: int | None = None,
    evaluate_test: bool = True,
    alternatives: Sequence[tuple[str, EvalConfig]] = (),
    clock: Clock | None = None,
) -> FitResult:
    """Train `model` (already on the data's device) on `data` (a DataBundle) with `cfg` (RunConfig).

    Resumes from `checkpoint_dir/last.pt` when it exists. `max_epochs` stops early after that
    many epochs in total (for tests of interrupted runs); the run's schedule still spans
    cfg.train.epochs. `evaluate_test=False` leaves the test set alone (tuning trials: the search
    must not see it, and it saves an evaluation pass per epoch).

    `alternatives` are other evaluations of the same weights, each with a metric-name suffix:
    after each epoch, what differs from the run's own `cfg.eval` is measured again and logged
    as `<metric>/<suffix>`: val and test loss and accuracy for another mode, train_acc for
    another `remeasure_train_acc` (the re-measure in the alternative's mode, or the running
    accuracy of the epoch's batches). Every evaluation pass runs on random streams of its own,
    seeded from the run seed, the epoch and the split: the weights and training metrics are the
    same whatever the evaluation, and the best checkpoint follows the run's own val_acc.

    A `clock` is told where each epoch's time went, from the start of its first epoch to the end
    of its last epoch's callbacks, and then what the closing took: the last checkpoint written and
    announced (`bench perf`'s breakdown).
    """
    run = _Fit(
        model, data, cfg, Path(checkpoint_dir), callbacks, resume, max_epochs, evaluate_test, alternatives, clock
    )
    run.start()
    try:
        for epoch in range(run.result.epochs_done + 1, run.stop_after + 1):
            if not run.epoch(epoch):
                break
        if run.nothing_to_train:
            run.announce_found()
        run.announce(keep=0)
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt) and stops.within(exc) is None:
            raise  # a failure, not a stop (an error a library made of a stop is that stop)
        run.keep_last_finished()
        raise
    finally:
        run.saver.close()
    result = run.result
    if result.status == "finished" and result.epochs_done < run.epochs:
        result.status = "stopped"
    for cb in callbacks:
        cb.on_fit_end(result)
    return result


class _Fit:
    """One fit's state from epoch to epoch: the model, its optimizer and schedule, the result so
    far, the evaluations after each epoch, and the checkpoints queued, written and announced."""

    def __init__(
        self,
        model: nn.Module,
        data,
        cfg,
        checkpoint_dir: Path,
        callbacks: Sequence[Callback],
        resume: bool,
        max_epochs: int | None,
        evaluate_test: bool,
        alternatives: Sequence[tuple[str, EvalConfig]],
        clock: Clock | None,
    ) -> None:
        self.model, self.data, self.cfg, self.callbacks, self.resume = model, data, cfg, callbacks, resume
        self.epochs = cfg.train.epochs
        self.device = data.train.labels.device
        self.step = step_for(cfg.train, self.device)
        model.to(memory_format=self.step.memory_format)
        self.optimizer = build_optimizer(model.parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.epochs)
        self.result = FitResult(status="finished", epochs_done=0, checkpoint_dir=checkpoint_dir)
        self.last_path, self.best_path = checkpoint_dir / LAST, checkpoint_dir / BEST
        resumed = self._resume() if resume else False
        self.saver = checkpoint.Saver(background=self.device.type != "cpu")
        reset_peak_memory(self.device)  # peak_memory_mb: this fit's, not an earlier one's in the process
        self.config_hash = cfg.config_hash()
        self.held_out = ["val"] * (data.val is not None) + ["test"] * evaluate_test
        self.alternatives = alternatives
        self.plan = evaluation.evaluation_plan(cfg.eval, alternatives)
        self.forward, self.compile_time = model, None
        self.stop_after = min(self.epochs, max_epochs) if max_epochs is not None else self.epochs
        self.nothing_to_train = resumed and self.result.epochs_done >= self.stop_after  # a finished run, resumed
        self.steps_per_epoch = len(data.train)
        self.clock, self.lap = clock, laps(clock)
        # What an interruption (KeyboardInterrupt: Ctrl-C, or SIGTERM turned into one by the command
        # line) keeps: the last finished epoch, unless a "last" checkpoint of it is written or queued.
        # Between two epochs the model itself holds it (`live`); during an epoch, the copy of its
        # state taken on the device after the epoch before (`unsaved`), when no checkpoint holds that.
        self.last_queued, self.live, self.unsaved = self.result.epochs_done, False, None
        self.last_saved = time.monotonic()

    def _resume(self) -> bool:
        """Take up the run where `last.pt` left it, when it exists: whether it did."""
        state = checkpoint.load_latest(self.last_path)
        if state is None:
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], self.data.generator, self.device)
        self.result.epochs_done = int(state["epoch"])
        self.result.best_epoch, self.result.best_val_acc, self.result.best_test_acc = state["best"]
        self.result.last_metrics = dict(state["metrics"])
        return True

    def start(self) -> None:
        """Compile (when asked and there is training to do), tell the callbacks, start the clock."""
        if self.cfg.train.compile and self.result.epochs_done < self.stop_after:
            passes = evaluation.evaluation_passes(self.plan, self.held_out)
            self.forward, self.compile_time = compile_and_warm_up(
                self.model, self.data, self.optimizer, self.step, passes
            )
        for cb in self.callbacks:
            cb.on_fit_start(start_epoch=self.result.epochs_done, epochs=self.epochs)
        self.last_saved = time.monotonic()  # the start (or the checkpoint resumed from) counts as saved
        if self.clock is not None:
            self.clock.start()

    def announce(self, keep: int | None = None) -> None:
        for kind, path, epoch in self.saver.done(keep):
            for cb in self.callbacks:
                cb.on_checkpoint(kind, path, epoch)

    def current(self, epoch: int) -> dict:
        """What a checkpoint after `epoch` holds, the tensors as the model and optimizer have them."""
        return {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(self.data.generator, self.device),
            "best": (self.result.best_epoch, self.result.best_val_acc, self.result.best_test_acc),
            "metrics": self.result.last_metrics,
            "config_hash": self.config_hash,
        }

    def save(self, path: Path, kind: str, epoch: int, taken: dict | None = None) -> None:
        """Queue the checkpoint (the state now, or one `taken` before); it is announced to the
        callbacks once it is on disk. At most two wait in memory (an epoch's best and last) while
        training goes on."""
        self.announce(keep=1)
        write = checkpoint.save_rotating if kind == "last" else checkpoint.save
        with stops.held():  # a stop during a write on the CPU comes once the write is whole and counted
            self.saver.submit(write, taken if taken is not None else self.current(epoch), path, (kind, path, epoch))
            if kind == "last":
                self.last_queued = epoch

    def epoch(self, epoch: int) -> bool:
        """Train `epoch`, evaluate it, checkpoint it and tell the callbacks: whether the fit goes on
        (not after a non-finite loss or a stop)."""
        synchronize(self.device)
        started = time.perf_counter()
        self.lap("other")
        self.live = False
        lr = self.optimizer.param_groups[0]["lr"]
        train_loss, train_acc, seen = train_one_epoch(
            self.forward,
            self.data.train,
            self.optimizer,
            self.step,
            self.cfg.train.log_every_steps,
            self._on_log(epoch),
            self.clock,
        )
        train_time = time.perf_counter() - started  # train_one_epoch ends on a host sync
        self.scheduler.step()
        if not math.isfinite(train_loss):
            # Ends here, before any evaluation or checkpoint: NaN weights are never saved.
            self.result.status, self.result.nonfinite_epoch = "nonfinite", epoch
            self.result.last_metrics = {"train_loss": train_loss}
            return False
        metrics = {"train_loss": train_loss, "lr": lr}
        self._evaluate(epoch, metrics, train_acc, started)
        metrics["train_time_s"] = train_time
        metrics["images_per_s"] = seen / train_time
        metrics["peak_memory_mb"] = peak_memory_mb(self.device)
        if self.compile_time is not None:
            metrics["compile_time_s"], self.compile_time = self.compile_time, None
        self.result.epochs_done, self.result.last_metrics = epoch, metrics
        self.lap("evaluation")
        self._keep_best(epoch, metrics)
        self.lap("checkpoints")
        stop = any([cb.on_epoch_end(epoch, metrics) for cb in self.callbacks])
        self.lap("tracking")
        # From here the model holds the finished epoch, its best checkpoint is written and the
        # callbacks have its metrics: an interruption may keep it as it is.
        self.live = True
        self._keep_last(epoch, final=stop or epoch == self.stop_after)
        if stop:
            self.result.status = "stopped"
            return False
        return True

    def _on_log(self, epoch: int) -> Callable[[int, float], None]:
        """Hands the mean loss of every `log_every_steps` steps of `epoch` to the callbacks, by global step."""
        first = (epoch - 1) * self.steps_per_epoch

        def on_log(i: int, loss: float) -> None:
            for cb in self.callbacks:
                cb.on_train_steps(first + i, {"train_step_loss": loss})

        return on_log

    def _evaluate(self, epoch: int, metrics: dict[str, float], train_acc: float, started: float) -> None:
        """Adds the evaluations after `epoch` to `metrics`: the run's own, then the alternatives'."""

        @functools.cache  # a pass two evaluations share runs once
        def measured(split: str, mode: str) -> tuple[float, float]:
            seed = evaluation._pass_seed(self.cfg.seed, epoch, split)
            return evaluation._evaluate_apart(self.forward, getattr(self.data, split), mode, self.step, seed)

        for suffix, ev, measures_train, measures_held_out in self.plan:
            if measures_train:
                metrics[f"train_acc{suffix}"] = measured("train", ev.mode)[1] if ev.remeasure_train_acc else train_acc
            for split in self.held_out if measures_held_out else ():
                metrics[f"{split}_loss{suffix}"], metrics[f"{split}_acc{suffix}"] = measured(split, ev.mode)
            if not suffix:
                # Training and the run's own evaluation, what the reported runs timed: the
                # alternatives' passes, which they never ran, are timed apart.
                own_done = time.perf_counter()
                metrics["epoch_time_s"] = own_done - started
        if self.alternatives:
            metrics["alternatives_time_s"] = time.perf_counter() - own_done

    def _keep_best(self, epoch: int, metrics: dict[str, float]) -> None:
        # The best checkpoint is chosen on validation accuracy, never on test accuracy.
        result = self.result
        if "val_acc" in metrics and (result.best_val_acc is None or metrics["val_acc"] > result.best_val_acc):
            result.best_epoch, result.best_val_acc, result.best_test_acc = (
                epoch,
                metrics["val_acc"],
                metrics.get("test_acc"),
            )
            self.save(self.best_path, "best", epoch)

    def _keep_last(self, epoch: int, final: bool) -> None:
        """The last checkpoint when one is due, after the schedule's last epoch and after the fit's
        `final` one; else a copy of the state on the device, for an interruption to keep."""
        due = (
            epoch % self.cfg.train.checkpoint_every == 0
            and time.monotonic() - self.last_saved >= self.cfg.train.checkpoint_min_interval_s
        )
        if due or epoch == self.epochs or final:
            self.save(self.last_path, "last", epoch)
            self.last_saved, self.unsaved = time.monotonic(), None
        else:
            self.unsaved = checkpoint.snapshot(self.current(epoch), device=None)
        self.lap(Clock.CLOSING if final else "checkpoints")
        self.announce()
        self.lap(Clock.CLOSING if final else "tracking")

    def announce_found(self) -> None:
        # A run stopped after writing its final checkpoint, before the callbacks heard of it
        # (the copy in MLflow may be older): they hear of it now.
        found = (("best", self.best_path, self.result.best_epoch), ("last", self.last_path, self.result.epochs_done))
        for kind, path, epoch in found:
            if path.is_file():
                for cb in self.callbacks:
                    cb.on_checkpoint(kind, path, epoch)

    def keep_last_finished(self) -> None:
        """On an interruption, the last finished epoch's checkpoint, unless one is written or queued."""
        # The epoch in progress is lost; the last finished one is kept (not where the checkpoints
        # are thrown away after the fit: resume=False).
        unsaved = self.unsaved
        keep = (
            (self.result.epochs_done, None)
            if self.live
            else (unsaved["epoch"], unsaved)
            if unsaved is not None
            else (0, None)
        )
        if (
            self.resume and keep[0] > self.last_queued and not stops.abandoned()
        ):  # (a write given up at Ctrl-C: not again)
            with stops.held("the last finished epoch's checkpoint"):  # written and handed to the callbacks (uploaded)
                self.save(self.last_path, "last", *keep)
                self.announce(keep=0)
