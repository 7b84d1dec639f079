"""MLflow (a real SQLite store) -> tidy frames."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.entities import Metric, RunTag

from bench import results
from bench.tracking import Tracker


def _log_run(
    tracker: Tracker, experiment: str, seed: int, test_acc: list[float], *, profile="smoke", status="FINISHED"
) -> str:
    exp_id = tracker.experiment_id(experiment)
    tags = {
        "bench.experiment": experiment,
        "bench.profile": profile,
        "bench.seed": str(seed),
        "bench.config_hash": "abc",
        "bench.status": "finished",
        "bench.epochs_done": str(len(test_acc)),
        "bench.device": "cpu (2 cores)",
        "bench.data_train": "900",
        "bench.data_val": "100",
        "bench.data_test": "500",
    }
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


# --- what the report reads: the server filters, foreign runs and studies are never fetched -------


@pytest.fixture
def statements():
    """Every SQL statement run through SQLAlchemy (MLflow's and Optuna's stores), with its bound
    parameters as text: what was asked of the database, to prove what was never fetched."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    seen: list[tuple[str, str]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append((statement, repr(parameters)))

    event.listen(Engine, "before_cursor_execute", record)
    yield seen
    event.remove(Engine, "before_cursor_execute", record)


def test_foreign_runs_and_step_metrics_are_never_fetched(store, statements):
    uri, ids = store
    tracker = Tracker(uri)
    exp_id = tracker.experiment_id("resnetb-cifar10")
    paper = _log_run(tracker, "resnetb-cifar10", 0, [0.3, 0.4], profile="paper")
    tracker.client.log_batch(
        paper,
        metrics=[Metric("train_step_loss", 1.0, 0, s) for s in (10, 20)]
        + [Metric("system/cpu_utilization_percentage", 50.0, 0, s) for s in (0, 1)],
    )
    before = results.load(uri, ["resnetb-cifar10"])
    # A tuning trial in the same MLflow experiment (no cell tags) and a run of another experiment.
    trial = tracker.start_run(exp_id, "study-trial0", {"bench.kind": "trial"})
    tracker.client.log_batch(trial, metrics=[Metric("test_acc", 0.9, 0, 1)])
    tracker.end_run(trial, "FINISHED")
    other = _log_run(tracker, "bottleneck-cifar10", 0, [0.5], profile="paper")
    statements.clear()
    res = results.load(uri, ["resnetb-cifar10"])
    pd.testing.assert_frame_equal(res.runs, before.runs)  # the report reads the same frames
    pd.testing.assert_frame_equal(res.metrics, before.metrics)
    # Runs of every profile are read: the report counts other profiles' runs among those left out.
    assert set(res.runs.run_id) == {paper, ids[0], ids[1]} and set(res.metrics.metric) == {"test_acc", "train_loss"}
    asked = " ".join(p for _, p in statements)
    assert paper in asked and ids[0] in asked  # the recorder sees the runs that are read
    for foreign in (trial, other):
        assert foreign not in asked
    assert "train_step_loss" not in asked and "system/cpu" not in asked


def test_the_trials_of_foreign_studies_are_never_read(tmp_path, statements):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    ids = {}
    for name in ("resnetb-cifar10-smoke", "someone-elses-study"):
        study = optuna.create_study(study_name=name, storage=url, direction="maximize")
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
        ids[name] = study._study_id
    statements.clear()
    found = results.load_studies(url, ["resnetb-cifar10"])
    assert sorted(found.handles) == ["resnetb-cifar10-smoke"] and len(found.trials) == 3
    trial_reads = [p for sql, p in statements if "FROM trials" in sql and "study_id" in sql]
    assert f"({ids['resnetb-cifar10-smoke']}," in " ".join(trial_reads)  # the recorder sees the study that is read
    assert not any(f"({ids['someone-elses-study']}," in p for p in trial_reads)
