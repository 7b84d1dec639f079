"""The tracking store: its URI, a new SQLite store made safely, experiments, runs and searches.

One MLflow experiment per bench experiment and one run per (experiment, profile, seed, config
hash): the tags identify the cell, so a second `bench run` finds a finished run and skips it, or
an unfinished one and continues it under the same run id.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlflow.entities import RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bench import process
from bench.errors import unusable
from bench.servers import retry as outage
from bench.tracking import delivery
from bench.tracking.artifacts import CHECKPOINTS, _log_text
from bench.tracking.environment import SystemMetrics, environment_report, environment_text

DEFAULT_URI = "sqlite:///mlflow.db"
NOTE = "mlflow.note.content"  # an experiment's or a run's description (markdown) in the MLflow UI
CELL_TAGS = ("bench.experiment", "bench.profile", "bench.seed", "bench.config_hash")
# How an attempt at a run ended, when it did not finish: cleared when the run is taken up again.
OUTCOME_TAGS = ("bench.failure", "bench.failure_reason", "bench.failure_epoch", "bench.interrupted_by")

for noisy in ("alembic", "mlflow"):
    process.quiet(noisy)


def resolve_uri(arg: str | None) -> str:
    return arg or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else f"open {uri}"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Where the MLflow UI shows the run: a link on a tracking server (without its credentials),
    else the path to open after the address `mlflow ui` serves (MLflow 3's #/experiments/<id>/runs/<id>)."""
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return path
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}{parts.path.rstrip('/')}/{path}"


