"""MLflow: the only module that imports mlflow. Runs, params, tags, metrics, artifacts, resume.

One MLflow experiment per bench experiment and one run per (experiment, profile, seed, config
hash): the tags identify the cell, so a second `bench run` finds a finished run and skips it, or
an unfinished one and continues it under the same run id.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout  # the built-in one from Python 3.11 only
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlsplit
from urllib.request import url2pathname

import mlflow
import numpy as np
import torch
import torchvision
from mlflow.data.dataset import Dataset
from mlflow.data.schema import TensorDatasetSchema
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from torch.utils.collect_env import get_pretty_env_info

from bench import console, engine
from bench.engine.callbacks import Callback
from bench.errors import reason, unusable
from bench.servers import retry as outage
from bench.servers.urls import redact
from bench.tracking import delivery
from bench.tracking import model as logged_model

log = logging.getLogger(__name__)
DEFAULT_URI = "sqlite:///mlflow.db"
NOTE = "mlflow.note.content"  # an experiment's or a run's description (markdown) in the MLflow UI
CELL_TAGS = ("bench.experiment", "bench.profile", "bench.seed", "bench.config_hash")
# How an attempt at a run ended, when it did not finish: cleared when the run is taken up again.
OUTCOME_TAGS = ("bench.failure", "bench.failure_reason", "bench.failure_epoch", "bench.interrupted_by")

for noisy in ("alembic", "mlflow"):
    console.quiet(noisy)


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


def _git(*args: str) -> str | None:
    """The output of a git command in the package's checkout; None outside one or without git."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    return _git("rev-parse", "HEAD")


def environment_tags(device_name: str) -> dict[str, str]:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    tags = {
        "bench.python": platform.python_version(),
        "bench.torch": torch.__version__,
        "bench.torchvision": torchvision.__version__,
        "bench.numpy": np.__version__,
        "bench.mlflow": mlflow.__version__,
        "bench.optuna": metadata.version("optuna"),  # not imported: tracking has no use for optuna
        "bench.cuda": torch.version.cuda or "none",  # the CUDA torch was built with
        "bench.cudnn": str(cudnn) if cudnn else "none",
        "bench.device": device_name,
        "bench.threads": str(torch.get_num_threads()),  # the CPU's numbers depend on it (and so does its speed)
    }
    commit = git_commit()
    if commit:
        tags["bench.git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
        # Changes not committed (untracked files too, outside .gitignore): the commit alone does
        # not say what ran.
        status = _git("status", "--porcelain")
        tags["bench.git_dirty"] = "unknown" if status is None else str(bool(status)).lower()
    return tags


ENVIRONMENT_WAIT_S = 20.0  # the longest a run's end waits for the environment report


@functools.cache
def environment_report() -> Future:
    """torch.utils.collect_env's report of this machine (the run's environment.txt), made once per
    process on a thread of its own: it takes seconds (1-5 s on a 2-core CPU, mostly the commands it
    starts: pip, lscpu, nvidia-smi), so it is started early and read when a run ends. A daemon
    thread: a command it starts that hangs cannot keep the process from exiting."""
    future: Future = Future()

    def make() -> None:
        try:
            future.set_result(get_pretty_env_info())
        except BaseException as exc:  # noqa: BLE001 - whatever it raised is the report's text
            future.set_exception(exc)

    threading.Thread(target=make, name="collect-env", daemon=True).start()
    return future


def environment_text() -> str:
    """The environment report, or why there is none: collect_env fails on some machines (a
    command's output it cannot decode) and its commands can hang; neither may change how a run ends."""
    try:
        return environment_report().result(timeout=ENVIRONMENT_WAIT_S)
    except FutureTimeout:
        return f"torch.utils.collect_env did not finish within {ENVIRONMENT_WAIT_S:g} s\n"
    except Exception as exc:  # noqa: BLE001 - any failure of the report is its text
        return f"torch.utils.collect_env failed: {type(exc).__name__}: {exc}\n"


class SystemMetrics(SystemMetricsMonitor):
    """MLflow's system metrics monitor (metrics `system/...`: CPU, memory, disk, network, and GPUs
    through pynvml) with the CPU time its thread spent, in `cpu_s` once it has stopped: what
    sampling costs the run (`bench perf` counts it with the tracking time). Its samples go through
    the run's writer, in order with the run's other calls, and wait out an outage with them."""

    cpu_s = 0.0
    writer: delivery.Writer | None = None

    def publish_metrics(self, metrics: dict[str, float]) -> None:
        prefix = self._metrics_prefix + (self.node_id + "/" if self.node_id else "")
        ts = int(time.time() * 1000)
        batch = [Metric(prefix + k, float(v), ts, self._logging_step) for k, v in metrics.items()]
        self.writer.submit(self.writer_client.log_batch, self._run_id, metrics=batch, weight=len(batch))
        self._logging_step += 1
        for monitor in self.monitors:
            monitor.clear_metrics()

    def monitor(self) -> None:
        try:
            self._sample()
            if self._shutdown_event.is_set():
                # MLflow's loop drops the samples taken since its last publication when it is
                # stopped: a run shorter than one interval would have no system metrics at all.
                last = self.aggregate_metrics()
                if last:
                    self.publish_metrics(last)
        except Exception as exc:  # noqa: BLE001 - sampling must never take the run down
            log.warning("system metrics of run %s: %s", self._run_id, exc)
        finally:
            self.cpu_s = time.thread_time()

    def _sample(self) -> None:
        """MLflow's loop, less its look at the run after every sample (a call to the store that
        would end sampling at the first outage): the run's end stops it (`finish`)."""
        while not self._shutdown_event.is_set():
            for _ in range(self.samples_before_logging):
                self.collect_metrics()
                if self._shutdown_event.wait(self.sampling_interval):
                    return
            self.publish_metrics(self.aggregate_metrics())


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


class Tracker:
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
        """`call()`, waiting out an outage of the store (see bench.outage)."""
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

    def logged_steps(self, run_id: str, key: str) -> int:
        """The highest step logged for metric `key` in the run (0 if none): a resumed run logs only
        the steps after it, so no step appears twice."""
        return max((m.step for m in self.client.get_metric_history(run_id, key)), default=0)

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

    def tagged_runs(self, experiment_id: str, tags: dict[str, str]) -> list[dict[str, Any]]:
        """The active (not deleted) runs of the experiment that carry these tags: run_id, status, tags."""
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([experiment_id], filter_string=query, max_results=1000)
        return [{"run_id": r.info.run_id, "status": r.info.status, "tags": dict(r.data.tags)} for r in runs]

    def delete_run(self, run_id: str) -> None:
        """Soft-delete a run: searches and the UI no longer show it."""
        self.client.delete_run(run_id)

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


CHECKPOINTS = "checkpoints"  # the run's latest last.pt and best.pt: its final weights, or where to resume
CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}  # MLflow's dataset contexts by part


