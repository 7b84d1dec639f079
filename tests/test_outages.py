"""Outages of real servers while bench works: the `mlflow server` restarted twice and PostgreSQL
(under both Optuna and MLflow) once, during a 3-worker study and a suite in 2 shards.

Nothing may be lost or written twice: every run ends FINISHED, every metric step is in its run
once, the study ends at exactly its trial count, and no trial runs twice but the re-run of a
failed one. The servers are this module's own (loopback, stopped at the end), so that restarting
them disturbs no other test.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter

import optuna
import pytest
from mlflow.tracking import MlflowClient
from servers import pair
from test_scale_out import TINY_ARGS, bench, check_study, runs_by_experiment, tune_args

pytestmark = pytest.mark.slow  # servers, processes or kills: left out of the fast lane

EPOCHS = 8
PER_EPOCH = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with pair(tmp_path_factory.mktemp("mlflow")) as running:
        yield running


def steps_once(client: MlflowClient, run, epochs: int) -> list[str]:
    """What is wrong with the run's metric histories: a step logged twice, or one of its `epochs`
    (as the study or the command says, not as the run does) missing."""
    wrong = []
    for key in run.data.metrics:
        steps = Counter(m.step for m in client.get_metric_history(run.info.run_id, key))
        wrong += [f"{run.info.run_name} {key} step {s} x{n}" for s, n in steps.items() if n > 1]
        if key in PER_EPOCH and set(steps) != set(range(1, epochs + 1)):
            wrong.append(f"{run.info.run_name} {key}: steps {sorted(steps)}, epochs {epochs}")
    missing = [k for k in PER_EPOCH if k not in run.data.metrics]
    return wrong + ([f"{run.info.run_name}: no {missing}"] if missing and epochs else [])


def test_restarts_of_the_tracking_server_and_the_database_lose_and_double_nothing(servers, tmp_path, subprocess_env):
    # No HTTP retries inside MLflow: every failed request reaches bench's own waiting.
    env = {**subprocess_env, "BENCH_OUTAGE_LIMIT_S": "240", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    tune = bench(
        [
            *tune_args(servers, "outage", 6, "--workers", "3", "--heartbeat", "10", "--sampler", "random"),
            "--epochs",
            str(EPOCHS),
        ],
        tmp_path,
        env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    shards = []
    for i in (1, 2):
        (tmp_path / f"machine{i}").mkdir()
        shards.append(
            bench(
                [
                    "run",
                    "resnetb-cifar10",
                    "--profile",
                    "smoke",
                    "--seeds",
                    "4",
                    "--epochs",
                    str(EPOCHS),
                    *TINY_ARGS,
                    "--set",
                    "data.val_size=100",
                    "--tracking-uri",
                    servers["tracking"],
                    "--shard",
                    f"{i}/2",
                ],
                tmp_path / f"machine{i}",
                env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    procs = [tune, *shards]
    client = MlflowClient(servers["tracking"])

    def training() -> bool:
        """A cell and a trial have logged an epoch."""
        runs = [
            r for rs in runs_by_experiment(servers["tracking"]).values() for r in rs if "train_loss" in r.data.metrics
        ]
        return {r.data.tags.get("bench.kind", "cell") for r in runs} >= {"cell", "trial"}

    def running() -> None:
        """Every process still working, or what ended one."""
        for name, p in zip(("tune", "shard 1", "shard 2"), procs):
            if p.poll() is not None:
                pytest.fail(
                    f"{name} ended (exit {p.returncode}) before the restarts were done: {p.stderr.read()[-3000:]}"
                )

    deadline = time.time() + 300
    while not training():
        running()
        assert time.time() < deadline, "nothing trained within 300 s"
        time.sleep(1)
    for restart in (
        lambda: servers["mlflow"].restart(down_s=3),
        lambda: servers["pg"].restart(down_s=3),
        lambda: servers["mlflow"].restart(down_s=3),
    ):
        running()
        restart()
        time.sleep(2)
    said = ""
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-4000:]
        said += err
    # The work met the outages and waited them out.
    assert f"the tracking server {servers['tracking']} does not answer" in said
    assert f"the tracking server {servers['tracking']} answers again" in said

    study = check_study(servers, "outage", 6)  # exactly 6 finished; one child run per trial that ran
    # No trial ran twice, but a failed one queued again with its values.
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    ran = Counter(tuple(sorted(t.params.items())) for t in study.trials if t.state != optuna.trial.TrialState.FAIL)
    assert all(n == 1 for n in ran.values()), ran
    assert all(
        any(
            r.user_attrs.get("bench.retry_of") == t.number or r.system_attrs.get("failed_trial") == t.number
            for r in study.trials
        )
        for t in failed
    )
    runs = runs_by_experiment(servers["tracking"])["resnetb-cifar10"]
    failed_runs = {t.user_attrs.get("mlflow_run_id") for t in failed}
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    assert [r.info.run_name for r in runs if r.info.status != "FINISHED" and r.info.run_id not in failed_runs] == []
    cells = [r for r in runs if r.data.tags.get("bench.kind", "cell") == "cell" and "bench.seed" in r.data.tags]
    assert Counter(r.data.tags["bench.seed"] for r in cells) == Counter({"0": 1, "1": 1, "2": 1, "3": 1})
    # The epochs each run should hold, from the command (cells) and the study (trials, pruned ones too).
    epochs = {r.info.run_id: EPOCHS for r in cells}
    epochs.update(
        {
            t.user_attrs["mlflow_run_id"]: max(t.intermediate_values, default=0)
            for t in study.trials
            if t.state != optuna.trial.TrialState.FAIL and "mlflow_run_id" in t.user_attrs
        }
    )
    wrong = [w for r in runs if r.info.run_id in epochs for w in steps_once(client, r, epochs[r.info.run_id])]
    assert wrong == []
