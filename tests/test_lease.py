"""One trainer per cell: the lease in the tracking store, the file lock, and two `bench run`
processes on one suite and one store that train every cell exactly once."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from bench import lease
from bench.tracking import Tracker

from conftest import TINY_SETS


@pytest.fixture
def store(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tracker, tracker.experiment_id("leases")


def live_claims(tracker, exp_id, key="cell"):
    return tracker.tagged_runs(exp_id, {lease.KIND: "lease", lease.CELL: key})


def test_a_held_cell_is_refused_until_released(store):
    tracker, exp_id = store
    first, second = lease.Lease(tracker, exp_id, "cell"), lease.Lease(tracker, exp_id, "cell")
    assert first.acquire()
    assert not second.acquire()
    assert second.holder == first.owner
    assert [c["tags"][lease.OWNER] for c in live_claims(tracker, exp_id)] == [first.owner]  # the loser's claim is gone
    assert lease.Lease(tracker, exp_id, "other").acquire()  # another cell is free
    first.release()
    assert live_claims(tracker, exp_id) == []
    assert second.acquire()
    second.release()


def test_a_stale_claim_is_taken_over_and_a_live_one_is_not(store):
    tracker, exp_id = store
    dead = lease.Lease(tracker, exp_id, "cell", heartbeat_s=3600)  # never beats: a killed process
    assert dead.acquire()
    beating = lease.Lease(tracker, exp_id, "cell2", heartbeat_s=0.2)
    assert beating.acquire()
    time.sleep(1.2)
    assert lease.Lease(tracker, exp_id, "cell", stale_s=1.0).acquire()
    assert not lease.Lease(tracker, exp_id, "cell2", stale_s=1.0).acquire()
    beating.release()



def test_the_claim_of_a_killed_process_on_this_machine_is_taken_over_at_once(store):
    tracker, exp_id = store
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead = lease.Lease(tracker, exp_id, "cell")
    dead.owner = f"{socket.gethostname()}:{int(gone.stdout)}:killed"
    assert dead.acquire()
    dead._stop.set()  # as if SIGKILLed: no more heartbeats, the claim stays in the store
    assert lease.Lease(tracker, exp_id, "cell").acquire()
    # A live process of this machine (this one) keeps its claim.
    alive = lease.Lease(tracker, exp_id, "cell2")
    assert alive.acquire()
    assert not lease.Lease(tracker, exp_id, "cell2").acquire()
    alive.release()

def test_contenders_that_claim_at_the_same_moment_elect_exactly_one(store):
    tracker, exp_id = store
    for round_ in range(3):
        key = f"race{round_}"
        contenders = [lease.Lease(tracker, exp_id, key) for _ in range(4)]
        start, won = threading.Barrier(len(contenders)), []

        def contend(c):
            start.wait()
            if c.acquire():
                won.append(c)

        threads = [threading.Thread(target=contend, args=(c,)) for c in contenders]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, [c.owner for c in won]
        won[0].release()


def test_the_file_lock_keeps_a_second_holder_out_on_one_machine(store, tmp_path):
    tracker, exp_id = store
    with lease.hold(tmp_path / "ck", tracker, exp_id, "a") as first:
        assert first
        with lease.hold(tmp_path / "ck", tracker, exp_id, "b") as second:  # another key: only the file lock stops it
            assert not second
    with lease.hold(tmp_path / "ck", tracker, exp_id, "a") as again:
        assert again


def test_two_processes_on_one_suite_train_every_cell_once(tmp_path, subprocess_env):
    """Separate checkpoint directories, as on two machines: only the lease in MLflow keeps them apart."""
    args = ["run", "--suite", "cifar10", "--profile", "smoke", "--seeds", "2", "--epochs", "1", "--device", "cpu"]
    args += [a for s in TINY_SETS for a in ("--set", s)]
    # Both start on a store that does not exist yet: creating its tables is serialized too.
    procs = [
        subprocess.Popen([sys.executable, "-m", "bench", *args, "--checkpoint-dir", f"ck{i}"], cwd=tmp_path, env=subprocess_env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    cells = {}
    for name in ("bottleneck-cifar10", "resnetb-cifar10"):
        for run in client.search_runs([client.get_experiment_by_name(name).experiment_id]):
            assert run.data.tags.get(lease.KIND) != "lease", "a claim was left behind"
            key = (name, run.data.tags["bench.seed"])
            assert key not in cells, f"two runs of {key}"
            cells[key] = run
    assert sorted(cells) == [(e, s) for e in ("bottleneck-cifar10", "resnetb-cifar10") for s in ("0", "1")]
    assert all(run.info.status == "FINISHED" for run in cells.values())
    for (name, seed) in cells:
        trained = [i for i in range(2) if list((tmp_path / f"ck{i}" / name).glob(f"smoke-seed{seed}-*/last.pt"))]
        assert len(trained) == 1, (name, seed, trained)
    rows = [line.split()[:2] for out, _ in outputs for line in out.splitlines() if "/smoke/seed" in line]
    assert sorted(status for _, status in rows) == ["finished"] * 4 + ["skipped"] * 4
