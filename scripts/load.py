"""Load on one tracking server and one database: `bench tune` with 8 workers on one study and
`bench run --suite all` in 4 shards, all at once, against a throwaway PostgreSQL and `mlflow server`
on loopback (tests/servers.py), every epoch logged.

    python scripts/load.py [--workers 8] [--shards 4] [--trials N] [--epochs E] [--seeds S] [--keep DIR]

The bench processes reach the server through a reverse proxy that times every MLflow call. Once
they have exited, the stores are read directly (not through the proxy) and compared with what the
runs' params and tags say they logged, and with the suite's plan and the study's trials. Prints
runs, metric values and trials written, the calls' p50/p99 latency, errors, and lost and duplicated
records by kind: metric steps, cell runs (one per planned cell), trial runs (the runs the trials
name), trials (two with the same values, neither a retry of the other), logged models (one per
run). Exit code 1 when a record is lost or duplicated, a run did not finish, a process failed, or
the study has not exactly N finished trials.
A measurement, not a test: it takes minutes and its figures depend on the machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import optuna
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the plan is this checkout's, as the processes' bench is
from conftest import TINY_SETS  # noqa: E402
from servers import MlflowServer, Postgres, pg_bindir  # noqa: E402

from bench import cli, config, suite  # noqa: E402
from bench.tracking import CELL_TAGS  # noqa: E402

STUDY = "load"
LOG_EVERY_STEPS = 5  # train_step_loss every 5 of the smoke profile's ~30 steps an epoch
LIMIT_S = 3600  # the bench processes are stopped after this long
# Logged at every epoch by every run (engine.fit); val_* with a validation split, test_* by cells.
EPOCH_METRICS = ("train_loss", "train_acc", "lr", "epoch_time_s", "train_time_s", "images_per_s", "peak_memory_mb")
FINISHED_TRIALS = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


# --- the proxy ------------------------------------------------------------------------------------

# Headers about one connection, not the message: each side of the proxy has its own.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host"}
# An upstream connection idle this long is replaced rather than reused: the server closes idle
# keep-alive connections (uvicorn after 5 s), and a request sent into one that is closing would
# count as an error of the server.
UPSTREAM_IDLE_S = 2.0


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    status: int  # 0: no reply from the server
    seconds: float  # from the request's headers to the last byte of the reply relayed
    error: str = ""  # the connection failure, if any


class Body:
    """The next `length` bytes of a stream, for http.client to send in blocks."""

    def __init__(self, stream, length: int) -> None:
        self.stream, self.left = stream, length

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(data)
        if size and self.left and not data:
            raise ConnectionError("the client closed the connection mid-body")
        return data


class ProxyHandler(BaseHTTPRequestHandler):
    """One client connection: its requests go, in turn, over one upstream connection."""

    protocol_version = "HTTP/1.1"  # keep-alive
    server: Proxy
    upstream: http.client.HTTPConnection | None = None
    idle_since = 0.0

    def log_message(self, format, *args) -> None:  # every call is recorded in Proxy.calls instead
        pass

    def forward(self) -> None:
        started = time.perf_counter()
        status, error, replied = 0, "", False
        try:
            response = self._send_upstream()
            status = response.status
            replied = True
            self._relay(response)
        except (OSError, http.client.HTTPException) as exc:
            error = f"{type(exc).__name__}: {exc}"
            self._close_upstream()
            self.close_connection = True
            if not replied:
                try:
                    self.send_error(502, "no reply from the tracking server")
                except OSError:
                    pass
        finally:
            self.server.calls.append(
                Call(self.command, self.path.split("?")[0], status, time.perf_counter() - started, error)
            )

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = forward

    def _send_upstream(self) -> http.client.HTTPResponse:
        if self.upstream is not None and time.monotonic() - self.idle_since > UPSTREAM_IDLE_S:
            self._close_upstream()
        if self.upstream is None:
            self.upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=600)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        body = None
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = self._chunks()  # http.client sends it chunked again
        elif int(self.headers.get("Content-Length", 0)):
            body = Body(self.rfile, int(self.headers["Content-Length"]))
        self.upstream.request(self.command, self.path, body=body, headers=headers)
        return self.upstream.getresponse()

    def _chunks(self):
        while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return
            yield self.rfile.read(size)
            self.rfile.readline()

    def _relay(self, response: http.client.HTTPResponse) -> None:
        """The reply's status, headers and body, streamed as they come."""
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        has_body = self.command != "HEAD" and response.status not in (204, 304) and response.status >= 200
        chunked = has_body and response.getheader("Content-Length") is None
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while has_body and (data := response.read1(1 << 16)):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        response.close()
        if response.will_close:
            self._close_upstream()
        self.idle_since = time.monotonic()

    def _close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def finish(self) -> None:
        self._close_upstream()
        super().finish()


