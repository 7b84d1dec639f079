"""The training engine: determinism, checkpoint resume, checkpoint contents, callbacks, non-finite
losses, schedules and evaluation modes. Tiny ResNet-B on the embedded CIFAR-10 subset, on the CPU."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_SETS
from torch import nn

from bench import config, data, engine
from bench import reference as reported
from bench.config import EvalConfig, OptimConfig, ScheduleConfig
from bench.data import cifar
from bench.engine import checkpoint, stops
from bench.engine.callbacks import Callback
from bench.errors import UserError
from bench.models import create_model

CPU = torch.device("cpu")
SEED = 3
# A cosine schedule: the lr differs every epoch and depends on the scheduler's epoch count, so a
# resume that lost the scheduler state would show in the weights and in the lr metric.
SETS = [
    *TINY_SETS,
    "train.epochs=4",
    "train.checkpoint_every=2",
    "train.checkpoint_min_interval_s=0",
    "schedule.name=cosine",
    "schedule.step_before_epoch=false",
]
COSINE_LRS = [0.025 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(5)]
TIME_METRICS = (
    "epoch_time_s",
    "train_time_s",
    "images_per_s",
    "peak_memory_mb",
    "alternatives_time_s",
)  # measured: differ run to run
METRIC_KEYS = {
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "test_loss",
    "test_acc",
    "lr",
    "epoch_time_s",
    "train_time_s",
    "images_per_s",
    "peak_memory_mb",
}


def make_cfg(*extra: str) -> config.RunConfig:
    return config.load("resnetb-cifar10", profile="smoke", seed=SEED, sets=[*SETS, *extra])


@pytest.fixture(scope="module")
def files() -> cifar.CifarFiles:
    """Every other image of the embedded subset (500 train, 250 test): all ten classes, half the time."""
    full = cifar.load_cifar("cifar10", None)
    half = lambda s: cifar.Split(s.images[::2].clone(), s.labels[::2].clone())  # noqa: E731
    return cifar.CifarFiles(half(full.train), half(full.test), full.classes, full.complete, full.location, full.digest)


def fresh(cfg: config.RunConfig, files: cifar.CifarFiles):
    """A new model and data bundle, seeded exactly like a new process would seed them."""
    engine.seed_everything(cfg.seed, cfg.train.deterministic)
    bundle = data.build(cfg.data, seed=cfg.seed, device=CPU, files=files)
    model = create_model(cfg.model.name, num_classes=bundle.num_classes, **cfg.model.options)
    return model, bundle


class Recorder(Callback):
    def __init__(self, stop_at: int | None = None, crash_at: int | None = None) -> None:
        self.starts: list[tuple[int, int]] = []
        self.epochs: list[tuple[int, dict[str, float]]] = []
        self.checkpoints: list[tuple[str, Path, int]] = []
        self.ends: list = []
        self.stop_at, self.crash_at = stop_at, crash_at

    def on_fit_start(self, *, start_epoch: int, epochs: int) -> None:
        self.starts.append((start_epoch, epochs))

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> bool | None:
        self.epochs.append((epoch, dict(metrics)))
        if epoch == self.crash_at:
            raise RuntimeError("simulated crash")
        return epoch == self.stop_at

    def on_checkpoint(self, kind: str, path: Path, epoch: int) -> None:
        self.checkpoints.append((kind, Path(path), epoch))

    def on_fit_end(self, result) -> None:
        self.ends.append(result)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def without_time(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k not in TIME_METRICS}


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """One uninterrupted 4-epoch run: the baseline for determinism and resume."""
    cfg = make_cfg()
    model, bundle = fresh(cfg, files)
    initial = state_of(model)
    rec = Recorder()
    ckdir = tmp_path_factory.mktemp("reference")
    result = engine.fit(model, bundle, cfg, checkpoint_dir=ckdir, callbacks=[rec], resume=True)
    return {"cfg": cfg, "initial": initial, "final": state_of(model), "result": result, "rec": rec, "dir": ckdir}


# --- determinism and resume --------------------------------------------------------------------


def test_reference_run_trains_and_finishes(reference):
    result = reference["result"]
    assert result.status == "finished"
    assert result.epochs_done == 4
    assert result.checkpoint_dir == reference["dir"]
    changed = [k for k in reference["initial"] if not torch.equal(reference["initial"][k], reference["final"][k])]
    assert any("weight" in k for k in changed)
    first, last = reference["rec"].epochs[0][1], reference["rec"].epochs[-1][1]
    assert last["train_loss"] < first["train_loss"]


def test_same_seed_gives_identical_weights_and_metrics(reference, files, tmp_path):
    cfg = make_cfg()
    model, bundle = fresh(cfg, files)
    assert_same_weights(state_of(model), reference["initial"])
    rec = Recorder()
    result = engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path, callbacks=[rec])
    assert result.status == "finished"
    assert_same_weights(state_of(model), reference["final"])
    assert without_time(result.last_metrics) == without_time(reference["result"].last_metrics)
    assert [without_time(m) for _, m in rec.epochs] == [without_time(m) for _, m in reference["rec"].epochs]
    assert (result.best_epoch, result.best_val_acc, result.best_test_acc) == (
        reference["result"].best_epoch,
        reference["result"].best_val_acc,
        reference["result"].best_test_acc,
    )


def test_a_clock_is_told_where_every_epoch_went_and_changes_nothing_trained(reference, files, tmp_path):
    """`bench perf`'s breakdown: every part of an epoch is charged to one of the clock's parts, the
    steps are counted, and a run with a clock trains exactly as the reference did without one."""
    cfg = make_cfg("train.log_every_steps=2", "train.checkpoint_every=2", "train.checkpoint_min_interval_s=0")
    model, bundle = fresh(cfg, files)
    rec, clock = Recorder(), engine.Clock()
    started = time.perf_counter()
    result = engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path, callbacks=[rec], clock=clock)
    elapsed = time.perf_counter() - started
    assert_same_weights(state_of(model), reference["final"])
    assert [without_time(m) for _, m in rec.epochs] == [without_time(m) for _, m in reference["rec"].epochs]
    assert clock.steps == result.epochs_done * len(bundle.train)
    assert set(clock.seconds) == {*engine.Clock.PARTS, engine.Clock.CLOSING}
    # The last epoch's checkpoint, written once a run after its epochs, is the run's closing.
    assert clock.seconds[engine.Clock.CLOSING] > 0
    # Training, its sums, the evaluation passes, the callbacks (per-step losses and epoch ends) and
    # the checkpoints (best and last files, the copies between) each took some time.
    assert all(clock.seconds[part] > 0 for part in engine.Clock.PARTS if part != "other"), clock.seconds
    # The laps split the time between the clock's start and the last epoch's end: no second twice.
    assert sum(clock.seconds.values()) <= elapsed


def test_another_seed_gives_other_initial_weights(reference, files):
    model, _ = fresh(config.load("resnetb-cifar10", profile="smoke", seed=SEED + 1, sets=SETS), files)
    other = state_of(model)
    assert any(not torch.equal(other[k], reference["initial"][k]) for k in other if k.endswith("weight"))


def test_resume_after_max_epochs_matches_an_uninterrupted_run(reference, files, tmp_path):
    cfg = make_cfg()
    model, bundle = fresh(cfg, files)
    first = engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path, max_epochs=2)
    assert first.status == "stopped"
    assert first.epochs_done == 2
    assert torch.load(tmp_path / engine.LAST, weights_only=True)["epoch"] == 2

    # A new process: new objects, seeded again, the checkpoint directory is all that is left.
    del model, bundle
    model, bundle = fresh(cfg, files)
    rec = Recorder()
    result = engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path, callbacks=[rec], resume=True)
    assert rec.starts == [(2, 4)]
    assert [e for e, _ in rec.epochs] == [3, 4]
    assert result.status == "finished"
    assert result.epochs_done == 4
    assert_same_weights(state_of(model), reference["final"])
    assert without_time(result.last_metrics) == without_time(reference["result"].last_metrics)
    assert [without_time(m) for _, m in rec.epochs] == [without_time(m) for _, m in reference["rec"].epochs[2:]]
    assert (result.best_epoch, result.best_val_acc, result.best_test_acc) == (
        reference["result"].best_epoch,
        reference["result"].best_val_acc,
        reference["result"].best_test_acc,
    )


def test_resume_after_a_crash_between_checkpoints_matches_an_uninterrupted_run(reference, files, tmp_path):
    """Crash after epoch 3 (last checkpoint at 2): the resumed run redoes epoch 3 exactly."""
    cfg = make_cfg()
    model, bundle = fresh(cfg, files)
    with pytest.raises(RuntimeError, match="simulated crash"):
        engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path, callbacks=[Recorder(crash_at=3)])
    assert torch.load(tmp_path / engine.LAST, weights_only=True)["epoch"] == 2

    del model, bundle
    model, bundle = fresh(cfg, files)
    rec = Recorder()
    result = engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path, callbacks=[rec])
    assert [e for e, _ in rec.epochs] == [3, 4]
    assert result.status == "finished"
    assert_same_weights(state_of(model), reference["final"])
    assert without_time(result.last_metrics) == without_time(reference["result"].last_metrics)


class Interrupter(Callback):
    """Ctrl-C where the test asks: in an epoch's end callbacks, at the announcement of a
    checkpoint, or at the first logged step of epoch `in_epoch`."""

    def __init__(
        self,
        after_epoch: int | None = None,
        at_checkpoint: tuple[str, int] | None = None,
        in_epoch: int | None = None,
        steps_per_epoch: int = 0,
    ) -> None:
        self.after_epoch, self.at_checkpoint = after_epoch, at_checkpoint
        self.in_epoch, self.steps_per_epoch = in_epoch, steps_per_epoch

    def on_train_steps(self, step: int, metrics: dict[str, float]) -> None:
        if self.in_epoch is not None and step > (self.in_epoch - 1) * self.steps_per_epoch:
            raise KeyboardInterrupt

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch == self.after_epoch:
            raise KeyboardInterrupt

    def on_checkpoint(self, kind: str, path: Path, epoch: int) -> None:
        if (kind, epoch) == self.at_checkpoint:
            raise KeyboardInterrupt


class MadeAnError(Interrupter):
    """Ctrl-C that a library turned into its own error while it cleaned up (as torch.save does)."""

    def on_train_steps(self, step: int, metrics: dict[str, float]) -> None:
        try:
            super().on_train_steps(step, metrics)
        except KeyboardInterrupt:
            raise RuntimeError("unexpected pos 54080 vs 53968")  # noqa: B904 (as torch raises it)


def interrupted_then_resumed(cfg, files, tmp_path, interrupter, reference, stop=KeyboardInterrupt) -> int:
    """Fit until `interrupter` stops it, then in a new process resume to the end: the epoch the
    interruption kept (0: none). The resumed run must end as the uninterrupted one did."""
    model, bundle = fresh(cfg, files)
    with pytest.raises(stop):
        engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path, callbacks=[interrupter])
    kept = checkpoint.load_latest(tmp_path / engine.LAST)
    del model, bundle
    model, bundle = fresh(cfg, files)
    result = engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path)
    assert result.status == "finished"
    assert_same_weights(state_of(model), reference["final"])
    assert without_time(result.last_metrics) == without_time(reference["result"].last_metrics)
    assert (result.best_epoch, result.best_val_acc) == (
        reference["result"].best_epoch,
        reference["result"].best_val_acc,
    )
    assert checkpoint.load(tmp_path / engine.BEST)["epoch"] == reference["result"].best_epoch
    return 0 if kept is None else kept["epoch"]


def test_an_interruption_between_epochs_keeps_the_epoch_just_finished(reference, files, tmp_path):
    """Checkpoints are due at epochs 2 and 4; Ctrl-C as epoch 1's best checkpoint is announced
    (epoch 1 is always the best so far) keeps epoch 1."""
    assert interrupted_then_resumed(make_cfg(), files, tmp_path, Interrupter(at_checkpoint=("best", 1)), reference) == 1


def test_an_interruption_in_the_callbacks_of_an_epoch_keeps_the_one_before(reference, files, tmp_path):
    """Ctrl-C while the callbacks take epoch 3's metrics (they may not have logged them): epoch 3
    is trained again, from epoch 2's checkpoint."""
    assert interrupted_then_resumed(make_cfg(), files, tmp_path, Interrupter(after_epoch=3), reference) == 2


