"""Shared fixtures: tiny model overrides, a scratch working directory, a quiet environment."""

from __future__ import annotations

import os
import signal

import pytest
import torch

# The test machine has 2 cores that other jobs may share: two intra-op threads fighting over one
# free core make small convolutions 5-20x slower. One thread keeps the suite fast and steady.
torch.set_num_threads(1)

# Overrides that shrink the CIFAR-10 bottleneck models (resnetb-cifar10, bottleneck-cifar10)
# to a few thousand parameters: an epoch of the embedded subset takes about a second.
TINY_SETS = ["model.widths=[4,8,8]", "model.blocks_per_stage=1", "model.stem_width=4"]


def fit_stopped_in_a_write(fit):
    """`fit` as if SIGTERM came in a checkpoint write after its first epoch and torch.save made
    its own error of the stop while it cleaned up, as its zip writer does."""
    from bench import process

    def stopped(*args, **kwargs):
        fit(*args, max_epochs=1, **kwargs)
        try:
            raise process.Terminated()
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 54080 vs 53968")  # noqa: B904 (as torch raises it)

    return stopped


@pytest.fixture(autouse=True)
def as_in_a_terminal():
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, even where the tests were started as a
    background job (whose SIGINT is ignored); and what a test's in-process commands put in
    os.environ (the outage limit, thread counts for their workers) does not reach later tests."""
    environ, sigint = dict(os.environ), signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, sigint)
    os.environ.clear()
    os.environ.update(environ)


@pytest.fixture
def tiny_sets() -> list[str]:
    return list(TINY_SETS)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run inside tmp_path (mlflow.db, mlruns/, checkpoints/ and data/ land there), with no
    tracking URI or experiments directory inherited from the caller's environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("BENCH_EXPERIMENTS", raising=False)
    monkeypatch.delenv("BENCH_OPTUNA_STORAGE", raising=False)
    return tmp_path


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for `python -m bench` children: one thread, no inherited tracking URI."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "BENCH_EXPERIMENTS", "BENCH_OPTUNA_STORAGE")
    }
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env
