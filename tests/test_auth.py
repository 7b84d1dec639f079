"""Servers that require credentials: PostgreSQL with scram-sha-256 passwords and `mlflow server`
with its basic-auth app, on loopback, stopped at the end of the module.

Without credentials both refuse, and bench says so in one line before anything trains; with them a
smoke cell, a 2-worker study and the report run, and no password shows anywhere bench writes or
in the argv of any process while they run. The passwords hold characters that URLs must
percent-encode, and each ends in a token of its own, so every form of them is searched for.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import optuna
import pytest
import requests
import sqlalchemy
from conftest import TINY_SETS
from mlflow.tracking import MlflowClient
from servers import DIRECT, MlflowServer, Postgres, pg_bindir

from bench import tuning

pytestmark = pytest.mark.slow  # servers, processes or kills: left out of the fast lane

TINY_ARGS = [arg for s in TINY_SETS for arg in ("--set", s)]
PG_PASSWORD = "p@ss:w/rd%-pg-Tq81zw"
ADMIN_PASSWORD = "p@ss:w/rd%-admin-Hv27xk"
USER, USER_PASSWORD = "alice", "p@ss:w/rd% alice-Mf53qj"
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def secret_forms() -> list[str]:
    """Every way a password could be written: as typed, percent-encoded (both ways a URL quotes
    it), in a basic-auth header, and the token it ends with (in any partial encoding too)."""
    forms = []
    for user, secret in (("bench", PG_PASSWORD), ("admin", ADMIN_PASSWORD), (USER, USER_PASSWORD)):
        forms += [
            secret,
            quote(secret, safe=""),
            quote(secret),
            quote(secret).replace("%20", "+"),
            secret.rsplit("-", 1)[1],
            base64.b64encode(f"{user}:{secret}".encode()).decode(),
        ]
    return forms


FORMS = secret_forms()


def leaks(text: str | bytes) -> list[str]:
    data = text if isinstance(text, bytes) else text.encode()
    return [form for form in FORMS if form.encode() in data]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    bindir = pg_bindir()
    if bindir is None:
        pytest.fail("no PostgreSQL server binaries: install the dev extra (it brings pgserver) or set BENCH_PG_BIN")
    if importlib.util.find_spec("flask_wtf") is None:
        pytest.fail("MLflow's basic-auth app needs Flask-WTF: install the dev extra (it brings mlflow[auth])")
    pg = Postgres(bindir, password=PG_PASSWORD).start()
    mlflow_server = None
    try:
        storage = pg.create("optuna")
        artifacts = tmp_path_factory.mktemp("mlflow") / "artifacts"
        artifacts.mkdir()
        mlflow_server = MlflowServer(pg.create("mlflow"), artifacts, admin_password=ADMIN_PASSWORD).wait_ready()
        # One user for bench, made by the admin through MLflow's REST API, as a lab would.
        made = requests.post(
            f"{mlflow_server.url}/api/2.0/mlflow/users/create",
            json={"username": USER, "password": USER_PASSWORD},
            auth=(MlflowServer.ADMIN, ADMIN_PASSWORD),
            timeout=30,
        )
        assert made.status_code == 200, made.text
        yield {
            "storage": storage,
            "tracking": mlflow_server.url,
            "pg": pg,
            "mlflow": mlflow_server,
            "artifacts": artifacts,
        }
    finally:
        if mlflow_server is not None:
            mlflow_server.stop()
        pg.stop()
    assert not pg.running() and (mlflow_server is None or not mlflow_server.running())


@pytest.fixture
def env(subprocess_env, tmp_path):
    """No credentials of the caller's: no MLflow user, no PGPASSWORD, no ~/.pgpass."""
    drop = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD")
    return {**{k: v for k, v in subprocess_env.items() if k not in drop}, "PGPASSFILE": str(tmp_path / "no-pgpass")}


