"""Passwords in storage and tracking URLs never appear in output, logs, errors or MLflow runs."""

from __future__ import annotations

import logging
import subprocess
import sys

import optuna
import pytest

from bench import cli, tuning
from bench.tracking import Tracker

PASSWORD = "Zq7-s3cret"
PG = f"postgresql://bench:{PASSWORD}@127.0.0.1:9/db"  # nothing listens on port 9: refused at once
HTTP = f"http://bench:{PASSWORD}@127.0.0.1:9"
SMOKE = ["resnetb-cifar10", "--profile", "smoke"]

COMMANDS = [
    (["run", *SMOKE, "--dry-run", "--tracking-uri", PG], 0),
    (["run", *SMOKE, "--device", "cpu", "--tracking-uri", PG], 2),
    (["run", *SMOKE, "--device", "cpu", "--tracking-uri", HTTP], 2),
    (["run", *SMOKE, "--dry-run", "--tracking-uri", f"http://bench:{PASSWORD}@127.0.0.1:99999"], 2),
    (["run", *SMOKE, "--dry-run", "--tracking-uri", f"nope://bench:{PASSWORD}@host/x"], 2),
    (["tune", *SMOKE, "--storage", PG], 2),
    (["tune", *SMOKE, "--best", "--tracking-uri", HTTP], 0),
    (["tune", *SMOKE, "--tracking-uri", HTTP], 2),
    (["report", "--storage", PG.replace("/db", "/optuna")], 2),
    (["report", "--storage", "none", "--tracking-uri", PG], 2),
]


@pytest.mark.parametrize(
    "argv, code", COMMANDS, ids=[" ".join(a[:1] + a[-2:-1]) + f" {i}" for i, (a, _) in enumerate(COMMANDS)]
)
def test_no_output_shows_a_password(argv, code, in_tmp, capsys, caplog):
    with caplog.at_level(logging.DEBUG):
        assert cli.main(argv) == code
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err + caplog.text
    if code == 2:
        assert "bench:***@" in err or "not a well-formed" in err or "unknown scheme" in err, err


def test_a_password_from_the_environment_is_hidden_too(in_tmp, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", PG)
    assert cli.main(["run", *SMOKE, "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err and "bench:***@127.0.0.1:9" in err


def test_log_records_that_quote_a_url_are_scrubbed(in_tmp, capsys, caplog):
    """A driver or MLflow may log the URL (or the password alone, percent-decoded) itself."""
    encoded = "postgresql://bench:p%40ss-w0rd@127.0.0.1:9/db"
    cli.main(["report", "--tracking-uri", encoded])
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("mlflow.store.db.utils").warning("cannot connect to %s", encoded)
        try:
            raise RuntimeError("login failed for password p@ss-w0rd")
        except RuntimeError:
            logging.getLogger("sqlalchemy").exception("retrying")
    assert "p%40ss-w0rd" not in caplog.text and "p@ss-w0rd" not in caplog.text
    assert "cannot connect to postgresql://bench:***@127.0.0.1:9/db" in caplog.text


def test_the_study_parent_run_stores_no_password(in_tmp):
    """The one URL a run records: the Optuna storage of a tuning study, as a tag."""
    tracker = Tracker(f"sqlite:///{in_tmp / 'mlflow.db'}")
    exp_id = tracker.experiment_id("resnetb-cifar10")
    study = optuna.create_study(study_name="s", direction="maximize")
    space = [tuning.Param("optim.lr", "float", 0.01, 0.1, True)]
    parent = tuning.ParentRun(tracker, exp_id, study, space, profile="smoke", storage_url=PG)
    run = tracker.client.get_run(parent.run_id)
    recorded = [*run.data.params.items(), *run.data.tags.items()]
    assert all(PASSWORD not in k + v for k, v in recorded), recorded
    assert run.data.tags["optuna.storage"] == "postgresql://bench:***@127.0.0.1:9/db"


@pytest.mark.slow
def test_as_a_process_neither_stream_shows_the_password(tmp_path, subprocess_env):
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", *SMOKE, "--device", "cpu", "--tracking-uri", PG],
        cwd=tmp_path,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