def test_an_interruption_during_an_epoch_keeps_the_one_before(reference, files, tmp_path):
    """Ctrl-C in epoch 4's training: epoch 3, which no checkpoint holds, is written from its copy."""
    cfg = make_cfg("train.log_every_steps=1")
    steps = math.ceil((len(files.train) - cfg.data.val_size) / cfg.data.batch_size)
    assert (
        interrupted_then_resumed(cfg, files, tmp_path, Interrupter(in_epoch=4, steps_per_epoch=steps), reference) == 3
    )


def test_an_interruption_a_library_made_an_error_of_keeps_the_epoch_before(reference, files, tmp_path):
    """As Ctrl-C in epoch 4's training: epoch 3 is written from its copy."""
    cfg = make_cfg("train.log_every_steps=1")
    steps = math.ceil((len(files.train) - cfg.data.val_size) / cfg.data.batch_size)
    interrupter = MadeAnError(in_epoch=4, steps_per_epoch=steps)
    assert interrupted_then_resumed(cfg, files, tmp_path, interrupter, reference, stop=RuntimeError) == 3


def test_ctrl_c_during_a_due_checkpoint_write_comes_after_it_and_it_is_written_once(
    reference, files, tmp_path, monkeypatch
):
    """The signal itself, in the middle of epoch 2's checkpoint (on the CPU, in the training
    thread): the write finishes, and counts, before the stop."""
    real = checkpoint.save_rotating
    calls = []

    def signalled_in_the_first(state, path):
        calls.append(state["epoch"])
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)
        real(state, path)

    monkeypatch.setattr(checkpoint, "save_rotating", signalled_in_the_first)
    assert interrupted_then_resumed(make_cfg(), files, tmp_path, Interrupter(), reference) == 2
    assert calls[:2] == [2, 4]  # epoch 2 once, then the resumed run's next


