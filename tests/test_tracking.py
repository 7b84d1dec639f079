"""MLflow tracking through bench.suite: one run per cell with params, tags, per-epoch metrics and
artifacts; finished cells are skipped, unfinished ones continue under the same run id."""

from __future__ import annotations

import functools
import json
import math
import os
import platform
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from conftest import TINY_SETS, fit_stopped_in_a_write
from mlflow.tracking import MlflowClient

from bench import engine, process, suite, tracking
from bench.tracking import DEFAULT_URI, MlflowRun, Tracker, local_artifact_dir, resolve_uri, ui_command
from bench.tracking.delivery import Writer

CPU = torch.device("cpu")
EXPERIMENT = "resnetb-cifar10"
SETS = [*TINY_SETS, "train.epochs=2"]
METRICS = [
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "val_loss",
    "val_acc",
    "lr",
    "epoch_time_s",
    "train_time_s",
    "images_per_s",
    "peak_memory_mb",
]


def plan(*extra: str) -> list[suite.Cell]:
    return suite.plan([EXPERIMENT], profile="smoke", seeds=1, sets=[*SETS, *extra])


def run(cells, root, uri):
    return suite.run_cells(cells, tracker=Tracker(uri), device=CPU, data_dir=None, checkpoint_root=root / "ck")


def run_one_epoch_of_two(root, uri, monkeypatch):
    """The cell run as if interrupted after epoch 1 of 2: its outcome (stopped, run left FAILED)."""
    with monkeypatch.context() as mp:
        mp.setattr(engine, "fit", functools.partial(engine.fit, max_epochs=1))
        [partial] = run(plan(), root, uri)
    assert partial.status == "stopped"
    return partial


