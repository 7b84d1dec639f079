"""Scale-out on real servers: Optuna on PostgreSQL, MLflow behind `mlflow server`, several worker
processes on one study, and a suite split in shards.

A throwaway PostgreSQL cluster (initdb and pg_ctl as an unprivileged user, loopback only) holds two
databases, one for Optuna and one for MLflow (they must not share one: both keep an
`alembic_version` table). Both servers stop at the end of the module, and by themselves if the
test process dies.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter

import optuna
import pytest
from conftest import TINY_SETS
from mlflow.tracking import MlflowClient
from servers import pair

from bench import tuning

pytestmark = pytest.mark.slow  # servers, processes or kills: left out of the fast lane

TINY_ARGS = [arg for s in TINY_SETS for arg in ("--set", s)]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with pair(tmp_path_factory.mktemp("mlflow")) as running:
        yield running


def bench(args, cwd, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=cwd, env=env, text=True, **kw)


def runs_by_experiment(tracking: str) -> dict[str, list]:
    client = MlflowClient(tracking)
    return {e.name: client.search_runs([e.experiment_id], max_results=1000) for e in client.search_experiments()}


def tune_args(servers, study: str, trials: int, *extra: str) -> list[str]:
    return [
        "tune",
        "resnetb-cifar10",
        "--profile",
        "smoke",
        "--epochs",
        "2",
        *TINY_ARGS,
        "--trials",
        str(trials),
        "--study",
        study,
        "--storage",
        servers["storage"],
        "--tracking-uri",
        servers["tracking"],
        *extra,
    ]


def check_study(servers, study_name: str, trials: int) -> optuna.Study:
    """Exactly `trials` finished trials, numbers unique, each trial that ran one child run in the
    experiment, under the study's parent run."""
    study = optuna.load_study(study_name=study_name, storage=servers["storage"])
    all_trials = study.get_trials(deepcopy=False)
    assert len(study.get_trials(deepcopy=False, states=tuning.FINISHED)) == trials
    assert len({t.number for t in all_trials}) == len(all_trials)
    runs = runs_by_experiment(servers["tracking"])
    assert not runs.get("Default"), "a run landed in MLflow's Default experiment"
    mine = [r for r in runs["resnetb-cifar10"] if r.data.tags.get("optuna.study") == study_name]
    parents = [r for r in mine if r.data.tags.get("bench.kind") == "study"]
    children = [r for r in mine if r.data.tags.get("bench.kind") == "trial"]
    assert len(parents) == 1
    per_trial = Counter(int(r.data.tags["optuna.trial"]) for r in children)
    # A surplus trial, or one that drew the values another trial holds (two workers sampling at the
    # same moment: the later gives way), never trains and has no run.
    ran = [
        t for t in all_trials if not t.user_attrs.get("bench.surplus") and t.user_attrs.get("bench.failure") != "repeat"
    ]
    assert set(per_trial.values()) == {1} and set(per_trial) <= {t.number for t in ran}  # none twice, none astray
    # A trial with no run: its worker was killed after optuna made the trial and before bench made
    # its run (the kill can land a trial later than the line the test saw): failed, and tried again.
    retried = {t.system_attrs.get("failed_trial") for t in all_trials} | {
        t.user_attrs.get("bench.retry_of") for t in all_trials
    }
    for t in ran:
        if t.number not in per_trial:
            assert (
                t.state == optuna.trial.TrialState.FAIL and "mlflow_run_id" not in t.user_attrs and t.number in retried
            ), t
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    for t in study.get_trials(deepcopy=False, states=tuning.FINISHED):
        assert t.user_attrs["mlflow_run_id"] in {r.info.run_id for r in children}
    return study


