"""What a command prints against a real MLflow tracking server: bench's own lines, one per event;
MLflow's run links, Optuna's log and warnings only with --debug. And the links between the
study's trials (optuna-dashboard) and their MLflow runs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import optuna
import pytest
from conftest import TINY_SETS
from mlflow.tracking import MlflowClient
from optuna_dashboard import get_note
from servers import MlflowServer

from bench import process, tuning

TINY_ARGS = [arg for s in TINY_SETS for arg in ("--set", s)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    (root / "artifacts").mkdir()
    mlflow_server = MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts").wait_ready()
    yield mlflow_server.url
    mlflow_server.stop()


def bench(args, cwd, env) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_tune_with_workers_prints_its_own_lines_and_links_each_trial_to_its_run(server, tmp_path, subprocess_env):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = bench(
        [
            "tune",
            "resnetb-cifar10",
            "--profile",
            "smoke",
            "--epochs",
            "2",
            *TINY_ARGS,
            "--trials",
            "3",
            "--workers",
            "2",
            "--heartbeat",
            "5",
            "--storage",
            storage,
            "--tracking-uri",
            server,
        ],
        tmp_path,
        subprocess_env,
    )
    out = proc.stdout + proc.stderr
    assert "View run" not in out and "View experiment" not in out, out  # MLflow's lines at each run's end
    assert "Warning" not in out and "[W " not in out, out  # Python's warnings, Optuna's log lines
    assert out.count(f"optuna-dashboard {storage}") == 1 and out.count("trials finished") == 1, (
        out
    )  # not once per worker
    study = optuna.load_study(study_name="resnetb-cifar10-smoke", storage=storage)
    assert study.metric_names == ["val_acc"]

    client = MlflowClient(server)
    parent = client.get_run(study.user_attrs["mlflow_run_id"])
    assert parent.data.tags["optuna.study"] == study.study_name and parent.data.tags["optuna.storage"] == storage
    link = f"{server}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    assert study.user_attrs["mlflow_run_url"] == link
    assert (
        out.count(f"{server}/#/") == 1 and f"See the study's runs: {link}" in proc.stdout
    )  # the one MLflow link, at the end
    finished = study.get_trials(states=tuning.FINISHED)
    assert len(finished) == 3
    for t in finished:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert (run.data.tags["optuna.study"], run.data.tags["optuna.trial"]) == (study.study_name, str(t.number))
        assert (
            t.user_attrs["mlflow_run_url"] == f"{server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        )
        note = get_note(optuna.Trial(study, t._trial_id))
        assert f"[{run.info.run_name}]({t.user_attrs['mlflow_run_url']})" in note


@pytest.mark.slow
def test_run_against_a_server_shows_mlflows_lines_only_with_debug(server, tmp_path, subprocess_env):
    args = [
        "run",
        "resnetb-cifar10",
        "--profile",
        "smoke",
        "--epochs",
        "1",
        *TINY_ARGS,
        "--seeds",
        "1",
        "--tracking-uri",
        server,
    ]
    quiet = bench(args, tmp_path, subprocess_env)
    assert "View run" not in quiet.stdout + quiet.stderr and "finished" in quiet.stdout
    chatty = bench([*args, "--set", "optim.lr=0.05", "--debug"], tmp_path, subprocess_env)  # another config: a new run
    assert "🏃 View run resnetb-cifar10-smoke-" in chatty.stdout


def _warn_from(module: str, message: str) -> None:
    """A warning as raised inside `module`: the warning filters match on the module it came from."""
    warnings.warn_explicit(message, UserWarning, filename=module.replace(".", "/") + ".py", lineno=1, module=module)


def test_the_console_hides_the_libraries_output_unless_debug_and_comes_back_after(recwarn, monkeypatch):
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    optuna_log = logging.getLogger("optuna.study")
    with process.terminal(debug=False):
        _warn_from("mlflow.store.tracking", "a library's warning")
        _warn_from("bench.tuning", "RetryFailedTrialCallback is experimental (supported from v2.8.0).")
        # torch's warnings stay: with warn_only, one is the only sign of a nondeterministic operation.
        _warn_from("torch.utils._contextlib", "put_ does not have a deterministic implementation")
        assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
        assert not optuna_log.isEnabledFor(logging.WARNING)  # Optuna logs each failed trial with its traceback
        assert not logging.getLogger("bench.tuning").isEnabledFor(logging.DEBUG)
    assert [str(w.message) for w in recwarn.list] == ["put_ does not have a deterministic implementation"]
    assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ
    recwarn.clear()
    with process.terminal(debug=True):
        _warn_from("mlflow.store.tracking", "a library's warning")
        assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ
        assert optuna_log.isEnabledFor(logging.INFO) and logging.getLogger("bench.tuning").isEnabledFor(logging.DEBUG)
    assert [str(w.message) for w in recwarn.list] == ["a library's warning"]
    # MLflow's link lines are print() calls that would show a URL's password: hidden under --debug too.
    with process.terminal(debug=True, secret=True):
        assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
    assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ


def test_workers_get_the_debug_flag_of_their_command():
    from bench import cli

    args = cli._parser().parse_args(["tune", "resnetb-cifar10", "--profile", "smoke", "--debug"])
    assert "--debug" in tuning.command.worker_args(args, "study", "parent", 0)
    assert cli._parser().parse_args(["--debug", "tune", "resnetb-cifar10"]).debug
    args = cli._parser().parse_args(["tune", "resnetb-cifar10"])
    assert not args.debug and "--debug" not in tuning.command.worker_args(args, "study", "parent", 0)