class Heard(Interrupter):
    """An Interrupter that also notes the epochs and checkpoints it hears of."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.epochs: list[int] = []
        self.checkpoints: list[tuple[str, int]] = []

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.epochs.append(epoch)
        super().on_epoch_end(epoch, metrics)

    def on_checkpoint(self, kind: str, path: Path, epoch: int) -> None:
        self.checkpoints.append((kind, epoch))
        super().on_checkpoint(kind, path, epoch)


@pytest.mark.parametrize(
    "where, heard_epochs", [("torch.save of epoch 1's best", []), ("fsync of epoch 2's last", [1, 2])]
)
def test_ctrl_c_again_in_a_slow_checkpoint_write_gives_it_up_at_once_and_for_good(
    where, heard_epochs, reference, files, tmp_path, monkeypatch
):
    """Two Ctrl-Cs in a checkpoint write, the second past INSIST_AFTER_S: the stop comes at once
    (whether torch makes an error of it or not: no callback hears of the epoch after), and the
    stop does not write that checkpoint again, nor keep an epoch without it."""
    writing = []

    def noting(real, kind):
        def call(state, path):
            writing.append((kind, state["epoch"]))
            real(state, path)

        return call

    def signalling(real, kind, epoch, signals):
        def call(*args):
            if writing[-1:] == [(kind, epoch)] and writing.count((kind, epoch)) == 1:  # the first such write
                for _ in range(next(signals, 0)):
                    signal.raise_signal(signal.SIGINT)
            return real(*args)

        return call

    monkeypatch.setattr(checkpoint, "save", noting(checkpoint.save, "best"))
    monkeypatch.setattr(checkpoint, "save_rotating", noting(checkpoint.save_rotating, "last"))
    if where.startswith("torch.save"):  # a Ctrl-C as the 2nd piece is written, another at the 4th
        monkeypatch.setattr(
            checkpoint._Hashing, "write", signalling(checkpoint._Hashing.write, "best", 1, iter([0, 1, 0, 1]))
        )
    else:  # both as the file is fsynced, before its rename
        monkeypatch.setattr(checkpoint.os, "fsync", signalling(os.fsync, "last", 2, iter([2])))
    monkeypatch.setattr(stops, "INSIST_AFTER_S", 0.0)
    heard = Heard()
    stop = RuntimeError if where.startswith("torch.save") else KeyboardInterrupt
    assert interrupted_then_resumed(make_cfg(), files, tmp_path, heard, reference, stop=stop) == 0
    assert heard.epochs == heard_epochs


def test_a_quick_second_ctrl_c_while_a_stop_writes_the_last_epoch_waits_until_it_is_handed_on(
    reference, files, tmp_path, monkeypatch
):
    """Ctrl-C in epoch 4 keeps epoch 3 from its copy; another Ctrl-C during that write comes once
    the callbacks have the checkpoint (MLflow uploads it: a resume elsewhere starts from it)."""
    real = checkpoint.save_rotating

    def signalled_at_3(state, path):
        if state["epoch"] == 3:
            signal.raise_signal(signal.SIGINT)
        real(state, path)

    monkeypatch.setattr(checkpoint, "save_rotating", signalled_at_3)
    cfg = make_cfg("train.log_every_steps=1")
    steps = math.ceil((len(files.train) - cfg.data.val_size) / cfg.data.batch_size)
    heard = Heard(in_epoch=4, steps_per_epoch=steps)
    assert interrupted_then_resumed(cfg, files, tmp_path, heard, reference) == 3
    assert ("last", 3) in heard.checkpoints


def test_an_interruption_during_a_due_checkpoint_write_still_keeps_that_epoch(reference, files, tmp_path, monkeypatch):
    """Ctrl-C while epoch 2's checkpoint is half written (on the CPU, in the training thread)."""
    real = checkpoint.save_rotating
    calls = []

    def interrupted_once(state, path):
        calls.append(state["epoch"])
        if len(calls) == 1:
            checkpoint._write_tmp(state, Path(path))  # the file half-way: written, not renamed
            raise KeyboardInterrupt
        real(state, path)

    monkeypatch.setattr(checkpoint, "save_rotating", interrupted_once)
    assert interrupted_then_resumed(make_cfg(), files, tmp_path, Interrupter(), reference) == 2
    assert calls[:2] == [2, 2]


def test_an_interruption_during_a_best_checkpoint_write_keeps_no_epoch_without_it(
    reference, files, tmp_path, monkeypatch
):
    """Ctrl-C while epoch 1's best checkpoint is written: keeping epoch 1 would leave no best.pt
    for it and its metrics unlogged, so the run starts again from nothing."""
    real = checkpoint.save
    calls = []

    def interrupted_once(state, path):
        calls.append(state["epoch"])
        if len(calls) == 1:
            raise KeyboardInterrupt
        real(state, path)

    monkeypatch.setattr(checkpoint, "save", interrupted_once)
    assert interrupted_then_resumed(make_cfg(), files, tmp_path, Interrupter(), reference) == 0
    assert calls[:2] == [1, 1]


@pytest.mark.parametrize("where, kept", [("between epochs", 1), ("in the callbacks", 2), ("during an epoch", 3)])
def test_with_the_background_writer_an_interruption_keeps_the_same_epochs(
    where, kept, reference, files, tmp_path, monkeypatch
):
    """On an accelerator checkpoints are written by a thread while training goes on; the epoch an
    interruption keeps, and the run resumed from it, are the same as with the CPU's inline writes."""
    real = checkpoint.Saver
    monkeypatch.setattr(checkpoint, "Saver", lambda background: real(background=True))
    cfg = make_cfg("train.log_every_steps=1")
    steps = math.ceil((len(files.train) - cfg.data.val_size) / cfg.data.batch_size)
    interrupter = {
        "between epochs": Interrupter(at_checkpoint=("best", 1)),
        "in the callbacks": Interrupter(after_epoch=3),
        "during an epoch": Interrupter(in_epoch=4, steps_per_epoch=steps),
    }[where]
    assert interrupted_then_resumed(cfg, files, tmp_path, interrupter, reference) == kept


def test_an_interruption_writes_nothing_where_the_fit_does_not_resume(files, tmp_path):
    cfg = make_cfg()
    model, bundle = fresh(cfg, files)
    with pytest.raises(KeyboardInterrupt):
        engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path, callbacks=[Interrupter(after_epoch=3)], resume=False)
    assert checkpoint.load_latest(tmp_path / engine.LAST)["epoch"] == 2


def test_a_run_with_nothing_left_to_train_announces_its_final_checkpoints_again(reference, files):
    """Killed after its final checkpoint was written, before the callbacks (MLflow's upload) heard
    of it: the rerun trains nothing and announces them, so the store ends with the final weights."""
    model, bundle = fresh(reference["cfg"], files)
    rec = Recorder()
    result = engine.fit(model, bundle, reference["cfg"], checkpoint_dir=reference["dir"], callbacks=[rec])
    assert result.epochs_done == 4 and rec.epochs == []
    assert [(kind, path.name, epoch) for kind, path, epoch in rec.checkpoints] == [
        ("best", engine.BEST, reference["result"].best_epoch),
        ("last", engine.LAST, 4),
    ]


def test_resume_false_ignores_an_existing_checkpoint(reference, files, tmp_path):
    cfg = make_cfg("train.epochs=1")
    model, bundle = fresh(cfg, files)
    # A checkpoint of a finished 4-epoch run is there; resume=False must start from scratch.
    for name in (engine.LAST, engine.BEST):
        (tmp_path / name).write_bytes((reference["dir"] / name).read_bytes())
    rec = Recorder()
    result = engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path, callbacks=[rec], resume=False)
    assert rec.starts == [(0, 1)]
    assert [e for e, _ in rec.epochs] == [1]
    assert result.epochs_done == 1
    assert torch.load(tmp_path / engine.LAST, weights_only=True)["epoch"] == 1


