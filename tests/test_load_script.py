"""scripts/load.py's check on a real SQLite store: a cell and a trial as bench logs them pass; a
step lost from a history or logged twice is found."""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from bench import cli

from conftest import TINY_SETS

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "load.py"
TINY_ARGS = [arg for s in TINY_SETS for arg in ("--set", s)]
COMMON = ["resnetb-cifar10", "--profile", "smoke", "--epochs", "2", *TINY_ARGS, "--set", "train.log_every_steps=5",
          "--set", "train.system_metrics=false"]


def load_script():
    spec = importlib.util.spec_from_file_location("load_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_check_finds_a_lost_and_a_duplicated_step(in_tmp):
    load = load_script()
    db = in_tmp / "mlflow.db"
    uri, storage = f"sqlite:///{db}", f"sqlite:///{in_tmp / 'optuna.db'}"
    assert cli.main(["run", *COMMON, "--tracking-uri", uri]) == 0
    assert cli.main(["tune", *COMMON, "--trials", "1", "--study", "s", "--storage", storage, "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    runs = {r.data.tags.get("bench.kind", "cell"): r for r in load.all_runs(client)}
    cell, trial = runs["cell"].info.run_id, runs["trial"].info.run_id

    clean = load.check(uri, storage, "s")
    assert (clean.lost, clean.duplicated, clean.not_finished, clean.unknown) == ([], [], [], [])
    assert clean.finished_trials == 1 and not clean.failed(1) and clean.failed(2)
    # 900 training images in batches of 32: 29 steps an epoch, a step loss every 5th, 2 epochs.
    steps = [m.step for m in client.get_metric_history(cell, "train_step_loss")]
    assert sorted(steps) == [5, 10, 15, 20, 25, 34, 39, 44, 49, 54]
    assert clean.metric_values > 2 * (len(load.EPOCH_METRICS) + 4) + len(steps)

    # A second value at epoch 2, as a retried batch whose first reply was lost would log it.
    client.log_batch(cell, metrics=[Metric("train_loss", 1.0, int(time.time() * 1000) + 1, 2)])
    # The trial's step loss at step 39 gone, as if its batch never arrived.
    with sqlite3.connect(db) as con:
        gone = con.execute("DELETE FROM metrics WHERE run_uuid = ? AND key = 'train_step_loss' AND step = 39", (trial,)).rowcount
    assert gone == 1

    found = load.check(uri, storage, "s")
    assert found.duplicated == [(cell, "train_loss", 2, 2)]
    assert found.lost == [(trial, "train_step_loss", 39)]
    assert found.failed(1)
