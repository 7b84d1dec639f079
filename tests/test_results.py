"""MLflow (a real SQLite store) -> tidy frames."""

from __future__ import annotations

import pytest
from mlflow.entities import Metric, RunTag

from bench import results
from bench.tracking import Tracker


def _log_run(tracker: Tracker, experiment: str, seed: int, test_acc: list[float], *, profile="smoke", status="FINISHED") -> str:
    exp_id = tracker.experiment_id(experiment)
    tags = {"bench.experiment": experiment, "bench.profile": profile, "bench.seed": str(seed), "bench.config_hash": "abc",
            "bench.status": "finished", "bench.epochs_done": str(len(test_acc)), "bench.device": "cpu (2 cores)",
            "bench.data_train": "900", "bench.data_val": "100", "bench.data_test": "500"}
    run_id = tracker.start_run(exp_id, f"{experiment}-{profile}-seed{seed}", tags)
    metrics = [Metric("test_acc", v, 0, step) for step, v in enumerate(test_acc, 1)]
    metrics += [Metric("train_loss", 2.0 / step, 0, step) for step in range(1, len(test_acc) + 1)]
    metrics.append(Metric("best_test_acc", max(test_acc), 0, 2))
    tracker.client.log_batch(run_id, metrics=metrics, tags=[RunTag("mlflow.note.content", "x")])
    tracker.client.log_param(run_id, "optim.lr", "0.025")
    tracker.end_run(run_id, status)
    return run_id


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    ids = {
        0: _log_run(tracker, "resnetb-cifar10", 0, [0.1, 0.2, 0.3]),
        1: _log_run(tracker, "resnetb-cifar10", 1, [0.15, 0.25, 0.2]),
        2: _log_run(tracker, "bottleneck-cifar10", 0, [0.1], status="FAILED"),
    }
    return uri, ids


def test_runs_frame_has_one_typed_row_per_run(store):
    uri, ids = store
    res = results.load(uri, ["resnetb-cifar10", "bottleneck-cifar10", "never-run"])
    runs = res.runs
    assert list(runs.experiment) == ["bottleneck-cifar10", "resnetb-cifar10", "resnetb-cifar10"]  # sorted
    assert list(runs.seed) == [0, 0, 1] and str(runs.seed.dtype) == "Int64"
    assert list(runs.mlflow_status) == ["FAILED", "FINISHED", "FINISHED"]
    r1 = runs[runs.run_id == ids[1]].iloc[0]
    assert r1.final_test_acc == pytest.approx(0.2)  # the last epoch's value, not the best
    assert r1.best_test_acc == pytest.approx(0.25)
    assert r1["optim.lr"] == "0.025"  # params by their dotted key
    assert r1.device == "cpu (2 cores)" and r1.data_train == 900
    assert "mlflow.note.content" not in runs.columns


def test_metrics_frame_is_long_and_in_epoch_order(store):
    uri, ids = store
    m = results.load(uri, ["resnetb-cifar10"]).metrics
    assert list(m.columns) == ["experiment", "profile", "seed", "config_hash", "run_id", "metric", "epoch", "value"]
    seed1 = m[(m.run_id == ids[1]) & (m.metric == "test_acc")]
    assert list(seed1.epoch) == [1, 2, 3] and list(seed1.value) == pytest.approx([0.15, 0.25, 0.2])
    assert set(m.metric) == {"test_acc", "train_loss"}  # best_* are per-run summaries, not curves
    assert len(m) == 2 * 2 * 3


def test_empty_store_gives_empty_frames(tmp_path):
    res = results.load(f"sqlite:///{tmp_path / 'empty.db'}", ["resnetb-cifar10"])
    assert res.runs.empty and res.metrics.empty
    assert "final_test_acc" not in res.runs.columns