class ImageSplit(Dataset):
    """A part of a run's data (bench.data.Part) as an MLflow dataset: name, source (the folder of
    its files), digest, the images' and labels' tensor schema and, as its profile, its counts. The
    images stay where they are: the digest is the data module's."""

    def __init__(self, part) -> None:
        self.part = part
        super().__init__(source=LocalArtifactDatasetSource(part.source), name=part.name)

    def _compute_digest(self) -> str:
        return self.part.digest

    @property
    def profile(self) -> dict[str, int]:
        return {"num_rows": self.part.images, "num_classes": self.part.classes}

    @property
    def schema(self) -> TensorDatasetSchema:
        return TensorDatasetSchema(
            features=Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, 32, 32), "image")]),
            targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "label")]),
        )

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "schema": json.dumps(self.schema.to_dict()), "profile": json.dumps(self.profile)}


def dataset_inputs(parts: dict[str, Any], logged: set[tuple[str, str]] = frozenset()) -> list[DatasetInput]:
    """The parts (bench.data.Part by "train", "val", "test") as MLflow dataset inputs with their
    context, leaving out those `logged` already, by (name, digest)."""
    return [
        DatasetInput(ImageSplit(part)._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, CONTEXTS[key])])
        for key, part in parts.items()
        if (part.name, part.digest) not in logged
    ]


# What the stores say when two runs of one experiment add the same dataset at once: MLflow looks the
# dataset up, then inserts it, and the second insert breaks the key (PostgreSQL, MySQL, SQLite).
DUPLICATE_KEY = ("duplicate key", "UniqueViolation", "UNIQUE constraint failed", "Duplicate entry", "IntegrityError")
INPUT_ATTEMPTS = 4


