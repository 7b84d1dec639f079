"""Fault injection: a smoke run killed with SIGKILL at random moments, or stopped by SIGTERM and
SIGINT, and resumed each time ends with the same weights and metrics as an uninterrupted run, and
logs every metric step exactly once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_SETS
from mlflow.tracking import MlflowClient

from bench.engine import checkpoint

pytestmark = pytest.mark.slow  # servers, processes or kills: left out of the fast lane

EPOCHS = 16
ARGS = [
    "run",
    "resnetb-cifar10",
    "--profile",
    "smoke",
    "--epochs",
    str(EPOCHS),
    "--set",
    "train.checkpoint_every=1",
    "--set",
    "train.checkpoint_min_interval_s=0",
    "--set",
    "train.log_every_steps=7",
    *[a for s in TINY_SETS for a in ("--set", s)],
]
TIME_METRICS = {"epoch_time_s", "train_time_s", "images_per_s", "peak_memory_mb"}  # measured: differ run to run
KILLS = 5


def _sigint_as_in_a_terminal() -> None:
    # A command in the foreground of a terminal gets Ctrl-C's SIGINT; a test run started as a
    # background job of a non-interactive shell (as CI may be) hands its children SIGINT ignored.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(cwd: Path, env: dict[str, str], args: list[str] = ARGS) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bench", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_as_in_a_terminal,
    )


def timed_run(cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """An uninterrupted run: (seconds to its first epoch line, seconds per epoch after it)."""
    started = time.perf_counter()
    proc = start(cwd, env)
    first = None
    for line in proc.stderr:
        if first is None and ": epoch 1/" in line:
            first = time.perf_counter() - started
    assert proc.wait() == 0
    total = time.perf_counter() - started
    assert first is not None
    return first, (total - first) / (EPOCHS - 1)


def checkpointed_epoch(cwd: Path) -> int:
    found = list((cwd / "checkpoints").glob("resnetb-cifar10/*/last.pt"))
    return checkpoint.load(found[0])["epoch"] if found else 0


def final_state(cwd: Path, epochs: int = EPOCHS) -> dict[str, torch.Tensor]:
    [last] = (cwd / "checkpoints").glob("resnetb-cifar10/*/last.pt")
    state = checkpoint.load(last)
    assert state["epoch"] == epochs
    return state["model"]


def the_run(cwd: Path):
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("resnetb-cifar10").experiment_id])
    return run


def histories(cwd: Path) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    run = the_run(cwd)
    assert run.info.status == "FINISHED"
    keys = [k for k in run.data.metrics if k not in TIME_METRICS and not k.startswith("system/")]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in keys}


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    """As conftest's subprocess_env, for the whole module."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "BENCH_EXPERIMENTS", "BENCH_OPTUNA_STORAGE")
    }
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    cwd = tmp_path_factory.mktemp("uninterrupted")
    startup, per_epoch = timed_run(cwd, env)
    return {"cwd": cwd, "startup": startup, "per_epoch": per_epoch}


def kill_at(proc: subprocess.Popen, moment: float, cap: str, after: str | None = None) -> str | None:
    """SIGKILL `proc` `moment` seconds after it starts (or after it prints `after`), or at once when
    it prints `cap`, whichever comes first. None once killed; how it ended when it exited by itself
    before either."""
    capped, begun = threading.Event(), threading.Event()
    tail: list[str] = []
    if after is None:
        begun.set()

    def read() -> None:  # also drains stderr, which would block a chatty run once the pipe is full
        for line in proc.stderr:
            tail[:] = (tail + [line])[-15:]
            if after is not None and after in line:
                begun.set()
            if cap in line:
                capped.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while not begun.is_set() and not capped.is_set() and proc.poll() is None:
        begun.wait(0.01)
    deadline = time.monotonic() + moment
    while not capped.is_set() and proc.poll() is None and time.monotonic() < deadline:
        capped.wait(0.01)
    if proc.poll() is not None:
        reader.join()
        return f"exit {proc.returncode}:\n" + "".join(tail)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join()
    return None