def absolute_uri(uri: str) -> str:
    """sqlite:///relative.db made absolute: MLflow caches one store per URI string in a process,
    so a relative path would keep pointing at the directory where it was first opened."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _create_sqlite_store(uri: str) -> None:
    """A new SQLite store's tables made in a file of its own and moved into place when complete:
    MLflow creates them in dozens of migrations, not in one transaction, and a process stopped
    among them (Ctrl-C, a kill) would leave a store that no later process can open ("table
    _alembic_tmp_... already exists"). Called under `_schema_lock`."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or ":memory:" in uri:
        return
    path = Path(uri[len(prefix) :])
    if path.exists() and path.stat().st_size > 0:
        return
    for left in path.parent.glob(f".{path.name}.new-*"):  # of a process stopped while creating it
        left.unlink(missing_ok=True)
    new = path.with_name(f".{path.name}.new-{os.getpid()}")
    MlflowClient(tracking_uri=prefix + str(new)).search_experiments(max_results=1)
    os.replace(new, path)


@contextlib.contextmanager
def _schema_lock(uri: str):
    """Two processes opening a new SQLite store at once both create MLflow's tables, and one
    fails ("duplicate column name"): a file lock beside the database lets one create them first."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or ":memory:" in uri:
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; start one process first there
        yield
        return
    with open(uri[len(prefix) :] + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


NOTE_DIGEST = "bench.note_sha256"  # of the description bench wrote: one that differs was edited in the UI


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# MLflow's own retries of one HTTP request (7 by default, with backoff: about 4 minutes) come
# before bench's: fewer of them let an outage show within seconds and be waited out here, up to
# the outage limit, with the calls kept in order. A user's setting is kept.
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class _Searches:
    """What a Tracker reads of the store: an experiment (made on first use), a cell's run, runs by
    their tags, a metric's steps, the runs a report reads. `client` retries each call through an
    outage of the store."""

    uri: str
    client: delivery.RetryingClient

    def experiment_id(self, name: str, description: str | None = None) -> str:
        """The experiment's id, created on first use; also proves the store is reachable.
        `description` (markdown) becomes the experiment's description in the MLflow UI; a later
        one (the experiment file's [about] changed) replaces it unless a user edited it there."""
        written = {} if description is None else {NOTE: description, NOTE_DIGEST: _digest(description)}
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    return self.client.create_experiment(name, tags=written or None)
                except MlflowException:  # another process created it first: use theirs
                    exp = self.client.get_experiment_by_name(name)
                    if exp is None:
                        raise
            note = exp.tags.get(NOTE)
            ours = note is None or _digest(note) == exp.tags.get(NOTE_DIGEST)  # absent, or as bench wrote it
            if written and note != description and ours:
                for key, value in written.items():
                    self.client.set_experiment_tag(exp.experiment_id, key, value)
            return exp.experiment_id
        except outage.Unavailable:
            raise
        except Exception as exc:  # mlflow raises many types for a bad or unreachable store
            raise unusable("tracking store", self.uri, exc) from None

    def find_cell_run(self, experiment_id: str, cell_tags: dict[str, str]):
        """The newest run of this cell, or None."""
        query = " and ".join(f"tags.`{k}` = '{cell_tags[k]}'" for k in CELL_TAGS)
        runs = self.client.search_runs(
            [experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1
        )
        return runs[0] if runs else None

    def tagged_runs(self, experiment_id: str, tags: dict[str, str]) -> list[dict[str, Any]]:
        """The active (not deleted) runs of the experiment that carry these tags: run_id, status, tags."""
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([experiment_id], filter_string=query, max_results=1000)
        return [{"run_id": r.info.run_id, "status": r.info.status, "tags": dict(r.data.tags)} for r in runs]

    def logged_steps(self, run_id: str, key: str) -> int:
        """The highest step logged for metric `key` in the run (0 if none): a resumed run logs only
        the steps after it, so no step appears twice."""
        return max((m.step for m in self.client.get_metric_history(run_id, key)), default=0)

    def read_runs(self, experiment: str, where: dict[str, str], history: Callable[[str], bool]) -> list[dict[str, Any]]:
        """The runs of an experiment that carry the tags `where` (the server filters them: tuning
        trials and other runs without them are never read) as plain data: info, params, tags and
        the history of each metric for which `history(key)` holds, as (step, value) pairs in step
        order. An experiment that does not exist has no runs."""
        try:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                return []
            query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in sorted(where.items()))
            runs = self.client.search_runs([exp.experiment_id], filter_string=query, max_results=50000)
            return [
                {
                    "run_id": r.info.run_id,
                    "run_name": r.info.run_name,
                    "status": r.info.status,
                    "start_time": r.info.start_time,
                    "params": dict(r.data.params),
                    "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
                    "history": {
                        key: sorted((m.step, m.value) for m in self.client.get_metric_history(r.info.run_id, key))
                        for key in sorted(r.data.metrics)
                        if history(key)
                    },
                }
                for r in runs
            ]
        except Exception as exc:  # mlflow raises many types for a bad or unreachable store
            raise unusable("tracking store", self.uri, exc) from None


class Tracker(_Searches):
    """The tracking store of a command: runs, tags, searches, and each run's background writer.
    Every call waits out an outage of the store (`delivery.RetryingClient`), up to the outage
    limit, then raises `outage.Unavailable`."""

    def __init__(self, uri: str, limit: float | None = None) -> None:
        self.uri = uri
        self.limit = outage.limit_s() if limit is None else limit
        self.what = "tracking server" if urlsplit(uri).scheme in ("http", "https") else "tracking store"
        self._writers: dict[str, delivery.Writer] = {}
        self._monitors: dict[str, SystemMetrics] = {}
        self._environment: set[str] = set()  # runs that get environment.txt when they end
        self._local = threading.local()  # the Watch of a writer's thread
        for key, value in HTTP_RETRIES.items():
            os.environ.setdefault(key, value)
        try:
            with _schema_lock(absolute_uri(uri)):
                _create_sqlite_store(absolute_uri(uri))
                raw = MlflowClient(tracking_uri=absolute_uri(uri))
                raw.search_experiments(max_results=1)  # creates a new store's tables
        except Exception as exc:  # mlflow raises many types for an unsupported, malformed or unreachable URI
            raise unusable("tracking store", uri, exc) from None
        self.client = delivery.RetryingClient(raw, self.retry)

    def retry(self, call: Callable[[], Any], before_again: Callable[[], Any] | None = None) -> Any:
        """`call()`, waiting out an outage of the store (see bench.servers.retry)."""
        return outage.retry(
            call,
            what=self.what,
            url=self.uri,
            limit=getattr(self._local, "limit", self.limit),
            before_again=before_again,
            watch=getattr(self._local, "watch", None),
        )

    @contextlib.contextmanager
    def limited(self, seconds: float):
        """This thread's calls wait for the store `seconds` at most: for what a stop (Ctrl-C,
        SIGTERM, a failure) still tells it, which must not hold the stop up for the outage limit."""
        before = getattr(self._local, "limit", None)
        self._local.limit = min(seconds, self.limit if before is None else before)
        try:
            yield
        finally:
            if before is None:
                del self._local.limit
            else:
                self._local.limit = before

    def writer(self, run_id: str) -> delivery.Writer:
        """The run's background writer; `end_run` drains it before the run ends."""
        if run_id not in self._writers:
            self._writers[run_id] = delivery.Writer(
                what=self.what,
                url=self.uri,
                limit=self.limit,
                on_start=lambda watch: setattr(self._local, "watch", watch),
            )
        return self._writers[run_id]

    def monitor_system(self, run_id: str, interval_s: float) -> SystemMetrics:
        """Start sampling the machine into the run every `interval_s` seconds, until `end_run`.
        A resumed run's samples continue after the steps it has."""
        monitor = SystemMetrics(
            run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=absolute_uri(self.uri)
        )
        monitor.writer, monitor.writer_client = self.writer(run_id), self.client
        monitor.start()
        self._monitors[run_id] = monitor
        return monitor

    def log_environment(self, run_id: str) -> None:
        """The run gets `environment.txt`, torch.utils.collect_env's report, when it ends (however
        it ends); the report is started now, once per process."""
        environment_report()
        self._environment.add(run_id)

    def start_run(self, experiment_id: str, name: str, tags: dict[str, str]) -> str:
        """A new run in the experiment with this id (never the active or default experiment)."""
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        if run.info.experiment_id != experiment_id:
            raise RuntimeError(
                f"MLflow put run {run.info.run_id} in experiment {run.info.experiment_id}, not {experiment_id}"
            )
        return run.info.run_id

    def reopen_run(self, run_id: str, tags: dict[str, str] | None = None) -> None:
        """The run RUNNING again, without the tags of how its last attempt ended (`tags`: the
        run's tags as found): a run that failed or was interrupted and now finishes says so alone."""
        for key in OUTCOME_TAGS:
            if key in (tags or {}):
                self.client.delete_tag(run_id, key)
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))

    def end_run(self, run_id: str, status: str) -> None:
        """Deliver what the run's writer holds, then end the run with `status`. When the store
        stays away past the outage limit the run is left as it is in the store (RUNNING), its
        writer abandoned, and `outage.Unavailable` raised: the same command takes it up again."""
        writer = self._writers.get(run_id)
        monitor = self._monitors.pop(run_id, None)
        try:
            if monitor is not None:
                monitor.finish()  # now: the thread would see the run ended only at its next sample
            if run_id in self._environment:
                self._environment.discard(run_id)
                if writer is not None:
                    writer.submit(_log_text, self.client, run_id, environment_text(), "environment.txt")
                else:
                    _log_text(self.client, run_id, environment_text(), "environment.txt")
            if writer is not None:
                writer.close(limit=getattr(self._local, "limit", None))
        except outage.Unavailable:
            self.abandon(run_id)
            raise
        except BaseException:
            self.abandon(run_id)
            self.client.set_terminated(run_id, status)
            raise
        self._writers.pop(run_id, None)
        self.client.set_terminated(run_id, status)

    def abandon(self, run_id: str) -> None:
        """Forget the run without a call to the store (it is away): its writer's queue is
        dropped (the metrics are in its journal) and its sampling stopped."""
        writer = self._writers.pop(run_id, None)
        monitor = self._monitors.pop(run_id, None)
        self._environment.discard(run_id)
        if monitor is not None:
            monitor._shutdown_event.set()  # not finish(): it waits for the thread, which need not be waited for
        if writer is not None:
            writer.abandon()

    def fetch_checkpoints(self, run_id: str, checkpoint_dir: Path) -> bool:
        """Download the run's checkpoints (last.pt, best.pt) into `checkpoint_dir`, to resume a run
        that another machine started. False when the run has none yet."""
        names = {Path(a.path).name for a in self.client.list_artifacts(run_id, CHECKPOINTS)}
        if "last.pt" not in names:
            return False
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=checkpoint_dir) as tmp:
            for name in sorted(names & {"last.pt", "best.pt"}):
                local = self.client.download_artifacts(run_id, f"{CHECKPOINTS}/{name}", tmp)
                os.replace(local, checkpoint_dir / name)
        return True

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Set several tags of a run in one request."""
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def delete_run(self, run_id: str) -> None:
        """Soft-delete a run: searches and the UI no longer show it."""
        self.client.delete_run(run_id)