def runs_of(client: MlflowClient, name: str = EXPERIMENT):
    exp = client.get_experiment_by_name(name)
    assert exp is not None, f"no MLflow experiment {name}"
    return client.search_runs([exp.experiment_id])


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One tiny 2-epoch cell run through bench.suite into a fresh SQLite store."""
    root = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cells = plan()
        outcomes = run(cells, root, uri)
    return SimpleNamespace(
        root=root, uri=uri, cells=cells, cfg=cells[0].cfg, outcomes=outcomes, client=MlflowClient(uri)
    )


def test_one_finished_run_with_a_readable_name(first):
    [outcome] = first.outcomes
    assert outcome.status == "finished"
    assert outcome.epochs == 2
    [mlrun] = runs_of(first.client)
    assert mlrun.info.run_id == outcome.run_id
    assert mlrun.info.status == "FINISHED"
    assert mlrun.info.run_name == f"resnetb-cifar10-smoke-{first.cfg.config_hash()[:8]}-seed0"
    assert (first.root / "mlflow.db").is_file()


def test_params_are_the_whole_flat_config(first):
    [mlrun] = runs_of(first.client)
    params = mlrun.data.params
    flat = first.cfg.flat()
    assert set(params) == set(flat)
    assert params["optim.lr"] == "0.025"
    assert params["optim.name"] == "sgd"
    assert params["train.epochs"] == "2"
    assert params["data.source"] == "embedded"
    assert json.loads(params["model.widths"]) == [4, 8, 8]
    assert json.loads(params["data.mean"]) == [0.4914, 0.4822, 0.4465]
    assert params["seed"] == "0"
    assert params["experiment"] == EXPERIMENT


def test_tags_identify_the_cell_and_the_environment(first):
    [mlrun] = runs_of(first.client)
    tags = mlrun.data.tags
    assert tags["bench.experiment"] == EXPERIMENT
    assert tags["bench.profile"] == "smoke"
    assert tags["bench.seed"] == "0"
    assert tags["bench.config_hash"] == first.cfg.config_hash()
    assert tags["bench.torch"] == torch.__version__
    assert tags["bench.torchvision"] == torchvision.__version__
    assert tags["bench.device"] == f"cpu ({os.cpu_count()} cores)"
    assert tags["bench.threads"] == "1"  # as the tests train (conftest)
    assert tags["bench.python"] == platform.python_version() and tags["bench.numpy"] == np.__version__
    assert tags["bench.status"] == "finished"
    assert tags["bench.epochs_done"] == "2"
    assert "embedded" in tags["bench.data_source"]
    assert (tags["bench.data_train"], tags["bench.data_val"], tags["bench.data_test"]) == ("900", "100", "500")
    assert tags["bench.data_complete"] == "false"  # the embedded subset


def test_metrics_at_every_epoch(first):
    [outcome] = first.outcomes
    client, run_id = first.client, outcome.run_id
    for key in METRICS:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key
        assert all(math.isfinite(m.value) for m in history), key
    for key in ("train_acc", "val_acc", "test_acc"):
        assert all(0.0 <= m.value <= 1.0 for m in client.get_metric_history(run_id, key)), key
    last_test = max(client.get_metric_history(run_id, "test_acc"), key=lambda m: m.step)
    assert last_test.value == pytest.approx(outcome.final_test_acc)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["lr"] == pytest.approx(0.025)
    assert metrics["best_test_acc"] == pytest.approx(outcome.best_test_acc)
    val = {m.step: m.value for m in client.get_metric_history(run_id, "val_acc")}
    assert metrics["best_val_acc"] == pytest.approx(max(val.values()))


def test_artifacts_config_and_checkpoints(first, tmp_path):
    [outcome] = first.outcomes
    client, run_id = first.client, outcome.run_id
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.json", "checkpoints"} <= top
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    }
    cfg_file = client.download_artifacts(run_id, "config.json", str(tmp_path))
    with open(cfg_file) as f:
        assert json.load(f) == first.cfg.model_dump(mode="json")
    final = torch.load(client.download_artifacts(run_id, "checkpoints/last.pt", str(tmp_path)), weights_only=True)
    assert final["epoch"] == 2
    assert final["config_hash"] == first.cfg.config_hash()
    best = torch.load(client.download_artifacts(run_id, "checkpoints/best.pt", str(tmp_path)), weights_only=True)
    assert best["epoch"] == int(client.get_run(run_id).data.tags["bench.best_epoch"])
    local = first.cells[0].checkpoint_dir(first.root / "ck")
    assert (local / engine.LAST).is_file() and (local / engine.BEST).is_file()


def test_a_local_store_keeps_one_copy_of_each_checkpoint(first):
    """Where the artifacts are files on this machine, the run's checkpoints are the local files
    themselves (hard links), not a second copy of hundreds of MB."""
    [outcome] = first.outcomes
    local = first.cells[0].checkpoint_dir(first.root / "ck")
    artifacts = local_artifact_dir(first.client.get_run(outcome.run_id).info.artifact_uri)
    assert artifacts is not None
    for name in (engine.LAST, engine.BEST):
        assert os.path.samefile(artifacts / "checkpoints" / name, local / name), name
    assert not [p.name for p in (artifacts / "checkpoints").iterdir() if p.name not in (engine.LAST, engine.BEST)]


def test_a_checkpoint_that_cannot_be_linked_is_copied(in_tmp, monkeypatch):
    """Another file system (no hard link across it): MLflow copies the file, and a newer one
    replaces the artifact."""
    tmp_path = in_tmp
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracker.start_run(tracker.experiment_id("links"), "run", {})

    def cross_device(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(tracking.artifacts.os, "link", cross_device)
    for content in (b"first", b"second"):
        folder = tmp_path / f"pinned-{content.decode()}"
        folder.mkdir()
        (folder / "last.pt").write_bytes(content)
        tracking.artifacts._log_pinned(tracker.client, run_id, folder / "last.pt", "checkpoints")
        assert not folder.exists()  # the pinned copy is removed once uploaded
        stored = local_artifact_dir(tracker.client.get_run(run_id).info.artifact_uri) / "checkpoints" / "last.pt"
        assert stored.read_bytes() == content


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("file:///srv/mlruns/1/abc/artifacts", "/srv/mlruns/1/abc/artifacts"),
        ("file://localhost/srv/mlruns/1/abc/artifacts", "/srv/mlruns/1/abc/artifacts"),
        ("/srv/mlruns/1/abc/artifacts", "/srv/mlruns/1/abc/artifacts"),
        ("mlruns/1/abc/artifacts", "mlruns/1/abc/artifacts"),
        ("file://fileserver/srv/mlruns", None),
        ("mlflow-artifacts:/1/abc/artifacts", None),
        ("s3://bucket/mlruns/1/abc/artifacts", None),
        ("http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1", None),
    ],
)
def test_which_artifact_stores_are_local_files(uri, expected):
    found = local_artifact_dir(uri)
    assert (None if found is None else str(found)) == expected


def test_a_finished_cell_is_skipped(first, monkeypatch):
    monkeypatch.chdir(first.root)
    [outcome] = first.outcomes
    [again] = run(plan(), first.root, first.uri)
    assert again.status == "skipped"
    assert again.run_id == outcome.run_id
    assert again.epochs == 2
    assert again.final_test_acc == pytest.approx(outcome.final_test_acc)
    assert again.best_test_acc == pytest.approx(outcome.best_test_acc)
    [mlrun] = runs_of(first.client)
    assert mlrun.info.status == "FINISHED"
    assert steps(first.client, outcome.run_id, "train_loss") == [1, 2]
    assert "skipped" in suite.summary_table([again])


def test_an_unfinished_cell_continues_in_the_same_run(in_tmp, monkeypatch):
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    client = MlflowClient(uri)

    # The first attempt ends after epoch 1 of 2 (as if interrupted): the run is left FAILED.
    partial = run_one_epoch_of_two(in_tmp, uri, monkeypatch)
    assert partial.epochs == 1
    [mlrun] = runs_of(client)
    assert mlrun.info.status == "FAILED"
    assert mlrun.data.tags["bench.status"] == "stopped"
    assert steps(client, partial.run_id, "train_loss") == [1]

    # The second attempt picks up the same run and trains epoch 2 only.
    [done] = run(plan(), in_tmp, uri)
    assert done.status == "finished"
    assert done.epochs == 2
    assert done.run_id == partial.run_id
    [mlrun] = runs_of(client)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.tags["bench.status"] == "finished"
    assert mlrun.data.tags["bench.epochs_done"] == "2"
    for key in ("train_loss", "test_acc", "lr"):
        assert steps(client, done.run_id, key) == [1, 2], key

    # A run marked FAILED after it finished: picked up again, nothing left to train, FINISHED.
    client.set_terminated(done.run_id, "FAILED")
    [again] = run(plan(), in_tmp, uri)
    assert again.run_id == done.run_id
    assert again.status == "finished"
    [mlrun] = runs_of(client)
    assert mlrun.info.status == "FINISHED"
    assert steps(client, done.run_id, "train_loss") == [1, 2]

    # Another config (here another epoch count) is another cell: a new run beside the first.
    [other] = run(plan("train.epochs=1"), in_tmp, uri)
    assert other.status == "finished"
    assert other.run_id != done.run_id
    runs = runs_of(client)
    assert len(runs) == 2
    assert len({r.data.tags["bench.config_hash"] for r in runs}) == 2


def test_resolve_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None) == DEFAULT_URI == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    assert resolve_uri(None) == "sqlite:///from-env.db"
    assert resolve_uri("sqlite:///from-arg.db") == "sqlite:///from-arg.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert resolve_uri(None) == DEFAULT_URI


def test_ui_command():
    assert ui_command("sqlite:///mlflow.db") == "mlflow ui --backend-store-uri sqlite:///mlflow.db"
    assert ui_command("http://localhost:5000") == "open http://localhost:5000"


def test_a_resumed_run_logs_no_epoch_or_step_twice(in_tmp):
    """Killed after logging epoch 3 with its last checkpoint at epoch 2: the resumed fit recomputes
    epoch 3, and the store keeps the first value of each step."""
    tracker = Tracker(f"sqlite:///{in_tmp / 'mlflow.db'}")
    run_id = tracker.start_run(tracker.experiment_id(EXPERIMENT), "resumed", {})
    cfg = plan()[0].cfg
    first = MlflowRun(tracker, run_id, cfg)
    first.on_fit_start(start_epoch=0, epochs=4)
    for epoch in (1, 2, 3):
        first.on_train_steps(2 * epoch, {"train_step_loss": float(epoch)})
        first.on_epoch_end(epoch, {"train_loss": float(epoch)})
    tracker.end_run(run_id, "KILLED")

    again = MlflowRun(tracker, run_id, cfg)
    again.on_fit_start(start_epoch=2, epochs=4)
    for epoch in (3, 4):
        again.on_train_steps(2 * epoch, {"train_step_loss": 10.0 * epoch})
        again.on_epoch_end(epoch, {"train_loss": 10.0 * epoch})
    tracker.end_run(run_id, "FINISHED")
    history = {m.step: m.value for m in tracker.client.get_metric_history(run_id, "train_loss")}
    assert steps(tracker.client, run_id, "train_loss") == [1, 2, 3, 4]
    assert history == {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0}
    assert steps(tracker.client, run_id, "train_step_loss") == [2, 4, 6, 8]


def test_per_step_metrics_are_logged_at_global_steps(in_tmp):
    [outcome] = run(plan("train.log_every_steps=5"), in_tmp, f"sqlite:///{in_tmp / 'mlflow.db'}")
    client = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    per_epoch = -(-(1000 - 100) // 32)  # 900 training images in batches of 32
    logged = steps(client, outcome.run_id, "train_step_loss")
    assert logged == [e * per_epoch + i for e in range(2) for i in range(5, per_epoch + 1, 5)]


def test_the_writer_keeps_order_and_raises_a_failed_call_at_flush():
    writer = Writer()
    seen: list[int] = []
    for i in range(5):
        writer.submit(seen.append, i)
    writer.flush()
    assert seen == [0, 1, 2, 3, 4]

    def fail() -> None:
        raise RuntimeError("store down")

    writer.submit(fail)
    writer.submit(seen.append, 5)
    with pytest.raises(RuntimeError, match="store down"):
        writer.close()
    assert seen[-1] == 5


def test_a_nonfinite_loss_fails_its_run_with_the_epoch_and_the_suite_goes_on(in_tmp):
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    exploding = suite.plan([EXPERIMENT], profile="smoke", seeds=1, sets=[*SETS, "optim.lr=1e30"])
    healthy = suite.plan(["bottleneck-cifar10"], profile="smoke", seeds=1, sets=SETS)
    outcomes = run([*exploding, *healthy], in_tmp, uri)
    assert [o.status for o in outcomes] == ["nonfinite", "finished"]
    client = MlflowClient(uri)
    [failed] = runs_of(client)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["bench.failure"] == "nonfinite_loss"
    assert failed.data.tags["bench.failure_epoch"] == "1"
    assert "train_loss" not in failed.data.metrics  # nothing of the non-finite epoch is logged
    [finished] = runs_of(client, "bottleneck-cifar10")
    assert finished.info.status == "FINISHED" and "bench.failure" not in finished.data.tags


def test_a_cell_rerun_with_only_non_result_settings_changed_is_the_same_cell(in_tmp, monkeypatch):
    """Settings that change no result (checkpoint interval, logging, memory format) keep the
    cell: an unfinished one resumes in its run with the new settings, a finished one is skipped."""
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    partial = run_one_epoch_of_two(in_tmp, uri, monkeypatch)
    changed = plan(
        "train.checkpoint_every=1", "train.log_every_steps=5", "train.channels_last=false", "data.eval_batch_size=100"
    )
    assert changed[0].cfg.config_hash() == plan()[0].cfg.config_hash()
    [done] = run(changed, in_tmp, uri)
    assert (done.status, done.epochs, done.run_id) == ("finished", 2, partial.run_id)
    [mlrun] = runs_of(client)
    assert mlrun.info.status == "FINISHED"
    assert steps(client, done.run_id, "train_loss") == [1, 2]
    assert steps(client, done.run_id, "train_step_loss")  # logged in epoch 2, as the new settings ask
    assert mlrun.data.params["train.log_every_steps"] == "0"  # MLflow params are written once
    assert "train.log_every_steps=5" in mlrun.data.tags["bench.resumed_with"]
    # The checkpoint the resume read was written under the same config hash.
    last = torch.load(changed[0].checkpoint_dir(in_tmp / "ck") / engine.LAST, weights_only=True)
    assert last["config_hash"] == changed[0].cfg.config_hash()
    [again] = run(plan("train.compile=true"), in_tmp, uri)
    assert (again.status, again.run_id) == ("skipped", done.run_id)


def test_a_failed_run_taken_up_again_and_finished_keeps_no_failure_tags(in_tmp):
    """A cell whose last attempt failed (out of memory, say) or was interrupted, then finishes in
    the same run: its tags say how it ended, not how an earlier attempt did."""
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    [cell] = plan()
    tracker = Tracker(uri)
    run_id = tracker.start_run(tracker.experiment_id(EXPERIMENT), cell.run_name, cell.tags)
    tracker.set_tags(
        run_id,
        {
            "bench.failure": "out_of_memory",
            "bench.failure_reason": "OutOfMemoryError: CUDA out of memory",
            "bench.interrupted_by": "SIGTERM",
            "bench.status": "failed",
        },
    )
    tracker.end_run(run_id, "FAILED")
    [outcome] = run([cell], in_tmp, uri)
    assert (outcome.status, outcome.run_id) == ("finished", run_id)
    finished = MlflowClient(uri).get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["bench.status"] == "finished"
    assert not {"bench.failure", "bench.failure_reason", "bench.interrupted_by"} & set(finished.data.tags)


def test_an_error_in_the_clean_up_of_a_stop_is_that_stop_and_the_cell_resumes(in_tmp, monkeypatch):
    """A stop that a library turns into another error while it cleans up (torch.save's zip writer
    does) ends the run KILLED and resumable, not FAILED, and goes on up as the stop."""
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    stopped_in_a_write = fit_stopped_in_a_write(engine.fit)
    with monkeypatch.context() as mp:
        mp.setattr(engine, "fit", stopped_in_a_write)
        with pytest.raises(process.Terminated):
            run(plan(), in_tmp, uri)
    [stopped] = runs_of(MlflowClient(uri))
    assert stopped.info.status == "KILLED"
    assert (stopped.data.tags["bench.status"], stopped.data.tags["bench.interrupted_by"]) == ("interrupted", "SIGTERM")
    assert "bench.failure" not in stopped.data.tags
    [done] = run(plan(), in_tmp, uri)
    assert (done.status, done.epochs, done.run_id) == ("finished", 2, stopped.info.run_id)
    assert steps(MlflowClient(uri), done.run_id, "train_loss") == [1, 2]


def test_a_cell_finished_by_an_earlier_bench_is_carried_over_and_an_unfinished_one_is_not(in_tmp, monkeypatch):
    """Its run carries the hash of every key (as an earlier bench tagged it): a finished one is the
    cell's, skipped; an unfinished one is left as it is and the cell trains in a new run."""
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    sets = ("schedule.step_before_epoch=false",)  # what every earlier run had
    [cell] = plan(*sets)
    before = cell.cfg.earlier_hash()
    [first] = run(plan(*sets), in_tmp, uri)
    tracker, client = Tracker(uri), MlflowClient(uri)
    tracker.set_tags(first.run_id, {"bench.config_hash": before})
    [again] = run(plan(*sets), in_tmp, uri)
    assert (again.status, again.run_id) == ("skipped", first.run_id)
    tags = client.get_run(first.run_id).data.tags
    assert (tags["bench.config_hash"], tags["bench.config_hash_before"]) == (cell.cfg.config_hash(), before)

    with monkeypatch.context() as mp:
        mp.setattr(engine, "fit", functools.partial(engine.fit, max_epochs=1))
        [partial] = run(plan(*sets, "optim.lr=0.01"), in_tmp, uri)
    [other] = plan(*sets, "optim.lr=0.01")
    tracker.set_tags(partial.run_id, {"bench.config_hash": other.cfg.earlier_hash()})
    ckdir = other.checkpoint_dir(in_tmp / "ck")  # where an earlier bench kept it: under its hash
    ckdir.rename(ckdir.with_name(f"smoke-seed0-{other.cfg.earlier_hash()}"))
    [fresh] = run(plan(*sets, "optim.lr=0.01"), in_tmp, uri)
    assert fresh.status == "finished" and fresh.run_id != partial.run_id
    assert steps(client, fresh.run_id, "train_loss") == [1, 2]
    assert client.get_run(partial.run_id).data.tags["bench.config_hash"] == other.cfg.earlier_hash()