def test_sigkill_at_random_moments_then_resume_ends_bit_identical(reference, tmp_path, env):
    rng = random.Random(2024)
    kills, moments = 0, []
    while kills < KILLS:
        resumed = checkpointed_epoch(tmp_path)
        proc = start(tmp_path, env)
        # Anywhere from half-way through start-up to three epochs into training: imports, data,
        # the store, training steps, checkpoint writes and MLflow calls all get hit. The reference's
        # start-up is a cold one and later ones can be much quicker, so a kill comes no later than
        # three epochs past where the run resumed: five kills leave epochs for the last run to train.
        moment = rng.uniform(reference["startup"] / 2, reference["startup"] + 3 * reference["per_epoch"])
        after = None
        if kills % 2:
            # Every other kill lands in training, after the checkpoint of the epoch after the one
            # resumed from is written (once the next epoch is reported): whatever the machine's
            # load does to the start-up's length, the run gets further between the kills.
            moment, after = rng.uniform(0, reference["per_epoch"]), f": epoch {resumed + 2}/{EPOCHS}"
        ended = kill_at(proc, moment, cap=f": epoch {resumed + 3}/{EPOCHS}", after=after)
        if ended is not None:
            pytest.fail(
                f"the run ended before kill {kills + 1} (at {moment:.1f} s, resumed after epoch {resumed}), {ended}"
            )
        kills += 1
        moments.append((round(moment, 2), after or "start", checkpointed_epoch(tmp_path)))
    # The kills landed in training, not only in start-up: the run got further between them.
    assert len({epoch for *_, epoch in moments}) >= 3, moments
    proc = start(tmp_path, env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err

    want, got = final_state(reference["cwd"]), final_state(tmp_path)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), f"weights differ after kills at (s, epoch) {moments}"
    want_metrics, got_metrics = histories(reference["cwd"]), histories(tmp_path)
    assert got_metrics.keys() == want_metrics.keys()
    for key, values in got_metrics.items():
        logged = [step for step, _ in values]
        assert len(logged) == len(set(logged)), f"{key}: a step logged twice after kills at (s, epoch) {moments}"
        assert values == want_metrics[key], key


# Checkpoints as the reported recipes take them: every few epochs, not every one. SIGKILL before the
# first checkpoint, then SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) between two.
STOP_EPOCHS = 9
STOP_ARGS = [
    "run",
    "resnetb-cifar10",
    "--profile",
    "smoke",
    "--epochs",
    str(STOP_EPOCHS),
    "--set",
    "train.checkpoint_every=4",
    "--set",
    "train.checkpoint_min_interval_s=0",
    "--set",
    "train.log_every_steps=7",
    *[a for s in TINY_SETS for a in ("--set", s)],
]


def stop_after_epoch(cwd: Path, env: dict[str, str], epoch: int, sig: int) -> tuple[int, str]:
    """Start the run, send `sig` as soon as it reports `epoch` done; its exit code and stderr."""
    proc = start(cwd, env, STOP_ARGS)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if f": epoch {epoch}/{STOP_EPOCHS}" in line:
            proc.send_signal(sig)
            break
    else:
        pytest.fail("".join(lines))
    rest = proc.stderr.read()
    return proc.wait(), "".join(lines) + rest


def test_sigkill_before_the_first_checkpoint_then_sigterm_and_sigint_log_every_step_once(tmp_path_factory, env):
    reference = tmp_path_factory.mktemp("uninterrupted")
    proc = start(reference, env, STOP_ARGS)
    assert proc.wait() == 0
    cwd = tmp_path_factory.mktemp("stopped")

    # Killed in its third epoch: no checkpoint yet, two epochs of metrics in the store.
    code, err = stop_after_epoch(cwd, env, 2, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert checkpointed_epoch(cwd) == 0

    # Preempted: it trains from epoch 1 again (nothing to resume from), and SIGTERM in its fourth
    # epoch keeps the third (or the second, had it struck before the third was copied): a
    # checkpoint although none was due, the run KILLED, the exit code 128 + 15.
    code, err = stop_after_epoch(cwd, env, 3, signal.SIGTERM)
    assert code == 143, err
    assert "interrupted (SIGTERM)" in err
    assert checkpointed_epoch(cwd) in (2, 3)
    run = the_run(cwd)
    assert run.info.status == "KILLED"
    assert run.data.tags["bench.interrupted_by"] == "SIGTERM"

    # Ctrl-C in the seventh epoch: epoch 4 was checkpointed as due, 5 and 6 were not; 6 is kept.
    code, err = stop_after_epoch(cwd, env, 6, signal.SIGINT)
    assert code == 130, err
    assert checkpointed_epoch(cwd) in (5, 6)
    assert the_run(cwd).info.status == "KILLED"

    proc = start(cwd, env, STOP_ARGS)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err

    want, got = final_state(reference, STOP_EPOCHS), final_state(cwd, STOP_EPOCHS)
    assert all(torch.equal(want[k], got[k]) for k in want)
    want_metrics, got_metrics = histories(reference), histories(cwd)
    assert got_metrics.keys() == want_metrics.keys()
    assert [s for s, _ in got_metrics["train_loss"]] == list(range(1, STOP_EPOCHS + 1))
    for key, values in got_metrics.items():
        assert values == want_metrics[key], key