def test_a_schedule_stepped_before_each_epoch_logs_and_resumes_the_same_rates(files, tmp_path):
    cfg = make_cfg(
        "schedule.name=step", "schedule.step_size=2", "schedule.gamma=0.5", "schedule.step_before_epoch=true"
    )
    model, bundle = fresh(cfg, files)
    whole = Recorder()
    engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path / "whole", callbacks=[whole])
    # Halved at epochs 2 and 4, not 3 and 5: each epoch trains at the rate of its own number of steps.
    assert [m["lr"] for _, m in whole.epochs] == pytest.approx([0.025, 0.0125, 0.0125, 0.00625], abs=1e-12)
    final = state_of(model)

    model, bundle = fresh(cfg, files)
    engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path / "resumed", max_epochs=2)
    model, bundle = fresh(cfg, files)
    rec = Recorder()
    engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path / "resumed", callbacks=[rec])
    # The resumed scheduler is the saved one, not stepped ahead a second time.
    assert [e for e, _ in rec.epochs] == [3, 4]
    assert [without_time(m) for _, m in rec.epochs] == [without_time(m) for _, m in whole.epochs[2:]]
    assert_same_weights(state_of(model), final)


# --- checkpoint files --------------------------------------------------------------------------


def test_checkpoint_contents(reference):
    ckdir, result, cfg = reference["dir"], reference["result"], reference["cfg"]
    state = torch.load(ckdir / engine.LAST, map_location="cpu", weights_only=True)
    assert {"epoch", "model", "optimizer", "scheduler", "rng", "best", "metrics", "config_hash"} <= state.keys()
    assert state["epoch"] == 4
    assert_same_weights(dict(state["model"]), reference["final"])
    assert {"state", "param_groups"} <= state["optimizer"].keys()
    assert state["optimizer"]["state"], "SGD with momentum has momentum buffers"
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(COSINE_LRS[4], abs=1e-12)
    assert state["scheduler"]["last_epoch"] == 4
    assert isinstance(state["rng"]["torch"], torch.Tensor) and isinstance(state["rng"]["data"], torch.Tensor)
    assert state["config_hash"] == cfg.config_hash()
    assert dict(state["metrics"]) == result.last_metrics
    assert tuple(state["best"]) == (result.best_epoch, result.best_val_acc, result.best_test_acc)
    # No .tmp left; the "last" before this one is kept in case this one is ever unreadable.
    assert sorted(p.name for p in ckdir.iterdir()) == sorted([engine.BEST, engine.LAST, "last.prev.pt"])


def test_the_cuda_generator_saved_and_restored_is_the_run_devices(monkeypatch):
    """A run on cuda:1 draws its dropout masks from cuda:1's generator: that one is checkpointed
    and restored, not the current device's (GPU 0's). The CUDA calls are recorded, not made:
    this machine may have no GPU (test_the_run_devices_cuda_generator_round_trips makes them)."""
    calls = []
    monkeypatch.setattr(
        torch.cuda,
        "get_rng_state",
        lambda device="cuda": calls.append(("get", device)) or torch.ones(2, dtype=torch.uint8),
    )
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(("set", device, state.tolist()))
    )
    gen, cuda1 = torch.Generator(), torch.device("cuda", 1)
    state = engine.loop._rng_state(gen, cuda1)
    assert set(state) == {"torch", "data", "cuda"}
    engine.loop._set_rng_state(state, gen, cuda1)
    assert calls == [("get", cuda1), ("set", cuda1, [1, 1])]
    # A run on the CPU has no CUDA generator to keep, even where CUDA is present; one resumed on
    # the CPU from a checkpoint written on CUDA leaves CUDA alone.
    calls.clear()
    assert set(engine.loop._rng_state(gen, CPU)) == {"torch", "data"}
    engine.loop._set_rng_state(state, gen, CPU)
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_run_devices_cuda_generator_round_trips():
    device = torch.device("cuda", torch.cuda.device_count() - 1)  # not the current device where there are two
    gen = torch.Generator(device=device).manual_seed(0)
    state = engine.loop._rng_state(gen, device)
    drawn = torch.rand(8, device=device), torch.rand(8, device=device, generator=gen)
    torch.cuda.manual_seed_all(SEED + 1)
    gen.manual_seed(SEED + 1)
    engine.loop._set_rng_state(state, gen, device)
    again = torch.rand(8, device=device), torch.rand(8, device=device, generator=gen)
    assert all(torch.equal(a, b) for a, b in zip(drawn, again))


def test_best_checkpoint_is_chosen_on_validation_accuracy(reference):
    ckdir, result, rec = reference["dir"], reference["result"], reference["rec"]
    val = [m["val_acc"] for _, m in rec.epochs]
    best_epoch = val.index(max(val)) + 1  # the first epoch reaching the maximum
    assert result.best_epoch == best_epoch
    assert result.best_val_acc == max(val)
    assert result.best_test_acc == rec.epochs[best_epoch - 1][1]["test_acc"]
    best = torch.load(ckdir / engine.BEST, map_location="cpu", weights_only=True)
    assert best["epoch"] == best_epoch
    # A best checkpoint whenever val_acc improved, a last one every 2 epochs and at the end.
    improved = [e for e, _ in rec.epochs if rec.epochs[e - 1][1]["val_acc"] > max([-1.0] + val[: e - 1])]
    assert [(k, e) for k, _, e in rec.checkpoints if k == "best"] == [("best", e) for e in improved]
    assert [(k, e) for k, _, e in rec.checkpoints if k == "last"] == [("last", 2), ("last", 4)]
    assert {p for _, p, _ in rec.checkpoints} == {ckdir / engine.BEST, ckdir / engine.LAST}


def test_no_best_checkpoint_without_a_validation_split(files, tmp_path):
    cfg = make_cfg("data.val_size=0", "train.epochs=1")
    model, bundle = fresh(cfg, files)
    assert bundle.val is None
    rec = Recorder()
    result = engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path, callbacks=[rec])
    assert result.status == "finished"
    assert result.best_epoch is None and result.best_val_acc is None
    assert "val_acc" not in result.last_metrics and "test_acc" in result.last_metrics
    assert (tmp_path / engine.LAST).is_file()
    assert not (tmp_path / engine.BEST).exists()
    assert [k for k, _, _ in rec.checkpoints] == ["last"]


def test_without_the_test_split_the_run_never_evaluates_it(files, tmp_path):
    cfg = make_cfg("train.epochs=1")
    model, bundle = fresh(cfg, files)
    rec = Recorder()
    result = engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path, callbacks=[rec], evaluate_test=False)
    assert result.status == "finished" and result.best_val_acc is not None and result.best_test_acc is None
    assert [set(m) for _, m in rec.epochs] == [METRIC_KEYS - {"test_loss", "test_acc"}]


# --- callbacks ---------------------------------------------------------------------------------


