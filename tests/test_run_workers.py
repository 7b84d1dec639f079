"""`bench run --workers K`: K processes share a suite's cells on one machine, with the skipping,
resuming, exit codes and summary of one process; Ctrl-C and SIGTERM stop every worker resumably."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from conftest import TINY_SETS
from mlflow.tracking import MlflowClient

from bench import cli, suite, workers

TINY_ARGS = [arg for s in TINY_SETS for arg in ("--set", s)]
EXPERIMENTS = ("bottleneck-cifar10", "resnetb-cifar10")
SUITE = ["run", "--suite", "cifar10", "--profile", "smoke", "--seeds", "2", *TINY_ARGS]  # 4 cells
CELLS = Counter({(name, seed): 1 for name in EXPERIMENTS for seed in ("0", "1")})
MEASURED = {"epoch_time_s", "train_time_s", "images_per_s", "peak_memory_mb"}  # differ run to run


def _sigint_as_in_a_terminal() -> None:
    # A test run started as a background job of a non-interactive shell hands its children SIGINT ignored.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def bench(args: list[str], cwd: Path, env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bench", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_as_in_a_terminal,
        **kw,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def cell_runs(cwd: Path) -> dict[tuple[str, str], list]:
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    runs: dict[tuple[str, str], list] = {}
    for name in EXPERIMENTS:
        experiment = client.get_experiment_by_name(name)
        for r in client.search_runs([experiment.experiment_id]) if experiment else []:
            runs.setdefault((name, r.data.tags["bench.seed"]), []).append(r)
    return runs


def histories(cwd: Path, run) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    keys = [k for k in run.data.metrics if k not in MEASURED and not k.startswith("system/")]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in keys}


def check_every_cell_once(cwd: Path, epochs: int) -> None:
    """One FINISHED run per cell, each epoch's metrics in it once."""
    runs = cell_runs(cwd)
    assert Counter({cell: len(found) for cell, found in runs.items()}) == CELLS
    for [run] in runs.values():
        assert run.info.status == "FINISHED" and run.data.tags["bench.epochs_done"] == str(epochs)
        assert [step for step, _ in histories(cwd, run)["train_loss"]] == list(range(1, epochs + 1))


def statuses(out: str) -> Counter:
    return Counter(re.findall(r"^\S+/smoke/seed\d\s+(\w+(?: run)?)", out, re.M))