def log_datasets(client: MlflowClient, run_id: str, parts: dict[str, Any]) -> None:
    """Link the run to its datasets (bench.data.Part by "train", "val", "test"), those it has not
    already. Shards and workers start runs of one experiment at the same moment with the same
    data, and the loser of MLflow's look-up-then-insert race gets a duplicate-key error with its
    whole call rolled back: it looks again at what the run holds and sends the rest, so the
    dataset row the winner made is linked and no input is logged twice."""
    for attempt in range(1, INPUT_ATTEMPTS + 1):
        logged = {(d.dataset.name, d.dataset.digest) for d in client.get_run(run_id).inputs.dataset_inputs}
        inputs = dataset_inputs(parts, logged)
        if not inputs:
            return
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except Exception as exc:
            if attempt == INPUT_ATTEMPTS or not any(k in str(exc) for k in DUPLICATE_KEY):
                raise
            log.debug("datasets of run %s met another run's at once (%s); again", run_id, exc)
            time.sleep(0.1 * attempt)


class MlflowRun(Callback):
    """Logs one engine fit into one MLflow run: params, per-epoch metrics, checkpoints.

    Every call goes through the run's background `Writer`: one batched call per epoch, queued, so
    the step never waits for the store. The queue is drained at each checkpoint (what the store
    holds is then at least as new as the checkpoint before it) and when the run ends. A resumed
    run logs only the epochs and steps after those already in the store, so no step is logged twice.

    While the store is away, training goes on and the calls wait in the queue; checkpoints do not
    wait for them. Each epoch's metrics are also written to the run's `journal` (a file beside its
    checkpoints) before its checkpoint, and dropped once the store has them. Once the store has been
    away for the outage limit, the fit stops at the end of the epoch with its checkpoint written and
    `on_fit_end` raises `outage.Unavailable`; the next attempt sends the journal's metrics first.
    """

    def __init__(
        self,
        tracker: Tracker,
        run_id: str,
        cfg,
        extra_tags: dict[str, str] | None = None,
        *,
        log_checkpoints: bool = True,
        model_example: np.ndarray | None = None,
        datasets: dict[str, Any] | None = None,
        journal: Path | None = None,
    ) -> None:
        self.tracker, self.client, self.run_id, self.cfg = tracker, tracker.client, run_id, cfg
        self.writer = tracker.writer(run_id)
        self.extra_tags = extra_tags or {}
        self.log_checkpoints = log_checkpoints  # tuning trials keep their metrics, not their weights
        # A few uint8 test images (N x 32 x 32 x 3): a finished run logs its model with them as the
        # input example; None logs no model.
        self.model_example = model_example
        self.datasets = (
            datasets or {}
        )  # the data's parts (bench.data.Part) the run trains and evaluates on, by "train", "val", "test"
        self.monitor: SystemMetrics | None = None  # sampling the machine while the run trains (train.system_metrics)
        self._best: Path | None = None  # a best checkpoint written since the last upload
        self._logged_epoch = self._logged_step = 0
        self._steps: list[Metric] = []  # train_step_loss values, sent with the epoch's batch
        self.journal = delivery.Journal(journal) if journal is not None else None
        self._stopped_by_outage: float | None = None  # how long the store had been away when the fit was stopped

    def on_fit_start(self, *, start_epoch: int, epochs: int) -> None:
        # Whatever epoch the fit starts from: a run stopped before its first checkpoint (or some
        # epochs after its last one) has logged epochs that it now trains again. Those its journal
        # holds count as logged: they are sent first.
        held = self.journal.held() if self.journal is not None else []
        in_journal = lambda key: max((m.step for _, batch in held for m in batch if m.key == key), default=0)  # noqa: E731
        self._logged_epoch = max(self.tracker.logged_steps(self.run_id, "train_loss"), in_journal("train_loss"))
        self._logged_step = max(
            self.tracker.logged_steps(self.run_id, "train_step_loss"), in_journal("train_step_loss")
        )
        for n, batch in held:
            self.writer.submit(self._send_again, batch, weight=len(batch))
            self.writer.submit(self.journal.sent, n)
        if self.cfg.train.system_metrics:
            self.monitor = self.tracker.monitor_system(self.run_id, self.cfg.train.system_metrics_interval_s)
        # MLflow params are written once. A resumed cell (same config hash) may differ from its
        # run in settings that change no result (train.compile, the checkpoint interval, ...):
        # the params keep the values the run started with, bench.resumed_with the new ones.
        run = self.client.get_run(self.run_id)
        logged = run.data.params
        changed = {k: v for k, v in self.cfg.params().items() if logged.get(k, v) != v}
        params = [Param(k, v) for k, v in self.cfg.params().items() if k not in changed]
        tags = [RunTag(k, v) for k, v in self.extra_tags.items()]
        if changed:
            tags.append(RunTag("bench.resumed_with", ", ".join(f"{k}={v}" for k, v in changed.items())))
        # MLflow caps one batch at 100 params; the resolved config is about 40 keys.
        for i in range(0, len(params), 100):
            self.writer.submit(
                self.client.log_batch, self.run_id, params=params[i : i + 100], tags=tags if i == 0 else []
            )
        # A resumed run has its datasets already (unless its data changed since).
        if dataset_inputs(self.datasets, {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}):
            self.writer.submit(log_datasets, self.client, self.run_id, self.datasets)

    def on_train_steps(self, step: int, metrics: dict[str, float]) -> None:
        if step > self._logged_step:
            ts = int(time.time() * 1000)
            self._steps += [Metric(k, float(v), ts, step) for k, v in metrics.items()]

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> bool:
        ts = int(time.time() * 1000)
        batch = self._steps + (
            [Metric(k, float(v), ts, epoch) for k, v in metrics.items()] if epoch > self._logged_epoch else []
        )
        self._steps = []
        n = self.journal.add(batch) if self.journal is not None and batch else None
        # MLflow caps one batch at 1000 metrics.
        for i in range(0, len(batch), 1000):
            self.writer.submit(
                self.client.log_batch, self.run_id, metrics=batch[i : i + 1000], weight=len(batch[i : i + 1000])
            )
        if n is not None:
            self.writer.submit(self.journal.sent, n)
        down = self.writer.down_s()
        if down >= self.writer.limit:
            self._stopped_by_outage = down
            log.error(
                "%s: the %s %s has not answered for %.0f s: stopping after epoch %d with its checkpoint",
                self.run_id,
                self.tracker.what,
                redact(self.tracker.uri),
                down,
                epoch,
            )
            return True
        return False

    def _send_again(self, batch: list[Metric]) -> None:
        """A batch from the journal: it may have reached the store before the last attempt ended."""
        left = delivery.unlogged(self.client, self.run_id, batch)
        if left:
            self.client.log_batch(self.run_id, metrics=left)

    def on_checkpoint(self, kind: str, path: Path, epoch: int) -> None:
        """Each "last" checkpoint (with the best one, when it changed since) replaces the run's
        artifacts checkpoints/last.pt and best.pt: the run can be resumed on another machine, and
        once it ends they are its final and best weights. The upload runs in the background; the
        metrics logged before it are flushed first."""
        if kind == "best":
            self._best = path
        if kind != "last":
            return
        # During an outage the checkpoint does not wait: the journal holds the epochs' metrics.
        if self.writer.flush(through_outage=False) and self.journal is not None:
            self.journal.compact()
        if not self.log_checkpoints:
            return
        for written in [path] + ([self._best] if self._best is not None else []):
            self.writer.submit(_log_pinned, self.client, self.run_id, _pin(Path(written)), CHECKPOINTS)
        self._best = None

    def on_fit_end(self, result) -> None:
        if self._stopped_by_outage is not None:  # what is left is sent by the next attempt
            raise outage.Unavailable(
                self.tracker.what,
                self.tracker.uri,
                max(self._stopped_by_outage, self.writer.down_s()),
                self.writer.limit,
            )
        config_json = json.dumps(self.cfg.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
        self.writer.submit(_log_text, self.client, self.run_id, config_json, "config.json")
        self._log_summary(result)
        if result.status == "finished" and self.log_checkpoints and self.model_example is not None:
            # After the summary in the same queue: the metrics at the model's step are in the
            # store when the model is linked to them.
            best = result.best_epoch is not None
            file = result.checkpoint_dir / (engine.BEST if best else engine.LAST)
            epoch = result.best_epoch if best else result.epochs_done
            self.writer.submit(self._log_model, file, epoch)
            uploaded = threading.Event()
            self.writer.submit(uploaded.set)
            self._wait_for(uploaded)
        self.writer.flush()
        if self.journal is not None:
            self.journal.compact()

    def _log_model(self, file: Path, epoch: int) -> None:
        """Log the run's model. Training has finished and its metrics are right: an error here
        (a full disk, the store) leaves the run FINISHED, tagged with the reason, and `bench
        register` logs the model from the run's checkpoints later. An outage past the limit is
        not such an error: the run is taken up again and logs its model then."""
        try:
            logged_model.log(self.client, self.run_id, self.cfg, file, epoch, self.model_example)
        except outage.Unavailable:
            raise
        except Exception as exc:
            log.warning(
                "run %s: its model was not logged (%s); `bench register` logs it from the run's checkpoints",
                self._run_name(),
                reason(exc),
            )
            self.client.set_tag(self.run_id, logged_model.MODEL_ERROR, reason(exc))

    def _wait_for(self, uploaded: threading.Event) -> None:
        """Wait for the model's upload, saying so when it takes more than a second or an
        interruption (Ctrl-C) has to wait for it: the run ends after its queue."""
        try:
            if uploaded.wait(1.0):
                return
        except KeyboardInterrupt:
            log.warning("finishing the model upload of %s ...", self._run_name())
            raise
        log.info("finishing the model upload of %s ...", self._run_name())

    def _run_name(self) -> str:
        return self.client.get_run(self.run_id).info.run_name

    def _log_summary(self, result) -> None:
        summary: dict[str, Any] = {"bench.status": result.status, "bench.epochs_done": str(result.epochs_done)}
        if result.best_epoch is not None:
            summary.update({"bench.best_epoch": str(result.best_epoch), "bench.best_split": "val"})
        if result.status == "nonfinite":
            summary.update({"bench.failure": "nonfinite_loss", "bench.failure_epoch": str(result.nonfinite_epoch)})
        self.writer.submit(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in summary.items()])
        # A run killed after its last epoch is resumed with nothing left to train: its best
        # metrics may already be in the store at the same step.
        if (
            result.best_epoch is not None
            and self.tracker.logged_steps(self.run_id, "best_val_acc") != result.best_epoch
        ):
            ts, step = int(time.time() * 1000), result.best_epoch
            best = {"best_val_acc": result.best_val_acc, "best_test_acc": result.best_test_acc}
            metrics = [Metric(k, float(v), ts, step) for k, v in best.items() if v is not None]
            self.writer.submit(self.client.log_batch, self.run_id, metrics=metrics)