def test_callbacks_see_every_epoch_with_its_metrics(reference, files):
    rec, result = reference["rec"], reference["result"]
    train_images = len(files.train) - reference["cfg"].data.val_size
    assert rec.starts == [(0, 4)]
    assert [e for e, _ in rec.epochs] == [1, 2, 3, 4]
    for epoch, metrics in rec.epochs:
        assert set(metrics) == METRIC_KEYS, epoch
        for key in ("train_acc", "val_acc", "test_acc"):
            assert 0.0 <= metrics[key] <= 1.0, (epoch, key)
        for key in ("train_loss", "val_loss", "test_loss"):
            assert math.isfinite(metrics[key]) and metrics[key] > 0, (epoch, key)
        assert metrics["epoch_time_s"] > 0 and metrics["images_per_s"] > 0
        # The training pass alone: the evaluations come after it, within the epoch's time.
        assert 0 < metrics["train_time_s"] < metrics["epoch_time_s"]
        assert metrics["images_per_s"] == pytest.approx(train_images / metrics["train_time_s"])
    # lr is the rate the epoch trained with: cosine from 0.025 over the 4 epochs.
    assert [m["lr"] for _, m in rec.epochs] == pytest.approx(COSINE_LRS[:4])
    assert rec.ends == [result]
    assert rec.epochs[-1][1] == result.last_metrics


def test_a_callback_returning_true_stops_the_run(files, tmp_path):
    cfg = make_cfg()
    model, bundle = fresh(cfg, files)
    stopper, watcher = Recorder(stop_at=1), Recorder()
    result = engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path, callbacks=[stopper, watcher])
    assert result.status == "stopped"
    assert result.epochs_done == 1
    # Every callback still sees the epoch and the end, and the stop is checkpointed for resume.
    assert [e for e, _ in watcher.epochs] == [1]
    assert watcher.ends == [result] and stopper.ends == [result]
    assert torch.load(tmp_path / engine.LAST, weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("how", ["huge_lr", "nan_forward"])
def test_a_non_finite_loss_ends_the_run_as_nonfinite(how, files, tmp_path):
    cfg = make_cfg("optim.lr=1e30") if how == "huge_lr" else make_cfg()
    model, bundle = fresh(cfg, files)
    if how == "nan_forward":
        forward = model.forward
        model.forward = lambda x: forward(x) * float("nan")
    rec = Recorder()
    result = engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path, callbacks=[rec])
    assert result.status == "nonfinite"
    assert result.epochs_done == 0 and result.nonfinite_epoch == 1
    assert not math.isfinite(result.last_metrics["train_loss"])
    assert rec.epochs == []
    assert rec.ends == [result]
    assert not (tmp_path / engine.LAST).exists()


# --- optimizers, schedules, evaluation ---------------------------------------------------------


def lr_sequence(cfg: ScheduleConfig, epochs: int, steps: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = engine.build_scheduler(opt, cfg, epochs)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize(
    "cfg, epochs, expected",
    [
        (ScheduleConfig(name="none"), 5, [1.0] * 5),
        (ScheduleConfig(name="step", step_size=2, gamma=0.5), 6, [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]),
        (ScheduleConfig(name="step", step_size=20, gamma=0.1), 41, [1.0] * 20 + [0.1] * 20 + [0.01]),
        (ScheduleConfig(name="exponential", gamma=0.5), 4, [1.0, 0.5, 0.25, 0.125]),
        (
            ScheduleConfig(name="cosine"),
            4,
            [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0],
        ),
        (ScheduleConfig(name="cosine", eta_min=0.1), 2, [1.0, 0.55, 0.1]),
        # One step ahead: epoch k trains at the rate of k steps.
        (
            ScheduleConfig(name="step", step_size=2, gamma=0.5, step_before_epoch=True),
            6,
            [1.0, 0.5, 0.5, 0.25, 0.25, 0.125],
        ),
        (ScheduleConfig(name="exponential", gamma=0.5, step_before_epoch=True), 3, [0.5, 0.25, 0.125]),
        (ScheduleConfig(name="none", step_before_epoch=True), 3, [1.0] * 3),
    ],
)
def test_schedules(cfg, epochs, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the step ahead is meant: PyTorch's warning about it is not shown
        assert lr_sequence(cfg, epochs, len(expected)) == pytest.approx(expected, abs=1e-12)


def test_r4_schedule_reproduces_the_lr_its_source_logged_at_every_epoch():
    """seeds/004 Appendix B logs the lr of each of R4's 100 epochs (experiments/reference/curves.csv)."""
    cfg = config.load("resnetb-cifar10", profile="paper")
    curves = reported.load_curves()
    logged = curves[(curves.experiment == "resnetb-cifar10") & (curves.metric == "lr")].sort_values("epoch")
    assert logged.epoch.tolist() == list(range(1, cfg.train.epochs + 1))

    def lrs(schedule: ScheduleConfig) -> list[float]:
        return [cfg.optim.lr * f for f in lr_sequence(schedule, cfg.train.epochs, cfg.train.epochs)]

    assert cfg.schedule.step_before_epoch is True
    assert lrs(cfg.schedule) == pytest.approx(logged.value.tolist(), rel=1e-9)
    # PyTorch's order decays one epoch later: epoch 20 would still train at 0.1.
    standard = lrs(cfg.schedule.model_copy(update={"step_before_epoch": False}))
    assert [e for e, (a, b) in enumerate(zip(standard, logged.value), 1) if a != pytest.approx(b, rel=1e-9)] == [
        20,
        40,
        60,
        80,
        100,
    ]


def test_scheduler_state_round_trips_for_every_schedule():
    for name in ("none", "step", "exponential", "cosine"):
        cfg = ScheduleConfig(name=name, step_size=1, gamma=0.5)
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = engine.build_scheduler(opt, cfg, 4)
        for _ in range(2):
            opt.step()
            sched.step()
        saved = sched.state_dict()
        opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        opt2.load_state_dict(opt.state_dict())
        sched2 = engine.build_scheduler(opt2, cfg, 4)
        sched2.load_state_dict(saved)
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"], name


def test_build_optimizer():
    frozen, free = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    frozen.requires_grad_(False)
    sgd = engine.build_optimizer(
        [frozen, free], OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    )
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.1, 0.9, 1e-4, True)
    assert len(group["params"]) == 1 and group["params"][0] is free
    adam = engine.build_optimizer([free], OptimConfig(name="adam", lr=1e-3, weight_decay=1e-5))
    assert isinstance(adam, torch.optim.Adam)
    assert (adam.param_groups[0]["lr"], adam.param_groups[0]["weight_decay"]) == (1e-3, 1e-5)


def test_evaluate_matches_a_plain_loop_and_eval_mode_differs_from_train_mode(files):
    cfg = make_cfg()
    model, bundle = fresh(cfg, files)
    # Running statistics unlike any batch's: BatchNorm in train mode ignores them, in eval mode uses them.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(0.5)
            m.running_var.fill_(4.0)
    eval_loss, eval_acc = engine.evaluate(model, bundle.test, "eval")
    assert model.training is False
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    train_loss, train_acc = engine.evaluate(model, bundle.test, "train")
    assert model.training is True
    assert train_loss != pytest.approx(eval_loss, rel=1e-3)

    # The same numbers from a plain loop over the test images in eval mode.
    model.load_state_dict({**model.state_dict(), **running})
    model.eval()
    with torch.no_grad():
        x = ((files.test.images.float() / 255) - bundle.test.mean) / bundle.test.std
        logits = model(x)
    assert bundle.test.num_images == len(files.test) == 250
    assert eval_acc == pytest.approx((logits.argmax(1) == files.test.labels).float().mean().item())
    assert eval_loss == pytest.approx(nn.functional.cross_entropy(logits, files.test.labels).item(), rel=1e-5)
    assert engine.evaluate(model, bundle.test, "eval") == pytest.approx((eval_loss, eval_acc))


def test_train_mode_evaluation_leaves_the_buffers_alone(files):
    cfg = make_cfg()
    model, bundle = fresh(cfg, files)
    before = {k: v.clone() for k, v in model.named_buffers()}
    assert {"running_mean", "running_var", "num_batches_tracked"} <= {k.rsplit(".", 1)[-1] for k in before}
    loss, acc = engine.evaluate(model, bundle.test, "train")
    assert model.training is True and math.isfinite(loss) and 0 <= acc <= 1
    assert_same_weights(dict(model.named_buffers()), before)


def test_train_mode_evaluation_leaves_no_trace_in_the_checkpoints(files, tmp_path):
    """R1's switches run the model in train mode over the validation, test and (re-measured)
    train images after each epoch; its checkpoints still hold what training alone left, as a run
    evaluated in eval mode (no dropout in resnet_b: both runs draw the same random numbers)."""
    sets = ["train.epochs=2", "train.checkpoint_every=1", "eval.remeasure_train_acc=true"]
    for mode in ("train", "eval"):
        cfg = make_cfg(*sets, f"eval.mode={mode}")
        model, bundle = fresh(cfg, files)
        assert engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path / mode).status == "finished"
    trained = {}
    for path in (tmp_path / "eval" / engine.LAST, checkpoint.previous(tmp_path / "eval" / engine.LAST)):
        state = checkpoint.load(path)
        trained[state["epoch"]] = dict(state["model"])
    assert sorted(trained) == [1, 2]
    last = tmp_path / "train" / engine.LAST
    for path in (last, checkpoint.previous(last), tmp_path / "train" / engine.BEST):
        state = checkpoint.load(path)
        assert_same_weights(dict(state["model"]), trained[state["epoch"]])