@pytest.mark.parametrize(
    "uri, url",
    [
        (
            "http://bench:s3cret@mlflow.lab:5000/",
            "http://mlflow.lab:5000/#/experiments/3/runs/abc",
        ),  # a link, no password in it
        ("https://lab.org/mlflow", "https://lab.org/mlflow/#/experiments/3/runs/abc"),
        ("sqlite:///mlflow.db", "#/experiments/3/runs/abc"),  # the path to open in `mlflow ui`
        ("postgresql://bench:s3cret@db/mlflow", "#/experiments/3/runs/abc"),
    ],
)
def test_a_run_url_links_a_tracking_server_and_is_a_ui_path_elsewhere(uri, url):
    assert tracking.run_url(uri, "3", "abc") == url


def test_a_new_sqlite_store_is_made_whole_or_not_at_all(tmp_path, monkeypatch):
    (tmp_path / ".mlflow.db.new-1").write_bytes(b"tables half made by a process that was killed")
    real, stopped = tracking.store.MlflowClient, []

    def stopped_while_creating(tracking_uri):
        if ".new-" in tracking_uri and not stopped:
            stopped.append(tracking_uri)
            raise KeyboardInterrupt  # Ctrl-C among MLflow's migrations
        return real(tracking_uri=tracking_uri)

    monkeypatch.setattr(tracking.store, "MlflowClient", stopped_while_creating)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(KeyboardInterrupt):
        Tracker(uri)
    assert not (tmp_path / "mlflow.db").exists()  # no store that no later process could open
    tracker = Tracker(uri)  # the next command
    assert tracker.experiment_id("e") and (tmp_path / "mlflow.db").is_file()
    assert list(tmp_path.glob(".mlflow.db.new-*")) == []