class Proxy(ThreadingHTTPServer):
    """A reverse proxy on 127.0.0.1 in front of the server on `upstream_port`, recording every call."""

    daemon_threads = True

    def __init__(self, upstream_port: int) -> None:
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream_port = upstream_port
        self.calls: list[Call] = []  # list.append is atomic: the handler threads share it
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def endpoint(path: str) -> str:
    """A call's path with the ids and artifact paths in it left out, so calls of one kind group."""
    path = re.sub(r"(/mlflow-artifacts/artifacts)/.*", r"\1/...", path)
    return re.sub(r"/(m-)?[0-9a-f]{32}(?=/|$)", "/{id}", path)


@dataclass
class Latency:
    calls: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def latency(calls: list[Call]) -> Latency | None:
    if not calls:
        return None
    ms = np.array([c.seconds for c in calls]) * 1000
    return Latency(len(ms), float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), float(ms.max()))


# --- the check ------------------------------------------------------------------------------------


RECORDS = ("cell runs", "trial runs", "trials", "logged models")


@dataclass
class Check:
    runs: int = 0
    kinds: Counter = field(default_factory=Counter)  # runs by the tag bench.kind (cells have none)
    not_finished: list[str] = field(default_factory=list)  # "run name (id): STATUS, reason"
    histories: int = 0
    metric_values: int = 0
    trials: Counter = field(default_factory=Counter)  # by state name
    finished_trials: int = 0
    lost: list[tuple[str, str, int]] = field(default_factory=list)  # metric steps: (run id, key, step)
    duplicated: list[tuple[str, str, int, int]] = field(
        default_factory=list
    )  # metric steps: (run id, key, step, times)
    # Records other than metric steps, by kind (RECORDS): what is missing, what is there twice.
    lost_records: dict[str, list[str]] = field(default_factory=lambda: {kind: [] for kind in RECORDS})
    duplicated_records: dict[str, list[str]] = field(default_factory=lambda: {kind: [] for kind in RECORDS})
    unknown: list[str] = field(default_factory=list)  # runs whose expected steps could not be derived

    def failed(self, trials: int | None) -> bool:
        wrong_study = trials is not None and self.finished_trials != trials
        records = any(self.lost_records.values()) or any(self.duplicated_records.values())
        return bool(self.lost or self.duplicated or records or self.not_finished or self.unknown or wrong_study)

    def counts(self, lost: bool) -> dict[str, int]:
        """Lost (or duplicated) records by kind, metric steps first."""
        records = self.lost_records if lost else self.duplicated_records
        return {"metric steps": len(self.lost if lost else self.duplicated), **{k: len(records[k]) for k in RECORDS}}