def test_train_one_epoch_sees_every_training_image(files):
    cfg = make_cfg()
    model, bundle = fresh(cfg, files)
    opt = engine.build_optimizer(model.parameters(), cfg.optim)
    loss, acc, seen = engine.train_one_epoch(model, bundle.train, opt)
    assert seen == bundle.train.num_images == len(files.train) - cfg.data.val_size
    assert math.isfinite(loss) and 0.0 <= acc <= 1.0


def test_resolve_device():
    assert engine.resolve_device("cpu") == CPU
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            engine.resolve_device("cuda")
        with pytest.raises(UserError):
            engine.resolve_device("cuda:1")
        if not torch.backends.mps.is_available():
            assert engine.resolve_device("auto") == CPU
    assert engine.device_name(CPU) == f"cpu ({os.cpu_count()} cores)"


def test_importing_the_engine_does_not_import_mlflow_or_optuna():
    code = (
        "import sys, bench.engine\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'optuna') or m == 'bench.tracking')\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- the step: autocast, compile, per-step metrics ---------------------------------------------


def test_amp_is_bfloat16_only_where_the_device_runs_it_fast():
    assert engine.autocast_dtype(CPU, amp=True) is None
    assert engine.autocast_dtype(CPU, amp=False) is None
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert engine.autocast_dtype(torch.device("cuda"), amp=True) is torch.bfloat16


def test_a_bfloat16_step_trains_and_reports_float_metrics(files):
    cfg = make_cfg("train.epochs=1")
    model, bundle = fresh(cfg, files)
    step = engine.Step(torch.channels_last, torch.bfloat16)
    x, y = next(iter(bundle.test))
    logits, loss = step.forward(model, x, y)
    assert logits.dtype is torch.bfloat16 and loss.dtype is torch.float32
    opt = engine.build_optimizer(model.parameters(), cfg.optim)
    loss, acc, seen = engine.train_one_epoch(model, bundle.train, opt, step)
    assert math.isfinite(loss) and 0 <= acc <= 1 and seen == bundle.train.num_images
    eval_loss, eval_acc = engine.evaluate(model, bundle.test, "eval", step)
    assert math.isfinite(eval_loss) and 0 <= eval_acc <= 1


class OneBatch:
    """A split of one fixed batch, as train_one_epoch iterates one."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.labels = x, y

    def __iter__(self):
        yield self.x, self.labels


DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else [])


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_a_bfloat16_step_trains_on_the_float32_loss_of_its_logits(device, files):
    """PyTorch's AMP recipe: forward and loss under autocast, which runs cross_entropy in float32.
    The loss a step trains on and reports is that of the bfloat16 logits taken in float32, not a
    loss computed in bfloat16."""
    cfg = make_cfg()
    model, bundle = fresh(cfg, files)
    model.to(device).train()
    x, y = (t.to(device) for t in next(iter(bundle.test)))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(x)
    float_loss = F.cross_entropy(logits.float(), y).item()
    assert F.cross_entropy(logits, y).item() != pytest.approx(float_loss, rel=1e-5)  # bfloat16 rounds it
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, _, seen = engine.train_one_epoch(model, OneBatch(x, y), opt, engine.Step(torch.channels_last, torch.bfloat16))
    assert seen == len(y)
    assert loss == pytest.approx(float_loss, rel=1e-6)


class StepLog(Callback):
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def on_train_steps(self, step: int, metrics: dict[str, float]) -> None:
        self.logged.append((step, metrics))


def test_log_every_steps_reports_the_mean_loss_at_global_steps(files, tmp_path):
    cfg = make_cfg("train.epochs=2", "train.log_every_steps=4")
    model, bundle = fresh(cfg, files)
    log = StepLog()
    engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path, callbacks=[log])
    per_epoch = len(bundle.train)
    expected = [e * per_epoch + i for e in range(2) for i in range(4, per_epoch + 1, 4)]
    assert [s for s, _ in log.logged] == expected
    assert all(set(m) == {"train_step_loss"} and m["train_step_loss"] > 0 for _, m in log.logged)


def test_log_every_steps_does_not_change_training(reference, files, tmp_path):
    cfg = make_cfg("train.log_every_steps=3")
    model, bundle = fresh(cfg, files)
    engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path)
    assert_same_weights(state_of(model), reference["final"])


def test_compile_warms_up_untimed_and_trains_like_the_eager_model(files, tmp_path):
    eager_cfg = make_cfg("train.epochs=2")
    model, bundle = fresh(eager_cfg, files)
    eager_rec = Recorder()
    engine.fit(model, bundle, eager_cfg, checkpoint_dir=tmp_path / "eager", callbacks=[eager_rec])
    cfg = make_cfg("train.epochs=2", "train.compile=true")
    model, bundle = fresh(cfg, files)
    rec = Recorder()
    result = engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path / "compiled", callbacks=[rec])
    assert result.status == "finished"
    assert rec.epochs[0][1]["compile_time_s"] > 0
    assert "compile_time_s" not in rec.epochs[1][1]
    # The warm-up left weights, buffers and random state alone: the compiled run follows the
    # eager one (compiled kernels may round differently, so closely, not bit for bit).
    for (_, eager), (_, compiled) in zip(eager_rec.epochs, rec.epochs):
        assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-3)
        assert compiled["val_acc"] == pytest.approx(eager["val_acc"], abs=0.02)
    # The checkpoint holds the plain model's weights, loadable without torch.compile.
    saved = torch.load(tmp_path / "compiled" / engine.LAST, weights_only=True)["model"]
    assert saved.keys() == model.state_dict().keys()


class CheckpointReader(Callback):
    """Reads each checkpoint when it is announced: it must be on disk, whole, of that epoch."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def on_checkpoint(self, kind: str, path: Path, epoch: int) -> None:
        assert checkpoint.load(path)["epoch"] == epoch
        self.seen.append((kind, epoch))


def test_checkpoints_are_announced_once_written_in_order(files, tmp_path):
    cfg = make_cfg("train.checkpoint_every=1")
    model, bundle = fresh(cfg, files)
    reader = CheckpointReader()
    result = engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path, callbacks=[reader])
    lasts = [e for kind, e in reader.seen if kind == "last"]
    assert lasts == [1, 2, 3, 4]
    assert ("best", result.best_epoch) in reader.seen


