"""Fault injection: a smoke run killed with SIGKILL at random moments and resumed each time ends
with the same weights and metrics as an uninterrupted run, and logs no metric step twice."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from bench import checkpoint

from conftest import TINY_SETS

EPOCHS = 16
ARGS = ["run", "resnetb-cifar10", "--profile", "smoke", "--epochs", str(EPOCHS), "--set", "train.checkpoint_every=1",
        "--set", "train.checkpoint_min_interval_s=0",
        "--set", "train.log_every_steps=7", *[a for s in TINY_SETS for a in ("--set", s)]]
TIME_METRICS = {"epoch_time_s", "train_time_s", "images_per_s"}  # wall-clock: differ run to run
KILLS = 5


def start(cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench", *ARGS], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


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


def final_state(cwd: Path) -> dict[str, torch.Tensor]:
    [last] = (cwd / "checkpoints").glob("resnetb-cifar10/*/last.pt")
    state = checkpoint.load(last)
    assert state["epoch"] == EPOCHS
    return state["model"]


def histories(cwd: Path) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("resnetb-cifar10").experiment_id])
    assert run.info.status == "FINISHED"
    keys = [k for k in run.data.metrics if k not in TIME_METRICS]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in keys}


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    """As conftest's subprocess_env, for the whole module."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "BENCH_EXPERIMENTS", "BENCH_OPTUNA_STORAGE")}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    cwd = tmp_path_factory.mktemp("uninterrupted")
    startup, per_epoch = timed_run(cwd, env)
    return {"cwd": cwd, "startup": startup, "per_epoch": per_epoch}


def test_sigkill_at_random_moments_then_resume_ends_bit_identical(reference, tmp_path, env):
    rng = random.Random(2024)
    kills, moments = 0, []
    while kills < KILLS:
        proc = start(tmp_path, env)
        # Anywhere from half-way through start-up to three epochs into training: imports, data,
        # the store, training steps, checkpoint writes and MLflow calls all get hit.
        moment = rng.uniform(reference["startup"] / 2, reference["startup"] + 3 * reference["per_epoch"])
        try:
            proc.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            moments.append((round(moment, 2), checkpointed_epoch(tmp_path)))
        else:
            pytest.fail(f"the run finished before kill {kills + 1} (at {moment:.1f} s); give it more epochs")
    # The kills landed in training, not only in start-up: the run got further between them.
    assert len({epoch for _, epoch in moments}) >= 3, moments
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