def all_runs(client: MlflowClient) -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    runs, token = [], None
    while True:
        page = client.search_runs(ids, max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def train_images(run) -> int | None:
    if "bench.data_train" in run.data.tags:
        return int(run.data.tags["bench.data_train"])
    for d in run.inputs.dataset_inputs:
        if any(t.key == "mlflow.data.context" and t.value == "training" for t in d.tags):
            return int(json.loads(d.dataset.profile)["num_rows"])
    return None


def expected_steps(run, epochs: int) -> dict[str, set[int]]:
    """The (key, step) entries a run that trained `epochs` epochs logged, from its params and tags:
    every per-epoch metric at steps 1..epochs and train_step_loss at every N-th global step."""
    params = run.data.params
    keys = list(EPOCH_METRICS)
    if int(params.get("data.val_size", 0)) > 0:
        keys += ["val_loss", "val_acc"]
    if run.data.tags.get("bench.kind") != "trial":  # trials never evaluate the test set
        keys += ["test_loss", "test_acc"]
    expected = {key: set(range(1, epochs + 1)) for key in keys}
    every = int(params.get("train.log_every_steps", 0))
    if every and epochs:
        images = train_images(run)
        if images is None:
            raise ValueError("no training set count (tag bench.data_train or a training dataset input)")
        per_epoch = -(-images // int(params["data.batch_size"]))
        expected["train_step_loss"] = {
            (e - 1) * per_epoch + i for e in range(1, epochs + 1) for i in range(every, per_epoch + 1, every)
        }
    return expected


def trained_epochs(run, trial_epochs: dict[str, int]) -> int | None:
    """How many epochs a run trained, by what is not its metrics: a trial's from the epochs it
    reported to Optuna, a finished cell's from its param train.epochs, another cell's from its tag
    bench.epochs_done. None for runs that train nothing (a study's parent run, leases)."""
    tags = run.data.tags
    if tags.get("bench.kind") == "trial":
        return trial_epochs.get(run.info.run_id, int(tags.get("bench.epochs_done", 0)))
    if "bench.seed" not in tags:
        return None
    if run.info.status == "FINISHED":
        return int(run.data.params["train.epochs"])
    return int(tags.get("bench.epochs_done", 0))


def planned_cells(run_command: list[str]) -> set[tuple[str, ...]]:
    """The cells (experiment, profile, seed, config hash) that `bench run` with these arguments
    trains, planned as cmd_run plans them; its --shard left out: the shards together cover the plan."""
    args = cli._parser().parse_args(run_command)
    names = list(dict.fromkeys([*args.experiments, *(config.suite_experiments(args.suite) if args.suite else [])]))
    seeds = args.seeds or config.profile_seeds(args.profile)
    cells = suite.plan(names, profile=args.profile, seeds=seeds, sets=args.sets, epochs=args.epochs, ablate=args.ablate)
    return {tuple(c.tags[k] for k in CELL_TAGS) for c in cells}


def check_cells(result: Check, runs: list, plan: set[tuple[str, ...]]) -> None:
    """One run per planned cell: a cell without one is lost, each run after its first duplicated,
    and so is a run of a cell the plan does not have (nothing asked for it)."""
    found: dict[tuple[str, ...], list[str]] = defaultdict(list)  # run ids, the first created first
    for run in sorted(runs, key=lambda r: r.info.start_time):
        tags = run.data.tags
        if "bench.kind" not in tags and all(k in tags for k in CELL_TAGS):
            found[tuple(tags[k] for k in CELL_TAGS)].append(run.info.run_id)
    result.lost_records["cell runs"] += ["/".join(cell) for cell in sorted(plan - set(found))]
    for cell, ids in sorted(found.items()):
        extra = ids if cell not in plan else ids[1:]
        result.duplicated_records["cell runs"] += [f"{'/'.join(cell)}: run {i}" for i in extra]


def check_trials(result: Check, runs: list, trials: list, study: str) -> None:
    """The study's trial runs are the runs its trials name (user attr mlflow_run_id): a named run
    that is not there is lost, a run no trial names (a second run of one trial) duplicated. Two
    trials that trained the same values are one duplicated, unless one is the other's retry."""
    named = {t.user_attrs["mlflow_run_id"]: t.number for t in trials if "mlflow_run_id" in t.user_attrs}
    present = {
        r.info.run_id: r.data.tags.get("optuna.trial", "?")
        for r in runs
        if r.data.tags.get("bench.kind") == "trial" and r.data.tags.get("optuna.study") == study
    }
    result.lost_records["trial runs"] += [f"trial {n}: run {i}" for i, n in sorted(named.items()) if i not in present]
    result.duplicated_records["trial runs"] += [
        f"trial {n}: run {i}" for i, n in sorted(present.items()) if i not in named
    ]
    trained = [t for t in trials if t.state != optuna.trial.TrialState.FAIL and t.params]
    for i, a in enumerate(trained):
        for b in trained[i + 1 :]:
            if a.params == b.params and not (retry_of(a) == b.number or retry_of(b) == a.number):
                result.duplicated_records["trials"].append(f"trials {a.number} and {b.number}: {a.params}")


def retry_of(trial) -> int | None:
    """The trial this one re-runs: queued by bench (user attr) or by Optuna's heartbeat (system attr)."""
    return trial.user_attrs.get("bench.retry_of", trial.system_attrs.get("failed_trial"))


def check_models(result: Check, client: MlflowClient) -> None:
    """At most one logged model per source run."""
    ids = [e.experiment_id for e in client.search_experiments()]
    sources, token = Counter(), None
    while True:
        page = client.search_logged_models(ids, max_results=100, page_token=token)
        sources.update(m.source_run_id for m in page)
        token = page.token
        if not token:
            break
    result.duplicated_records["logged models"] += [
        f"run {run_id}: {n} models" for run_id, n in sorted(sources.items()) if n > 1
    ]


def check(
    tracking_uri: str, storage: str | None = None, study: str | None = None, plan: set[tuple[str, ...]] | None = None
) -> Check:
    """Read every run of the tracking store (and the study's trials) and compare them with what
    was logged: runs not FINISHED, expected (run, key, step) entries missing, entries twice; cell
    runs against `plan` (planned_cells; None: not compared), trial runs against the trials, logged
    models against their runs."""
    result = Check()
    trial_epochs: dict[str, int] = {}
    trials = []
    if storage is not None:
        trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
        for t in trials:
            result.trials[t.state.name] += 1
            result.finished_trials += t.state in FINISHED_TRIALS
            if "mlflow_run_id" in t.user_attrs:
                trial_epochs[t.user_attrs["mlflow_run_id"]] = max(t.intermediate_values, default=0)
    client = MlflowClient(tracking_uri)
    runs = all_runs(client)
    if plan is not None:
        check_cells(result, runs, plan)
    if storage is not None:
        check_trials(result, runs, trials, study)
    check_models(result, client)
    for run in runs:
        run_id, tags = run.info.run_id, run.data.tags
        result.runs += 1
        result.kinds[tags.get("bench.kind", "cell")] += 1
        if run.info.status != "FINISHED":
            why = tags.get("bench.failure_reason") or tags.get("bench.failure") or tags.get("bench.status", "")
            result.not_finished.append(f"{run.info.run_name} ({run_id}): {run.info.status} {why}".rstrip())
        steps = {}
        for key in run.data.metrics:
            history = client.get_metric_history(run_id, key)
            result.histories += 1
            result.metric_values += len(history)
            counts = Counter(m.step for m in history)
            steps[key] = set(counts)
            result.duplicated += [(run_id, key, step, n) for step, n in sorted(counts.items()) if n > 1]
        epochs = trained_epochs(run, trial_epochs)
        if epochs is None:
            continue
        try:
            expected = expected_steps(run, epochs)
        except (KeyError, ValueError) as exc:
            result.unknown.append(f"{run.info.run_name} ({run_id}): {exc}")
            continue
        for key, wanted in sorted(expected.items()):
            result.lost += [(run_id, key, step) for step in sorted(wanted - steps.get(key, set()))]
    return result


# --- the load -------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """One thread per process (12 processes share the cores), this checkout's bench, no store
    inherited from the caller."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "BENCH_EXPERIMENTS", "BENCH_OPTUNA_STORAGE")
    }
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        }
    )
    return env