def test_checkpoints_keep_the_minimum_interval_but_the_last_epoch_and_a_stop_always_save(files, tmp_path):
    cfg = make_cfg("train.checkpoint_every=1", "train.checkpoint_min_interval_s=3600")
    model, bundle = fresh(cfg, files)
    reader = CheckpointReader()
    engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path / "whole", callbacks=[reader])
    assert [e for kind, e in reader.seen if kind == "last"] == [4]  # epochs 1-3 came within the hour
    model, bundle = fresh(cfg, files)
    reader = CheckpointReader()
    result = engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path / "stopped", callbacks=[reader], max_epochs=2)
    assert result.status == "stopped"
    assert [e for kind, e in reader.seen if kind == "last"] == [2]


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="resets the resident-set peak through Linux's /proc"
)
def test_the_peak_memory_a_fit_logs_is_its_own_not_the_process_s():
    cpu = torch.device("cpu")
    big = np.ones(400 * 2**20, dtype=np.uint8)  # 400 MiB made resident, then handed back (mmap-sized)
    del big
    before = engine.peak_memory_mb(cpu)
    engine.reset_peak_memory(cpu)
    assert engine.peak_memory_mb(cpu) < before - 300


# --- evaluation apart from training, and evaluation-only alternatives ---------------------------

# R1's network shrunk to seconds an epoch, its dropout kept (raised, so that a shifted random stream
# shows in the weights): four stages end on a 4x4 map at 32 px, as the author's head expects.
HW4_SETS = [
    "model.blocks=[1,1,1,1]",
    "model.widths=[4,8,8,8]",
    "model.stem_width=4",
    "model.stem_dropout=0.2",
    "data.val_size=50",
    "train.epochs=2",
    "train.checkpoint_min_interval_s=0",
]
RECIPE_EVAL = EvalConfig(mode="train", remeasure_train_acc=True)  # R1's: batch statistics, train_acc re-measured
STANDARD_EVAL = EvalConfig(mode="eval", remeasure_train_acc=False)
# What the suite asks of R1's recipe: each evaluation switch flipped alone, on the same weights.
RECIPE_ALTERNATIVES = [
    ("eval.mode-eval", EvalConfig(mode="eval", remeasure_train_acc=True)),
    ("eval.remeasure_train_acc-false", EvalConfig(mode="train", remeasure_train_acc=False)),
]


@pytest.fixture(scope="module")
def hw4_files() -> cifar.CifarFiles:
    """Every other image of the embedded CIFAR-100 subset."""
    full = cifar.load_cifar("cifar100", None)
    half = lambda s: cifar.Split(s.images[::2].clone(), s.labels[::2].clone())  # noqa: E731
    return cifar.CifarFiles(half(full.train), half(full.test), full.classes, full.complete, full.location, full.digest)


def hw4_cfg(ev: EvalConfig, *extra: str) -> config.RunConfig:
    sets = [
        *HW4_SETS,
        f"eval.mode={ev.mode}",
        f"eval.remeasure_train_acc={str(ev.remeasure_train_acc).lower()}",
        *extra,
    ]
    return config.load("hw4-resnet-cifar100", profile="smoke", seed=SEED, sets=sets)


def hw4_fit(ev: EvalConfig, files, ckdir: Path, *extra: str, **fit_kwargs):
    """A fresh hw4 run with evaluation `ev`: its final weights, its callbacks' record and its result."""
    cfg = hw4_cfg(ev, *extra)
    model, bundle = fresh(cfg, files)
    rec = Recorder()
    result = engine.fit(model, bundle, cfg, checkpoint_dir=ckdir, callbacks=[rec], **fit_kwargs)
    assert result.status == "finished" or "max_epochs" in fit_kwargs
    return state_of(model), rec, result


def series(rec: Recorder, key: str) -> list[float]:
    return [m[key] for _, m in rec.epochs]


@pytest.fixture(scope="module")
def hw4_runs(hw4_files, tmp_path_factory):
    """R1's evaluation with the suite's alternatives (and one equal to its own, which adds
    nothing); the standard evaluation, with alternatives that are R1's switches again; and runs
    trained with each alternative as their own evaluation."""
    root = tmp_path_factory.mktemp("hw4")
    runs = {
        "recipe": hw4_fit(
            RECIPE_EVAL, hw4_files, root / "recipe", alternatives=[*RECIPE_ALTERNATIVES, ("same", RECIPE_EVAL)]
        ),
        "standard": hw4_fit(
            STANDARD_EVAL,
            hw4_files,
            root / "standard",
            alternatives=[
                ("eval.mode-train", EvalConfig(mode="train", remeasure_train_acc=False)),
                ("eval.remeasure_train_acc-true", EvalConfig(mode="eval", remeasure_train_acc=True)),
                ("both", RECIPE_EVAL),
            ],
        ),
    }
    for suffix, alt in RECIPE_ALTERNATIVES:
        runs[suffix] = hw4_fit(alt, hw4_files, root / suffix)
    return runs


def test_the_evaluation_settings_change_no_trained_weight(hw4_runs):
    """Train-mode evaluation draws dropout masks and the re-measure pass shuffles and augments the
    train split: on random streams of their own, so the training draws the same numbers whatever
    the evaluation."""
    weights, rec, _ = hw4_runs["recipe"]
    for name in ("standard", *(s for s, _ in RECIPE_ALTERNATIVES)):
        assert_same_weights(hw4_runs[name][0], weights)
        assert series(hw4_runs[name][1], "train_loss") == series(rec, "train_loss"), name
    assert series(rec, "train_acc") != series(hw4_runs["standard"][1], "train_acc")  # re-measured against running


def test_an_evaluation_pass_draws_from_its_seed_alone(hw4_files):
    """Train-mode evaluation over the augmented train split: the numbers follow the pass's seed,
    and the training's generators (the CPU's and the data's) are left where they were."""
    cfg = hw4_cfg(RECIPE_EVAL, "model.stem_dropout=0.5")
    model, bundle = fresh(cfg, hw4_files)
    before = torch.get_rng_state(), bundle.generator.get_state()
    first = engine.evaluation._evaluate_apart(model, bundle.train, "train", engine.Step(), seed=1)
    assert torch.equal(torch.get_rng_state(), before[0]) and torch.equal(bundle.generator.get_state(), before[1])
    torch.manual_seed(SEED + 1)  # the training's streams elsewhere: the pass does not follow them
    bundle.generator.manual_seed(SEED + 1)
    assert engine.evaluation._evaluate_apart(model, bundle.train, "train", engine.Step(), seed=1) == first
    assert engine.evaluation._evaluate_apart(model, bundle.train, "train", engine.Step(), seed=2) != first
    seeds = {engine.evaluation._pass_seed(SEED, epoch, split) for epoch in (1, 2) for split in ("train", "val", "test")}
    assert len(seeds) == 6 and engine.evaluation._pass_seed(SEED + 1, 1, "val") not in seeds