def test_three_workers_share_one_study_on_postgres_and_a_tracking_server(servers, tmp_path, subprocess_env):
    proc = bench(
        tune_args(servers, "workers", 9, "--workers", "3", "--heartbeat", "5"),
        tmp_path,
        subprocess_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "9 finished trials in study workers" in out
    study = check_study(servers, "workers", 9)
    assert study.trials[0].user_attrs.get("bench.recipe")  # the recipe, enqueued once, ran once
    assert sum(bool(t.user_attrs.get("bench.recipe")) for t in study.trials) == 1
    parent = [
        r
        for r in runs_by_experiment(servers["tracking"])["resnetb-cifar10"]
        if r.data.tags.get("optuna.study") == "workers" and r.data.tags.get("bench.kind") == "study"
    ][0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_val_acc"] == pytest.approx(study.best_value)


def test_a_worker_killed_mid_trial_is_replaced_by_the_others(servers, tmp_path, subprocess_env):
    args = tune_args(servers, "killed", 6, "--heartbeat", "2", "--sampler", "random")
    prepared = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--workers", "0"],
        cwd=tmp_path,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr
    # Three workers as on three machines: the same command, one process each.
    procs = [
        bench([*args, "--workers", "1"], tmp_path, subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    victim = procs[0]
    killed_trial = None
    deadline = time.time() + 300
    for line in victim.stderr:  # "trial N: epoch 1/2 ...": the victim is inside trial N
        if line.startswith("trial ") and ": epoch 1/" in line:
            killed_trial = int(line.split()[1].rstrip(":"))
            victim.kill()
            break
        assert time.time() < deadline
    assert killed_trial is not None
    victim.wait(timeout=30)
    for p in procs[1:]:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    study = check_study(servers, "killed", 6)
    # The trial the victim was in: trial N, or a later one when the victim ran ahead of this reader.
    [dead] = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert dead.number >= killed_trial
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retried) == 1 and retried[0].params == dead.params and retried[0].state in tuning.FINISHED
    # Its run failed with it; only a later trial may have been killed before bench made its run.
    assert "mlflow_run_id" in dead.user_attrs or dead.number > killed_trial
    if "mlflow_run_id" in dead.user_attrs:
        run = MlflowClient(servers["tracking"]).get_run(dead.user_attrs["mlflow_run_id"])
        assert (run.info.status, run.data.tags["optuna.state"]) == ("FAILED", "FAIL")


def test_a_suite_in_two_shards_runs_every_cell_once(servers, tmp_path, subprocess_env):
    args = [
        "run",
        "--suite",
        "cifar10",
        "--profile",
        "smoke",
        "--seeds",
        "2",
        "--epochs",
        "1",
        *TINY_ARGS,
        "--tracking-uri",
        servers["tracking"],
    ]
    procs = []
    for i in (1, 2):  # two machines: their own working directories and checkpoints, one tracking server
        (tmp_path / f"machine{i}").mkdir()
        procs.append(
            bench(
                [*args, "--shard", f"{i}/2"],
                tmp_path / f"machine{i}",
                subprocess_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        assert len(re.findall(r"^\S+/smoke/seed\d\s+finished", out, re.M)) == 2  # half the cells each
    runs = runs_by_experiment(servers["tracking"])
    assert not runs.get("Default")
    cells = Counter(
        (name, r.data.tags["bench.seed"])
        for name in ("bottleneck-cifar10", "resnetb-cifar10")
        for r in runs.get(name, [])
        if r.data.tags.get("bench.kind", "cell") == "cell" and "bench.seed" in r.data.tags
    )
    assert cells == Counter({(n, s): 1 for n in ("bottleneck-cifar10", "resnetb-cifar10") for s in ("0", "1")})
    assert all(
        r.info.status == "FINISHED"
        for n in ("bottleneck-cifar10", "resnetb-cifar10")
        for r in runs[n]
        if "bench.seed" in r.data.tags
    )
    # Run again on one machine: every cell is found finished on the server and skipped.
    again = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=tmp_path / "machine1",
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert len(re.findall(r"^\S+/smoke/seed\d\s+skipped", again.stdout, re.M)) == 4


def test_a_cell_killed_on_one_machine_resumes_on_another_from_the_server(servers, tmp_path, subprocess_env):
    args = [
        "run",
        "bottleneck-cifar10",
        "--profile",
        "smoke",
        "--seeds",
        "1",
        "--epochs",
        "5",
        *TINY_ARGS,
        "--set",
        "train.checkpoint_every=1",
        "--set",
        "train.checkpoint_min_interval_s=0",
        "--set",
        "data.val_size=200",
        "--tracking-uri",
        servers["tracking"],
    ]
    first, second = tmp_path / "machine1", tmp_path / "machine2"
    first.mkdir()
    second.mkdir()
    proc = bench(args, first, subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for line in proc.stderr:
        if ": epoch 3/5" in line:
            proc.kill()
            break
    proc.wait(timeout=30)
    again = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=second,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    resumed = re.search(r"resuming after epoch (\d)/5", again.stderr)
    assert resumed and int(resumed.group(1)) >= 2, again.stderr  # from the checkpoint machine 1 uploaded
    runs = [
        r
        for r in runs_by_experiment(servers["tracking"])["bottleneck-cifar10"]
        if r.data.tags.get("bench.profile") == "smoke" and r.data.params.get("data.val_size") == "200"
    ]
    assert len(runs) == 1  # the same run, continued
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["bench.epochs_done"] == "5"
    steps = [m.step for m in MlflowClient(servers["tracking"]).get_metric_history(runs[0].info.run_id, "train_loss")]
    assert set(steps) == {1, 2, 3, 4, 5}


def test_the_report_reads_runs_from_the_server_and_studies_from_postgres(servers, tmp_path, subprocess_env):
    """After the tests above: cells of the cifar10 suite on the server, studies in PostgreSQL."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "report",
            "--suite",
            "cifar10",
            "--tracking-uri",
            servers["tracking"],
            "--storage",
            servers["storage"],
        ],
        cwd=tmp_path,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "reports" / "cifar10" / "README.md").read_text()
    studies = sorted(s.study_name for s in optuna.get_all_study_summaries(servers["storage"]))
    assert studies and all(f"### Study `{name}`: resnetb-cifar10" in text for name in studies)
    assert "| 2 |" in text  # the two seeds of each experiment from the shards
