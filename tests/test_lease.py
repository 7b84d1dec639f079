"""One trainer per cell: the lease in the tracking store, the file lock, and two `bench run`
processes on one suite and one store that train every cell exactly once."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import TINY_SETS
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from bench import results, suite
from bench.suite import claims as lease
from bench.tracking import Tracker


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A new SQLite store, made once: creating MLflow's tables takes seconds, copying them none."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    Tracker(f"sqlite:///{path}")
    return path


@pytest.fixture
def tracker(tmp_path, empty_store):
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")


def claims(tracker, key="cell", view=ViewType.ALL):
    """The lease runs of the cell in the leases experiment, deleted ones included."""
    exp_id = tracker.experiment_id(lease.LEASES_EXPERIMENT)
    found = tracker.client.search_runs([exp_id], f"tags.`{lease.CELL}` = '{key}'", run_view_type=view)
    return [(r.data.tags[lease.OWNER], r.info.status, r.info.lifecycle_stage) for r in found]


def live_owners(tracker, key="cell"):
    return [owner for owner, status, stage in claims(tracker, key) if status == "RUNNING" and stage == "active"]


def store_contents(tracker) -> list[tuple]:
    """Every experiment and every run, deleted ones included, with their states and tags: any
    write of experiments, runs or tags shows as a difference."""
    client = tracker.client
    experiments = client.search_experiments(view_type=ViewType.ALL)
    return sorted(
        [(e.name, e.lifecycle_stage, e.last_update_time, tuple(sorted(e.tags.items()))) for e in experiments]
        + [
            (
                e.name,
                r.info.run_id,
                r.info.status,
                r.info.lifecycle_stage,
                r.info.end_time,
                tuple(sorted(r.data.tags.items())),
            )
            for e in experiments
            for r in client.search_runs([e.experiment_id], run_view_type=ViewType.ALL)
        ]
    )


def test_a_held_cell_is_refused_until_released(tracker):
    first, second = lease.Lease(tracker, "cell"), lease.Lease(tracker, "cell")
    assert first.acquire()
    before = store_contents(tracker)
    assert not second.acquire()
    assert second.holder == first.owner
    assert store_contents(tracker) == before  # the refused contender wrote no claim
    assert lease.Lease(tracker, "other").acquire()  # another cell is free
    first.release()
    assert claims(tracker) == [(first.owner, "FINISHED", "active")]  # kept as a record, not deleted
    assert second.acquire()
    second.release()


def test_a_process_waiting_for_a_cell_held_on_another_machine_writes_nothing(tracker, tmp_path):
    """The suite looks at a busy cell again every few seconds: each look only reads the store."""
    cell = suite.plan(["bottleneck-cifar10"], profile="smoke", seeds=1, sets=TINY_SETS, epochs=1)[0]
    tracker.experiment_id(cell.experiment)  # made by the suite before it runs any cell
    elsewhere = lease.Lease(tracker, cell.key, heartbeat_s=3600)  # another machine's trainer, between beats
    assert elsewhere.acquire()
    before = store_contents(tracker)
    for _ in range(5):
        outcome = suite.run_cell(
            cell,
            tracker=tracker,
            device=torch.device("cpu"),
            data_dir=None,
            checkpoint_root=tmp_path / "ck",
            label="waiting",
        )
        assert outcome.status == "busy"
    assert store_contents(tracker) == before
    elsewhere.release()


def test_leases_stay_out_of_the_experiments_and_leave_no_deleted_runs(tracker, tmp_path):
    cell = suite.plan(["bottleneck-cifar10"], profile="smoke", seeds=1, sets=TINY_SETS, epochs=1)[0]
    exp_id = tracker.experiment_id(cell.experiment)
    with lease.hold(tmp_path / "held", tracker, cell.key) as held:
        assert held
        assert tracker.client.search_runs([exp_id], run_view_type=ViewType.ALL) == []
        assert results.load(tracker.uri, [cell.experiment]).runs.empty
    [outcome] = suite.run_cells(
        [cell], tracker=tracker, device=torch.device("cpu"), data_dir=None, checkpoint_root=tmp_path / "ck"
    )
    assert outcome.status == "finished"
    runs = tracker.client.search_runs([exp_id], run_view_type=ViewType.ALL)
    assert [r.info.run_id for r in runs] == [outcome.run_id]  # the cell's run, and no lease, live or deleted
    assert results.load(tracker.uri, [cell.experiment]).runs.kind.tolist() == ["cell"]
    assert [(status, stage) for _, status, stage in claims(tracker, cell.key)] == [("FINISHED", "active")] * 2


def test_a_stale_claim_is_taken_over_and_a_live_one_is_not(tracker):
    dead = lease.Lease(tracker, "cell", heartbeat_s=3600)  # never beats again: a machine that went away
    assert dead.acquire()
    tracker.set_tags(dead.run_id, {lease.HEARTBEAT: str(time.time() - 2 * lease.stale_after(tracker.limit))})
    live = lease.Lease(tracker, "cell2")
    assert live.acquire()
    # Old, but seen for the first time: its holder may have been cut off from the store and beat
    # again once it is back; it is taken over once it has stayed the same for confirm_s here.
    assert not lease.Lease(tracker, "cell", confirm_s=0.5).acquire()
    time.sleep(0.6)
    taker = lease.Lease(tracker, "cell", confirm_s=0.5)
    assert taker.acquire()
    assert sorted(claims(tracker)) == sorted([(dead.owner, "KILLED", "active"), (taker.owner, "RUNNING", "active")])
    assert not lease.Lease(tracker, "cell2").acquire()
    assert live_owners(tracker, "cell2") == [live.owner]
    live.release()
    taker.release()


def test_a_holder_that_beats_again_after_an_outage_is_not_taken_over(tracker):
    cut_off = lease.Lease(tracker, "cell", heartbeat_s=3600)
    assert cut_off.acquire()
    tracker.set_tags(cut_off.run_id, {lease.HEARTBEAT: str(time.time() - 2 * lease.stale_after(tracker.limit))})
    assert not lease.Lease(tracker, "cell", confirm_s=0.5).acquire()
    tracker.set_tags(cut_off.run_id, {lease.HEARTBEAT: str(time.time())})  # the store is back: it beats
    time.sleep(0.6)
    assert not lease.Lease(tracker, "cell", confirm_s=0.5).acquire()
    assert live_owners(tracker, "cell") == [cut_off.owner]
    cut_off.release()


def test_a_holder_with_a_longer_outage_limit_is_given_its_own(tracker):
    patient = lease.Lease(tracker, "cell", heartbeat_s=3600)
    assert patient.acquire()
    old = time.time() - 2 * lease.stale_after(tracker.limit)
    tracker.set_tags(
        patient.run_id, {lease.HEARTBEAT: str(old), lease.LIMIT: str(4 * lease.stale_after(tracker.limit))}
    )
    assert not lease.Lease(tracker, "cell", confirm_s=0).acquire()  # old by this process's limit, not by its holder's
    tracker.set_tags(patient.run_id, {lease.LIMIT: f"{tracker.limit:g}"})
    assert lease.Lease(tracker, "cell", confirm_s=0).acquire()


def test_the_claim_of_a_killed_process_on_this_machine_is_taken_over_at_once(tracker):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead = lease.Lease(tracker, "cell")
    dead.owner = f"{socket.gethostname()}:{int(gone.stdout)}:killed"
    assert dead.acquire()
    dead._stop.set()  # as if SIGKILLed: no more heartbeats, the claim stays in the store
    assert lease.Lease(tracker, "cell").acquire()
    # A live process of this machine (this one) keeps its claim.
    alive = lease.Lease(tracker, "cell2")
    assert alive.acquire()
    assert not lease.Lease(tracker, "cell2").acquire()
    alive.release()


def test_contenders_that_claim_at_the_same_moment_elect_exactly_one(tracker):
    for round_ in range(3):
        key = f"race{round_}"
        contenders = [lease.Lease(tracker, key) for _ in range(4)]
        start, won = threading.Barrier(len(contenders)), []

        def contend(c, start=start, won=won):
            start.wait()
            if c.acquire():
                won.append(c)

        threads = [threading.Thread(target=contend, args=(c,)) for c in contenders]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, [c.owner for c in won]
        assert live_owners(tracker, key) == [won[0].owner]
        won[0].release()


def test_the_file_lock_keeps_a_second_holder_out_on_one_machine(tracker, tmp_path):
    with lease.hold(tmp_path / "ck", tracker, "a") as first:
        assert first
        with lease.hold(tmp_path / "ck", tracker, "b") as second:  # another key: only the file lock stops it
            assert not second
    with lease.hold(tmp_path / "ck", tracker, "a") as again:
        assert again


@pytest.mark.slow
def test_two_processes_on_one_suite_train_every_cell_once(tmp_path, subprocess_env):
    """Separate checkpoint directories, as on two machines: only the lease in MLflow keeps them apart."""
    args = ["run", "--suite", "cifar10", "--profile", "smoke", "--seeds", "2", "--epochs", "1", "--device", "cpu"]
    args += [a for s in TINY_SETS for a in ("--set", s)]
    # Both start on a store that does not exist yet: creating its tables is serialized too.
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench", *args, "--checkpoint-dir", f"ck{i}"],
            cwd=tmp_path,
            env=subprocess_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    cells = {}
    for name in ("bottleneck-cifar10", "resnetb-cifar10"):
        for run in client.search_runs([client.get_experiment_by_name(name).experiment_id], run_view_type=ViewType.ALL):
            assert run.data.tags.get(lease.KIND) != "lease", "a claim in the experiment's runs"
            key = (name, run.data.tags["bench.seed"])
            assert key not in cells, f"two runs of {key}"
            cells[key] = run
    assert sorted(cells) == [(e, s) for e in ("bottleneck-cifar10", "resnetb-cifar10") for s in ("0", "1")]
    assert all(run.info.status == "FINISHED" for run in cells.values())
    leases = client.search_runs(
        [client.get_experiment_by_name(lease.LEASES_EXPERIMENT).experiment_id], run_view_type=ViewType.ACTIVE_ONLY
    )
    assert leases and all(r.info.status == "FINISHED" for r in leases), "a claim was left behind"
    for name, seed in cells:
        trained = [i for i in range(2) if list((tmp_path / f"ck{i}" / name).glob(f"smoke-seed{seed}-*/last.pt"))]
        assert len(trained) == 1, (name, seed, trained)
    rows = [line.split()[:2] for out, _ in outputs for line in out.splitlines() if "/smoke/seed" in line]
    assert sorted(status for _, status in rows) == ["finished"] * 4 + ["skipped"] * 4


def test_an_interruption_while_claiming_leaves_no_claim_behind(tracker, monkeypatch):
    """Ctrl-C (or SIGTERM) between creating the claim and numbering it: a claim left "choosing"
    would hold up every contender until it went stale."""
    real = tracker.set_tags

    def interrupted(run_id, tags):
        if lease.CHOOSING in tags:
            raise KeyboardInterrupt
        real(run_id, tags)

    monkeypatch.setattr(tracker, "set_tags", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lease.Lease(tracker, "cell").acquire()
    monkeypatch.undo()
    assert live_owners(tracker) == []
    assert lease.Lease(tracker, "cell").acquire()  # at once, not after the stale time


def test_a_release_that_fails_does_not_replace_what_ended_the_cell(tracker, tmp_path, monkeypatch, caplog):
    """The store is gone when the cell ends (a cluster shutting down): the interruption, or the
    cell's own result, goes on; the claim lapses by its heartbeat."""

    def unreachable(run_id, status):
        raise ConnectionError("tracking server unreachable")

    with pytest.raises(KeyboardInterrupt):
        with lease.hold(tmp_path / "cell", tracker, "cell") as held:
            assert held
            monkeypatch.setattr(tracker, "end_run", unreachable)
            raise KeyboardInterrupt
    with lease.hold(tmp_path / "other", tracker, "other") as held:
        assert held
    assert "could not release it (tracking server unreachable)" in caplog.text