def test_an_alternative_logs_what_a_run_with_that_evaluation_logs(hw4_runs):
    recipe, standard = hw4_runs["recipe"][1], hw4_runs["standard"][1]
    eval_mode, no_remeasure = hw4_runs["eval.mode-eval"][1], hw4_runs["eval.remeasure_train_acc-false"][1]
    for key in ("val_loss", "val_acc", "test_loss", "test_acc"):
        assert series(recipe, f"{key}/eval.mode-eval") == series(eval_mode, key) == series(standard, key), key
        assert series(standard, f"{key}/eval.mode-train") == series(recipe, key), (
            key
        )  # batch statistics and dropout, seeded alike
        assert series(standard, f"{key}/both") == series(recipe, key), key
        assert series(recipe, key) != series(standard, key), key
    assert (
        series(recipe, "train_acc/eval.remeasure_train_acc-false")
        == series(no_remeasure, "train_acc")
        == series(standard, "train_acc")
    )
    assert series(standard, "train_acc/eval.remeasure_train_acc-true") == series(eval_mode, "train_acc")
    assert series(standard, "train_acc/both") == series(recipe, "train_acc")


def test_an_alternative_logs_only_the_metrics_its_switches_change(hw4_runs):
    """A mode alone: validation and test again, not the train split (a pass over 50k images); a
    re-measure switch alone: train_acc; one equal to the run's own evaluation: nothing."""
    _, recipe, result = hw4_runs["recipe"]
    held_out = ["val_loss", "val_acc", "test_loss", "test_acc"]
    # The alternatives' passes are timed apart: epoch_time_s stays what the run's own epoch takes.
    added = {f"{k}/eval.mode-eval" for k in held_out} | {
        "train_acc/eval.remeasure_train_acc-false",
        "alternatives_time_s",
    }
    assert [set(m) for _, m in recipe.epochs] == [METRIC_KEYS | added] * 2
    _, standard, _ = hw4_runs["standard"]
    added = (
        {f"{k}/eval.mode-train" for k in held_out}
        | {"train_acc/eval.remeasure_train_acc-true"}
        | {f"{k}/both" for k in [*held_out, "train_acc"]}
        | {"alternatives_time_s"}
    )
    assert [set(m) for _, m in standard.epochs] == [METRIC_KEYS | added] * 2
    # Every epoch's alternatives reach the result; the best checkpoint follows the run's own val_acc.
    assert result.last_metrics == recipe.epochs[-1][1]
    val = series(recipe, "val_acc")
    assert (result.best_epoch, result.best_val_acc) == (val.index(max(val)) + 1, max(val))
    assert result.best_test_acc == recipe.epochs[result.best_epoch - 1][1]["test_acc"]


def test_an_alternative_measures_only_the_splits_the_run_evaluates(hw4_files, tmp_path):
    alternatives = RECIPE_ALTERNATIVES[:1]
    _, rec, _ = hw4_fit(
        RECIPE_EVAL, hw4_files, tmp_path / "no-val", "data.val_size=0", "train.epochs=1", alternatives=alternatives
    )
    assert {k for k in rec.epochs[0][1] if "/" in k} == {"test_loss/eval.mode-eval", "test_acc/eval.mode-eval"}
    _, rec, _ = hw4_fit(
        RECIPE_EVAL, hw4_files, tmp_path / "no-test", "train.epochs=1", alternatives=alternatives, evaluate_test=False
    )
    assert {k for k in rec.epochs[0][1] if "/" in k} == {"val_loss/eval.mode-eval", "val_acc/eval.mode-eval"}


def test_train_mode_evaluation_and_its_alternatives_repeat_and_resume_exactly(hw4_runs, hw4_files, tmp_path):
    weights, rec, result = hw4_runs["recipe"]
    alternatives = [*RECIPE_ALTERNATIVES, ("same", RECIPE_EVAL)]
    again_weights, again, _ = hw4_fit(RECIPE_EVAL, hw4_files, tmp_path / "again", alternatives=alternatives)
    assert_same_weights(again_weights, weights)
    assert [without_time(m) for _, m in again.epochs] == [without_time(m) for _, m in rec.epochs]

    hw4_fit(RECIPE_EVAL, hw4_files, tmp_path / "resumed", alternatives=alternatives, max_epochs=1)
    resumed_weights, resumed, resumed_result = hw4_fit(
        RECIPE_EVAL, hw4_files, tmp_path / "resumed", alternatives=alternatives
    )
    assert [e for e, _ in resumed.epochs] == [2]
    assert_same_weights(resumed_weights, weights)
    assert without_time(resumed.epochs[0][1]) == without_time(rec.epochs[1][1])
    assert without_time(resumed_result.last_metrics) == without_time(result.last_metrics)


class Passes(nn.Module):
    """Records how each forward runs: on the warm-up's zeros or on images, in train or eval mode,
    with gradients or not, and the batch size."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add((not x.any().item(), self.training, torch.is_grad_enabled(), len(x)))
        return self.model(x)


def test_the_compile_warm_up_runs_every_pass_the_epochs_run(hw4_files, tmp_path, monkeypatch):
    """Each (mode, gradients or not, batch size) is a graph of its own to torch.compile: the
    warm-up goes through every one the epochs use, alternatives included, so that none is
    compiled inside a timed epoch. Here torch.compile leaves the model as it is."""
    monkeypatch.setattr(torch, "compile", lambda model: model)
    cfg = hw4_cfg(RECIPE_EVAL, "train.epochs=1", "train.compile=true")
    model, bundle = fresh(cfg, hw4_files)
    passes = Passes(model)
    engine.fit(passes, bundle, cfg, checkpoint_dir=tmp_path, alternatives=RECIPE_ALTERNATIVES[:1])
    warm_up = {p[1:] for p in passes.seen if p[0]}
    epochs = {p[1:] for p in passes.seen if not p[0]}
    # Training (with its last, smaller batch), the re-measure pass in train mode, validation and
    # test in train mode and in the alternative's eval mode.
    last = bundle.train.num_images % 32
    assert last and bundle.val.num_images == 50 and bundle.test.num_images == 248  # one batch each
    assert epochs == {
        (True, True, 32),
        (True, True, last),
        (True, False, 32),
        (True, False, last),
        (True, False, 50),
        (True, False, 248),
        (False, False, 50),
        (False, False, 248),
    }
    assert epochs <= warm_up


def test_the_compile_warm_up_leaves_the_random_numbers_training_draws(hw4_files, tmp_path, monkeypatch):
    """Warm-up runs dropout on zeros: a compiled run (compile as the identity here) draws the same
    masks as an uncompiled one, and leaves the generator where the uncompiled run leaves it."""
    monkeypatch.setattr(torch, "compile", lambda model: model)
    runs = []
    for i, extra in enumerate(([], ["train.compile=true"])):
        cfg = hw4_cfg(RECIPE_EVAL, "train.epochs=1", *extra)
        model, bundle = fresh(cfg, hw4_files)
        rec = Recorder()
        engine.fit(model, bundle, cfg, checkpoint_dir=tmp_path / str(i), callbacks=[rec])
        runs.append(
            (
                {k: v for k, v in rec.epochs[0][1].items() if k not in TIME_METRICS and k != "compile_time_s"},
                torch.get_rng_state(),
            )
        )
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
