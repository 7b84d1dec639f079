"""Worker processes (bench.workers) as `bench tune --workers K` uses them: devices, CPU threads,
sampler seeds, the pool that starts and stops them."""

from __future__ import annotations

import signal
import time

import optuna
import pytest

from bench import tuning, workers
from bench.tuning import sampling


@pytest.mark.parametrize(
    "device, gpus, expected",
    [
        ("auto", 2, ["cuda:0", "cuda:1", "cuda:0"]),
        ("cuda", 3, ["cuda:0", "cuda:1", "cuda:2"]),
        ("auto", 0, ["auto", "auto", "auto"]),
        ("cpu", 2, ["cpu", "cpu", "cpu"]),
        ("cuda:1", 2, ["cuda:1", "cuda:1", "cuda:1"]),
    ],
)
def test_workers_take_the_gpus_in_turn(device, gpus, expected, monkeypatch):
    monkeypatch.setattr(workers, "visible_gpus", lambda: gpus)
    assert [workers.device_for(device, i) for i in range(3)] == expected
    assert workers.default_count(device) == (max(1, gpus) if device in ("auto", "cuda") else 1)


def test_workers_share_the_cpu_threads(monkeypatch):
    monkeypatch.setattr(workers, "usable_cores", lambda: 16)
    assert workers.thread_env(3)["OMP_NUM_THREADS"] == "5"
    assert workers.thread_env(32)["OMP_NUM_THREADS"] == "1"


def test_the_cores_shared_are_those_the_process_may_run_on(monkeypatch):
    """A container or batch job limited to 8 of a machine's 128 cores shares those 8."""
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 128)
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert workers.usable_cores() == 8
    assert workers.thread_env(4)["OMP_NUM_THREADS"] == "2"


def test_sampler_seeds_repeat_alone_and_are_fresh_for_workers_and_joiners(tmp_path):
    store = tuning.storage(f"sqlite:///{tmp_path / 'optuna.db'}", 60)
    first = sampling.sampler_seed(7, store, "s", alone=True)  # a new study
    study = optuna.create_study(study_name="s", storage=store)
    assert sampling.sampler_seed(7, store, "s", alone=True) == first  # nobody else at work: repeatable
    assert sampling.sampler_seed(7, store, "s", alone=False) is None  # a worker of --workers
    assert sampling.sampler_seed(8, store, "s", alone=True) != first
    study.optimize(lambda t: 0.0, n_trials=1)
    assert sampling.sampler_seed(7, store, "s", alone=True) not in (first, None)  # continued: new draws
    study.ask()  # a trial running in another process
    assert sampling.sampler_seed(7, store, "s", alone=True) is None  # a process that joins: its own stream


def test_a_worker_started_before_a_failed_start_is_in_the_pool_and_is_stopped():
    """The pool holds each worker as soon as it runs: a start that fails part-way (here the second
    worker's arguments cannot be sent to it) still leaves the first to be stopped, not orphaned."""
    pool = workers.Pool()
    with pytest.raises(Exception, match="pickle"):  # noqa: B017 (the pickler's own error type varies)
        pool.spawn(time.sleep, [(60,), (lambda: 0,)])
    assert len(pool.processes) == 1 and pool.processes[0].is_alive()
    started = time.monotonic()
    assert pool.stop(signal.SIGTERM) == [-signal.SIGTERM]
    assert time.monotonic() - started < workers.GRACE_S  # ended by the signal, not killed after the grace