def commands(args, storage: str, tracking: str) -> dict[str, list[str]]:
    steps = ["--set", f"train.log_every_steps={LOG_EVERY_STEPS}"]
    bench = [sys.executable, "-m", "bench"]
    tiny = [a for s in TINY_SETS for a in ("--set", s)]
    out = {
        "tune": [
            *bench,
            "tune",
            "resnetb-cifar10",
            "--profile",
            "smoke",
            "--epochs",
            str(args.epochs),
            *tiny,
            *steps,
            "--trials",
            str(args.trials),
            "--workers",
            str(args.workers),
            "--study",
            STUDY,
            "--storage",
            storage,
            "--tracking-uri",
            tracking,
        ]
    }
    for i in range(1, args.shards + 1):
        out[f"shard{i}"] = [
            *bench,
            "run",
            "--suite",
            "all",
            "--profile",
            "smoke",
            "--seeds",
            str(args.seeds),
            "--epochs",
            str(args.epochs),
            *steps,
            "--shard",
            f"{i}/{args.shards}",
            "--tracking-uri",
            tracking,
        ]
    return out


def run_load(args, work: Path, storage: str, proxy: Proxy) -> dict[str, int]:
    """Start every process at once, each in its own directory as on its own machine; their exit codes."""
    procs = {}
    for name, command in commands(args, storage, proxy.url).items():
        (work / name).mkdir()
        log = open(work / f"{name}.log", "w")
        procs[name] = subprocess.Popen(
            command, cwd=work / name, env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
    started, reported = time.monotonic(), 0.0
    try:
        while any(p.poll() is None for p in procs.values()):
            time.sleep(1)
            elapsed = time.monotonic() - started
            if elapsed - reported >= 60:
                reported = elapsed
                running = [n for n, p in procs.items() if p.poll() is None]
                print(
                    f"  {elapsed / 60:4.1f} min: {len(proxy.calls)} calls so far; running: {', '.join(running)}",
                    flush=True,
                )
            if elapsed > LIMIT_S:
                print(f"  stopping the processes after {LIMIT_S} s", flush=True)
                break
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait()
    return {name: p.returncode for name, p in procs.items()}


def print_figures(check_: Check, calls: list[Call], codes: dict[str, int], trials: int, wall_s: float) -> None:
    errors = [c for c in calls if c.status >= 500 or c.error]
    refused = Counter((c.status, c.method, endpoint(c.path)) for c in calls if 400 <= c.status < 500)
    overall = latency(calls)
    batch = latency([c for c in calls if c.path.endswith("/runs/log-batch")])
    states = ", ".join(f"{n} {s}" for s, n in sorted(check_.trials.items()))
    rows = [
        ("processes", ", ".join(f"{n} exit {c}" for n, c in codes.items())),
        (
            "runs written",
            f"{check_.runs} ({check_.runs - len(check_.not_finished)} FINISHED): "
            + ", ".join(f"{n} {kind}" for kind, n in sorted(check_.kinds.items())),
        ),
        ("metric values written", f"{check_.metric_values} in {check_.histories} histories"),
        (
            "trials written",
            f"{sum(check_.trials.values())}: {states}; {check_.finished_trials} finished of {trials} asked",
        ),
        ("MLflow requests", f"{len(calls)} ({sum(refused.values())} answered 4xx)"),
        (
            "latency p50 / p99",
            f"{overall.p50_ms:.1f} / {overall.p99_ms:.1f} ms (max {overall.max_ms:.0f} ms)" if overall else "-",
        ),
        (
            "log-batch p50 / p99",
            f"{batch.p50_ms:.1f} / {batch.p99_ms:.1f} ms over {batch.calls} calls (max {batch.max_ms:.0f} ms)"
            if batch
            else "-",
        ),
        (
            "errors",
            f"{len(errors)} ({sum(c.status >= 500 for c in errors)} 5xx, {sum(bool(c.error) for c in errors)} connection failures)",
        ),
        *(
            (f"{which} records", f"{sum(n.values())}: " + ", ".join(f"{c} {kind}" for kind, c in n.items()))
            for which, n in (("lost", check_.counts(lost=True)), ("duplicated", check_.counts(lost=False)))
        ),
        ("wall time", f"{wall_s / 60:.1f} min"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    by_endpoint: dict[str, list[Call]] = {}
    for c in calls:
        by_endpoint.setdefault(f"{c.method} {endpoint(c.path)}", []).append(c)
    print("\ncalls by endpoint (count, p50, p99, max in ms):")
    for name, group in sorted(by_endpoint.items(), key=lambda kv: -len(kv[1])):
        s = latency(group)
        print(f"  {s.calls:6d} {s.p50_ms:8.1f} {s.p99_ms:8.1f} {s.max_ms:8.0f}  {name}")
    for (status, method, path), n in sorted(refused.items()):
        print(f"  answered {status}: {n} x {method} {path}")
    for c in errors[:20]:
        print(f"  error: {c.method} {c.path} -> {c.status or 'no reply'} {c.error}")
    for line in check_.not_finished + check_.unknown:
        print(f"  not finished or not checkable: {line}")
    for run_id, key, step in check_.lost[:20]:
        print(f"  lost: run {run_id} {key} step {step}")
    for run_id, key, step, n in check_.duplicated[:20]:
        print(f"  duplicated: run {run_id} {key} step {step} ({n} times)")
    for which, records in (("lost", check_.lost_records), ("duplicated", check_.duplicated_records)):
        for kind in RECORDS:
            for line in records[kind][:20]:
                print(f"  {which} {kind[:-1]}: {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=8, help="bench tune workers on one study (default 8)")
    parser.add_argument(
        "--shards", type=int, default=4, help="bench run --suite all processes, one shard each (default 4)"
    )
    parser.add_argument("--trials", type=int, default=32, help="finished trials the study runs to (default 32)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of every trial and cell (default 3)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds of each experiment of the suite (default 1)")
    parser.add_argument(
        "--keep",
        type=Path,
        help="keep the processes' directories and logs here (default: a temporary directory, removed)",
    )
    args = parser.parse_args(argv)
    bindir = pg_bindir()
    if bindir is None:
        parser.error("no PostgreSQL server binaries: install the dev extra (it brings pgserver) or set BENCH_PG_BIN")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-load-"))
    (work / "mlflow" / "artifacts").mkdir(parents=True)
    pg = Postgres(bindir).start()
    server = proxy = None
    try:
        storage = pg.create("optuna")
        server = MlflowServer(pg.create("mlflow"), work / "mlflow" / "artifacts").wait_ready()
        proxy = Proxy(server.port)
        print(
            f"{args.workers} tune workers ({args.trials} trials) and {args.shards} shards of the suite "
            f"({args.seeds} seed(s)), {args.epochs} epochs each, logs in {work}",
            flush=True,
        )
        started = time.monotonic()
        codes = run_load(args, work, storage, proxy)
        wall_s = time.monotonic() - started
        shard = commands(args, storage, proxy.url)["shard1"]
        plan = planned_cells(shard[shard.index("run") :])
        checked = check(server.url, storage, STUDY, plan)
        print_figures(checked, proxy.calls, codes, args.trials, wall_s)
        failed_procs = [n for n, c in codes.items() if c != 0]
        for name in failed_procs:
            print(f"\n{name} exited with {codes[name]}; the end of {work / name}.log:")
            print("".join((work / f"{name}.log").read_text().splitlines(keepends=True)[-30:]))
        return 1 if checked.failed(args.trials) or failed_procs else 0
    finally:
        if proxy is not None:
            proxy.close()
        if server is not None:
            server.stop()
        pg.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