def status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with DIRECT.open(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def argv_of_all_processes() -> dict[int, str]:
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            found[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
    return found


def bench(
    args: list[str], cwd: Path, env: dict[str, str], argv_seen: list[str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m bench ARGS`; with `argv_seen`, the argv of every process on the machine is
    sampled twice a second while it runs (a worker lives for seconds: several samples each)."""
    out, err = cwd / f".out-{time.monotonic_ns()}", cwd / f".err-{time.monotonic_ns()}"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=cwd, env=env, stdout=o, stderr=e, text=True)
        deadline = time.monotonic() + 600
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"bench {args[0]} did not end"
            if argv_seen is not None:
                argv_seen += argv_of_all_processes().values()
            time.sleep(0.5)
    return subprocess.CompletedProcess(args, proc.returncode, out.read_text(), err.read_text())


def test_without_credentials_the_tracking_server_and_the_database_refuse(servers, tmp_path, env, monkeypatch):
    url = servers["tracking"]
    assert status(url + "/health") == 200  # open to all: what load balancers and bench's probe ask first
    assert status(url + SEARCH) == 401
    assert status(url + SEARCH, (USER, "wrong-password-123")) == 401
    assert status(url + SEARCH, (USER, USER_PASSWORD)) == 200

    cell = [
        "run",
        "resnetb-cifar10",
        "--profile",
        "smoke",
        "--seeds",
        "1",
        "--epochs",
        "2",
        *TINY_ARGS,
        "--tracking-uri",
        url,
    ]
    for creds, said in (
        ({}, "requires a login (HTTP 401)"),
        (
            {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": "wrong-password-123"},
            "refuses the login (HTTP 401)",
        ),
    ):
        proc = bench(cell, tmp_path, {**env, **creds})
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.splitlines()  # one line, naming what to set: no traceback, no retries for minutes
        assert len(lines) == 1 and lines[0].startswith(f"bench: error: tracking store {url} {said}"), proc.stderr
        assert "MLFLOW_TRACKING_USERNAME" in lines[0] and not proc.stdout
    # A path where the server has no API: the search is refused (the basic-auth app denies routes it does not know)
    proc = bench(
        [*cell[:-1], url + "/nope"],
        tmp_path,
        {**env, "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": USER_PASSWORD},
    )
    assert proc.returncode == 2 and f"{url}/nope answers with HTTP 403 to a search of its experiments" in proc.stderr, (
        proc.stderr
    )
    assert not (tmp_path / "checkpoints").exists()  # nothing trained
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MlflowServer.ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    assert [e.name for e in MlflowClient(url).search_experiments()] == ["Default"]  # nothing written

    pg = servers["pg"]
    for wrong, said in (
        (pg.url("optuna"), "no password supplied"),
        (pg.url("optuna", "p@ss:w/rd%-wrong"), "password authentication failed"),
    ):
        with pytest.raises(sqlalchemy.exc.OperationalError, match=said):
            sqlalchemy.create_engine(wrong).connect()
        proc = bench(
            ["tune", "resnetb-cifar10", "--profile", "smoke", "--storage", wrong, "--tracking-uri", url], tmp_path, env
        )
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and said in proc.stderr and "~/.pgpass" in proc.stderr, proc.stderr
        assert not leaks(proc.stderr)
    assert optuna.get_all_study_summaries(servers["storage"]) == []


def test_with_credentials_a_cell_a_study_and_the_report_run_and_no_password_shows(servers, tmp_path, env, monkeypatch):
    env = {
        **env,
        "MLFLOW_TRACKING_URI": servers["tracking"],
        "BENCH_OPTUNA_STORAGE": servers["storage"],
        "MLFLOW_TRACKING_USERNAME": USER,
        "MLFLOW_TRACKING_PASSWORD": USER_PASSWORD,
    }
    argv: list[str] = []
    cell = bench(
        ["run", "resnetb-cifar10", "--profile", "smoke", "--seeds", "1", "--epochs", "2", *TINY_ARGS],
        tmp_path,
        env,
        argv,
    )
    assert cell.returncode == 0, cell.stderr[-3000:]
    before = len(argv)
    study = bench(
        [
            "tune",
            "resnetb-cifar10",
            "--profile",
            "smoke",
            "--epochs",
            "2",
            *TINY_ARGS,
            "--trials",
            "2",
            "--workers",
            "2",
            "--study",
            "auth-study",
        ],
        tmp_path,
        env,
        argv,
    )
    assert study.returncode == 0, study.stderr[-3000:]
    assert "2 finished trials in study auth-study" in study.stdout
    workers = [a for a in argv[before:] if "--worker-of" in a and "auth-study" in a]
    assert len(workers) >= 4, "fewer than two samples of the workers' argv"  # two workers, each seen at least twice
    report = bench(["report", "--suite", "cifar10", "--out", str(tmp_path / "report")], tmp_path, env, argv)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "### Study `auth-study`: resnetb-cifar10" in (tmp_path / "report" / "README.md").read_text()

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER_PASSWORD)
    client = MlflowClient(servers["tracking"])
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=1000)
    models = client.search_logged_models([e.experiment_id for e in experiments])
    ours = [r for r in runs if r.info.experiment_id == client.get_experiment_by_name("resnetb-cifar10").experiment_id]
    assert sorted(r.data.tags.get("bench.kind", "cell") for r in ours) == ["cell", "study", "trial", "trial"]
    assert all(r.info.status == "FINISHED" for r in ours)
    assert any(
        r.data.tags.get("optuna.storage") == servers["storage"].replace(quote(PG_PASSWORD, safe=""), "***")
        for r in runs
    )
    storage = optuna.storages.RDBStorage(servers["storage"])
    studied = optuna.load_study(study_name="auth-study", storage=storage)
    study_system_attrs = storage.get_study_system_attrs(
        storage.get_study_id_from_name("auth-study")
    )  # optuna-dashboard's notes
    assert len(studied.get_trials(states=tuning.FINISHED)) == 2

    places = {  # where a password could be: what bench printed, stored, wrote, and every argv seen
        "stdout/stderr": [p.stdout + p.stderr for p in (cell, study, report)],
        "MLflow experiments": [json.dumps([e.name, e.tags]) for e in experiments],
        "MLflow runs (params, tags, inputs)": [json.dumps(r.to_dictionary()) for r in runs],
        "MLflow logged models": [json.dumps([m.name, m.tags, m.params, m.source_run_id]) for m in models],
        "the study": [json.dumps([studied.user_attrs, study_system_attrs], default=str)],
        "the trials": [json.dumps([t.user_attrs, t.system_attrs, t.params], default=str) for t in studied.trials],
        "argv": sorted(set(argv)),
        "the MLflow server log": [Path(servers["mlflow"].log.name)],
        "the PostgreSQL log": [servers["pg"].root / "log"],
    }
    files = [p for root in (tmp_path, servers["artifacts"]) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "config.json" for p in files) and any(p.name == "environment.txt" for p in files)
    assert (tmp_path / "report" / "runs.csv") in files
    places["files: the working directory (checkpoints, report) and the server's artifacts"] = files
    found = {}
    for where, items in places.items():
        for item in items:
            if forms := leaks(item.read_bytes() if isinstance(item, Path) else item):
                found.setdefault(where, []).append((forms, str(item)[:300]))
    assert not found, found
    assert len(argv) > 10  # sampled throughout, not once