def _pin(path: Path) -> Path:
    """The file as it is now, under its own name in a new folder beside it (a hard link, else a
    copy): the engine may replace `path` with a newer checkpoint before the upload reads it."""
    folder = Path(tempfile.mkdtemp(prefix=".upload-", dir=path.parent))
    pinned = folder / path.name
    try:
        os.link(path, pinned)
    except OSError:  # a file system without hard links
        shutil.copy2(path, pinned)
    return pinned


def drop_pinned(folder: Path) -> None:
    """Remove the files `_pin` made for uploads that will not happen (their writer was abandoned,
    or their process killed): they hold old checkpoints."""
    for pinned in Path(folder).glob(".upload-*"):
        shutil.rmtree(pinned, ignore_errors=True)


def _log_pinned(client: MlflowClient, run_id: str, pinned: Path, artifact_path: str) -> None:
    try:
        if not _link_artifact(client, run_id, pinned, artifact_path):
            client.log_artifact(run_id, str(pinned), artifact_path=artifact_path)
    finally:
        shutil.rmtree(pinned.parent, ignore_errors=True)


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The folder of a run's artifacts when they are files on this machine (a path, or a file:
    URI without a remote host); None for any other store (a tracking server's proxy, S3, ...)."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a path (C:\... on Windows)
        return Path(artifact_uri)
    return None


def _link_artifact(client: MlflowClient, run_id: str, file: Path, artifact_path: str) -> bool:
    """Where the run's artifacts are files on this machine, `file` hard-linked into them in place
    of the old one: the same bytes, not a second copy of them (checkpoints run to hundreds of MB,
    and the engine only ever replaces its files, never rewrites them). False where the artifacts
    are elsewhere or no link can be made (another file system): then MLflow copies the file."""
    folder = local_artifact_dir(client.get_run(run_id).info.artifact_uri)
    if folder is None:
        return False
    dest = folder / artifact_path / file.name
    tmp = dest.with_name(f".{dest.name}.link")  # one trainer per run: one link made at a time
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a process killed between the link and the rename
        os.link(file, tmp)
    except OSError:
        return False
    os.replace(tmp, dest)
    return True


def _log_text(client: MlflowClient, run_id: str, text: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        client.log_artifact(run_id, str(path))