@pytest.mark.slow
def test_two_workers_train_every_cell_once_as_one_process_does(tmp_path, subprocess_env):
    args = [*SUITE, "--epochs", "2"]
    alone = tmp_path / "alone"
    alone.mkdir()
    # Each of 2 workers has half the cores; one process with as many threads computes the same numbers.
    threads = str(workers.thread_share(2))
    code, _, err = finish(
        bench(args, alone, {**subprocess_env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    )
    assert code == 0, err[-3000:]

    # The workers take their share whatever the environment says: with 7 threads each, the numbers would differ.
    code, out, err = finish(
        bench([*args, "--workers", "2"], tmp_path, {**subprocess_env, "OMP_NUM_THREADS": "7", "MKL_NUM_THREADS": "7"})
    )
    assert code == 0, err[-3000:]
    assert statuses(out) == Counter({"finished": 4})
    assert {
        re.search(r"\((worker \d), cpu\): epoch", line).group(1) for line in err.splitlines() if ": epoch " in line
    } == {"worker 1", "worker 2"}  # both trained, one line per event
    check_every_cell_once(tmp_path, 2)
    ours, theirs = cell_runs(tmp_path), cell_runs(alone)
    for cell, [run] in ours.items():
        assert histories(tmp_path, run) == histories(alone, theirs[cell][0]), cell
        assert run.data.tags["bench.threads"] == theirs[cell][0].data.tags["bench.threads"] == threads, cell

    code, out, err = finish(bench([*args, "--workers", "2"], tmp_path, subprocess_env))
    assert code == 0, err[-3000:]
    assert statuses(out) == Counter({"skipped": 4})


EPOCHS = 10  # long enough that the first two cells are still training at the third stop, each stop adding a start-up
STOPPABLE = [
    *SUITE,
    "--epochs",
    str(EPOCHS),
    "--set",
    "train.checkpoint_every=1",
    "--set",
    "train.checkpoint_min_interval_s=0",
    "--workers",
    "2",
]


def start_training(cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, list[str], list[int]]:
    """Start the 2 workers, return once both report a finished epoch: the command, its stderr so
    far (read on by a thread) and the pids of the workers."""
    proc = bench(STOPPABLE, cwd, env, start_new_session=True)
    lines: list[str] = []
    both = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if {w for w in ("worker 1", "worker 2") for seen in lines if f"({w}, cpu): epoch " in seen} == {
                "worker 1",
                "worker 2",
            }:
                both.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 300
    while not both.wait(0.1):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
    workers = [p.pid for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2
    return proc, lines, workers


def stopped(proc: subprocess.Popen, lines: list[str], processes: list[int]) -> tuple[int, str]:
    code = proc.wait(timeout=120)
    for pid in processes:  # nothing left behind
        deadline = time.monotonic() + 30
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"process {pid} still runs"
            time.sleep(0.1)
    time.sleep(0.2)  # the reader thread's last lines
    return code, "".join(lines)


def killed_runs(cwd: Path, by: str) -> None:
    """The two cells that were training ended KILLED by `by`; no run is left RUNNING."""
    runs = [r for found in cell_runs(cwd).values() for r in found]
    assert [r.data.tags.get("bench.interrupted_by") for r in runs if r.info.status == "KILLED"] == [by] * 2
    assert all(r.info.status in ("KILLED", "FINISHED") for r in runs)


@pytest.mark.slow
def test_stops_end_every_worker_and_the_same_command_resumes_every_cell_once(tmp_path, subprocess_env):
    for sig, to_group, code, name in (
        (signal.SIGINT, True, 130, "SIGINT"),  # Ctrl-C in a terminal: every process gets it
        (signal.SIGTERM, False, 143, "SIGTERM"),  # a scheduler's preemption of the command: it tells its workers
        # The command killed (out of memory, a scheduler's hard stop) tells nobody: each worker sees
        # its parent gone and stops its cell as on SIGTERM, rather than train on with the lease held.
        (signal.SIGKILL, False, -signal.SIGKILL, "SIGTERM"),
    ):
        proc, lines, workers = start_training(tmp_path, subprocess_env)
        if to_group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        got, err = stopped(proc, lines, [proc.pid, *workers])
        assert got == code, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        if sig != signal.SIGKILL:
            assert f"interrupted ({name})" in err, err[-3000:]
        killed_runs(tmp_path, name)

    again, out, err = finish(bench(STOPPABLE, tmp_path, subprocess_env))
    assert again == 0, err[-3000:]
    assert len(re.findall(r"resuming after epoch \d", err)) == 2
    assert statuses(out) == Counter({"finished": 4})
    check_every_cell_once(tmp_path, EPOCHS)


@pytest.mark.slow
def test_a_killed_worker_fails_its_cell_the_others_finish_and_it_resumes(tmp_path, subprocess_env):
    proc, lines, workers = start_training(tmp_path, subprocess_env)
    os.kill(workers[0], signal.SIGKILL)
    code = proc.wait(timeout=600)
    time.sleep(0.2)
    out, err = proc.stdout.read(), "".join(lines)
    assert code == 1, err[-3000:]
    assert statuses(out) == Counter({"finished": 3, "failed": 1})
    assert re.search(r"\(worker \d, cpu\): failed in \d+ s \(worker \d exited with code -9\)", err), err[-3000:]

    again, out, err = finish(
        bench(STOPPABLE, tmp_path, subprocess_env)
    )  # its lease is free at once: the process is gone
    assert again == 0, err[-3000:]
    assert statuses(out) == Counter({"skipped": 3, "finished": 1})
    check_every_cell_once(tmp_path, EPOCHS)


@pytest.mark.slow
def test_a_cell_that_fails_in_a_worker_fails_alone(tmp_path, subprocess_env):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "bottleneck-cifar10").write_text("not a directory")  # its cells' leases cannot be made
    code, out, err = finish(bench([*SUITE, "--epochs", "1", "--workers", "2"], tmp_path, subprocess_env))
    assert code == 1, err[-3000:]
    assert re.findall(r"^(\S+)/smoke/seed\d\s+(\w+)", out, re.M) == [
        ("bottleneck-cifar10", "failed"),
        ("bottleneck-cifar10", "failed"),
        ("resnetb-cifar10", "finished"),
        ("resnetb-cifar10", "finished"),
    ]
    assert "2 of 4 cells did not finish" in err


def test_workers_are_counted_and_shown_before_anything_runs(in_tmp, capsys):
    assert cli.main([*SUITE, "--workers", "0"]) == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err
    assert (
        cli.main([*SUITE, "--device", "cpu", "--workers", "9", "--dry-run"]) == 0
    )  # more workers than cells: one per cell
    assert (
        "4 workers would start: worker 1 on cpu, worker 2 on cpu, worker 3 on cpu, worker 4 on cpu"
        in capsys.readouterr().out
    )
    assert cli.main([*SUITE, "--device", "cpu", "--workers", "2", "--shard", "2/2", "--dry-run"]) == 0
    assert "2 workers would start: worker 1 on cpu, worker 2 on cpu" in capsys.readouterr().out


def test_the_dispatch_puts_busy_cells_off_and_stops_at_an_outage(in_tmp, monkeypatch, capsys):
    cells = suite.plan(["resnetb-cifar10"], profile="smoke", seeds=4)
    clock = [100.0]
    monkeypatch.setattr(suite.dispatch.time, "monotonic", lambda: clock[0])
    d = suite.Dispatch(cells, bar=False)

    def outcome(i: int, status: str) -> suite.CellOutcome:
        return suite.CellOutcome(cells[i], status, 0, None, None, 0.0, None)

    assert [d.take("worker 1")[0], d.take("worker 2")[0]] == [0, 1]
    d.record(0, d.label(0), outcome(0, "busy"))  # another process trains it
    assert [d.take()[0], d.take()[0]] == [2, 3]  # the cells not tried yet come first
    assert d.take() is None and d.wait_s() == suite.WAIT_S  # then the busy one, once it is due
    clock[0] += suite.WAIT_S
    assert d.take()[0] == 0
    d.record(0, d.label(0), outcome(0, "skipped"))  # the other process finished it
    d.record(1, d.label(1), outcome(1, "finished"))
    d.record(2, d.label(2), outcome(2, "busy"))
    d.unreachable(3, d.label(3), "tracking store stayed away", in_tmp / "checkpoints")
    assert d.over and d.take() is None
    assert [o.status for o in d.results()] == ["skipped", "finished", suite.NOT_RUN, suite.UNREACHABLE]
    err = capsys.readouterr().err
    assert err.count("starting") == 4 and err.count("coming back to it") == 2
    assert "[1/4] resnetb-cifar10/smoke/seed0 (worker 1): starting" in err


def test_a_cell_running_elsewhere_when_the_store_went_away_is_not_run_if_it_comes_back_busy(in_tmp):
    cells = suite.plan(["resnetb-cifar10"], profile="smoke", seeds=2)
    d = suite.Dispatch(cells, bar=False)
    d.take(), d.take()
    d.unreachable(0, d.label(0), "tracking store stayed away", in_tmp / "checkpoints")
    assert not d.over  # the other worker's cell still runs
    d.record(1, d.label(1), suite.CellOutcome(cells[1], "busy", 0, None, None, 0.0, None))
    assert d.over and [o.status for o in d.results()] == [suite.UNREACHABLE, suite.NOT_RUN]


@pytest.mark.slow
def test_a_stop_that_lands_in_a_finalizer_comes_again(subprocess_env):
    # Python drops an exception raised while a weakref callback runs (as a worker's stop once was,
    # and the worker trained on): the worker's hook sends the signal again.
    script = """
import os, signal, sys, time, weakref
from bench import workers
signal.signal(signal.SIGINT, workers._stop_once)
sys.unraisablehook = workers._stop_again_if_lost
class Box: pass
box = Box()
ref = weakref.ref(box, lambda _: os.kill(os.getpid(), signal.SIGINT))
try:
    del box
    time.sleep(5)
    print("trained on")
except KeyboardInterrupt:
    os.kill(os.getpid(), signal.SIGINT)  # a second signal: ignored
    time.sleep(0.2)
    print("stopped once")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "stopped once", done.stderr


@pytest.mark.slow
def test_a_worker_whose_stop_was_swallowed_ends_after_its_outcome(tmp_path, subprocess_env):
    # A library may catch a stop and return as if nothing happened (the cell ends "failed"): the
    # worker sends that outcome and exits with the stop's code instead of waiting for a next cell
    # the stopping parent never sends (it would be killed after 30 s).
    script = f"""
import signal, sys, threading
from multiprocessing import Pipe
from bench import cli, suite
from bench.suite import workers as run_workers

def attempt(cell, **kw):
    try:
        signal.raise_signal(signal.SIGTERM)  # the worker's handler raises the stop in here
    except KeyboardInterrupt:
        pass  # and a library swallows it
    return suite.CellOutcome(cell, "failed", 0, None, None, 0.0, None)

suite.attempt = attempt
ours, theirs = Pipe()
args = cli._parser().parse_args(["run", "--suite", "cifar10", "--tracking-uri", "sqlite:///{tmp_path}/mlflow.db"])
cells = suite.plan(["bottleneck-cifar10"], profile="smoke", seeds=1)
threading.Thread(target=lambda: ours.send((0, "[1/1]")), daemon=True).start()
try:
    run_workers.work(1, "cpu", cells, args, theirs)
except SystemExit as exc:
    print("exit", exc.code, [m[0] for m in iter(lambda: ours.poll(1) and ours.recv(), False)])
"""
    done = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env, capture_output=True, text=True, timeout=90
    )
    assert done.stdout.strip() == "exit 143 ['ready', 'outcome']", done.stderr[-3000:]
