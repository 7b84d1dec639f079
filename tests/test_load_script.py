"""scripts/load.py's check on a real SQLite store: a cell and a trial as bench logs them pass; a
step lost from a history or logged twice is found, and so is a record lost or there twice: a cell's
run, a trial's run, a trial, a logged model."""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import TINY_SETS
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from bench import cli

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "load.py"
TINY_ARGS = [arg for s in TINY_SETS for arg in ("--set", s)]
COMMON = [
    "resnetb-cifar10",
    "--profile",
    "smoke",
    "--epochs",
    "2",
    *TINY_ARGS,
    "--set",
    "train.log_every_steps=5",
    "--set",
    "train.system_metrics=false",
]


def load_script():
    spec = importlib.util.spec_from_file_location("load_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_check_finds_lost_and_duplicated_steps_and_records(in_tmp):
    load = load_script()
    db = in_tmp / "mlflow.db"
    uri, storage = f"sqlite:///{db}", f"sqlite:///{in_tmp / 'optuna.db'}"
    assert cli.main(["run", *COMMON, "--tracking-uri", uri]) == 0
    assert (
        cli.main(["tune", *COMMON, "--trials", "1", "--study", "s", "--storage", storage, "--tracking-uri", uri]) == 0
    )
    client = MlflowClient(uri)
    runs = {r.data.tags.get("bench.kind", "cell"): r for r in load.all_runs(client)}
    cell, trial = runs["cell"].info.run_id, runs["trial"].info.run_id

    plan = load.planned_cells(["run", *COMMON])
    assert plan == {("resnetb-cifar10", "smoke", "0", runs["cell"].data.tags["bench.config_hash"])}
    clean = load.check(uri, storage, "s", plan)
    assert (clean.lost, clean.duplicated, clean.not_finished, clean.unknown) == ([], [], [], [])
    assert set(clean.counts(lost=True).values()) == set(clean.counts(lost=False).values()) == {0}
    assert clean.finished_trials == 1 and not clean.failed(1) and clean.failed(2)
    # 900 training images in batches of 32: 29 steps an epoch, a step loss every 5th, 2 epochs.
    steps = [m.step for m in client.get_metric_history(cell, "train_step_loss")]
    assert sorted(steps) == [5, 10, 15, 20, 25, 34, 39, 44, 49, 54]
    assert clean.metric_values > 2 * (len(load.EPOCH_METRICS) + 4) + len(steps)

    # A second value at epoch 2, as a retried batch whose first reply was lost would log it.
    client.log_batch(cell, metrics=[Metric("train_loss", 1.0, int(time.time() * 1000) + 1, 2)])
    # The trial's step loss at step 39 gone, as if its batch never arrived.
    with sqlite3.connect(db) as con:
        gone = con.execute(
            "DELETE FROM metrics WHERE run_uuid = ? AND key = 'train_step_loss' AND step = 39", (trial,)
        ).rowcount
    assert gone == 1

    found = load.check(uri, storage, "s")
    assert found.duplicated == [(cell, "train_loss", 2, 2)]
    assert found.lost == [(trial, "train_step_loss", 39)]
    assert found.failed(1)

    # Records: seed 1 planned and never run; the cell's run created a second time, as a create
    # whose reply was lost and was sent again would; the trial's run gone and another run of
    # trial 0 there; trial 0's values trained again by trial 1, and by trial 2 as its retry (the
    # pair 1, 2 is not); a second model logged from the cell's run.
    plan2 = load.planned_cells(["run", *COMMON, "--seeds", "2"])
    (seed1,) = plan2 - plan
    exp_id = runs["cell"].info.experiment_id
    again = client.create_run(
        exp_id,
        tags={
            k: runs["cell"].data.tags[k]
            for k in ("bench.experiment", "bench.profile", "bench.seed", "bench.config_hash")
        },
    )
    client.delete_run(trial)
    stray = client.create_run(
        runs["trial"].info.experiment_id, tags={"bench.kind": "trial", "optuna.study": "s", "optuna.trial": "0"}
    )
    study = optuna.load_study(study_name="s", storage=storage)
    (t0,) = study.get_trials()
    for attrs, state in (({}, "COMPLETE"), ({"bench.retry_of": 0}, "COMPLETE"), ({}, "FAIL")):
        study.add_trial(
            optuna.trial.create_trial(
                params=t0.params,
                distributions=t0.distributions,
                user_attrs=attrs,
                state=optuna.trial.TrialState[state],
                value=t0.value if state == "COMPLETE" else None,
            )
        )
    client.create_logged_model(exp_id, name="model", source_run_id=cell)

    found = load.check(uri, storage, "s", plan2)
    assert found.lost_records == {
        "cell runs": ["/".join(seed1)],
        "trial runs": [f"trial 0: run {trial}"],
        "trials": [],
        "logged models": [],
    }
    assert found.duplicated_records == {
        "cell runs": [f"{'/'.join(next(iter(plan)))}: run {again.info.run_id}"],
        "trial runs": [f"trial 0: run {stray.info.run_id}"],
        "trials": [f"trials 0 and 1: {t0.params}", f"trials 1 and 2: {t0.params}"],
        "logged models": [f"run {cell}: 2 models"],
    }
    assert found.counts(lost=False) == {
        "metric steps": 1,
        "cell runs": 1,
        "trial runs": 1,
        "trials": 2,
        "logged models": 1,
    }
    assert found.failed(1)
    # A run of a cell no plan has is one nothing asked for.
    assert load.check(uri, plan=set()).duplicated_records["cell runs"] == [
        f"{'/'.join(next(iter(plan)))}: run {i}" for i in (cell, again.info.run_id)
    ]
