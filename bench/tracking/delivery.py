"""Getting a run's records into MLflow exactly once, through outages of the tracking server.

- `RetryingClient`: an MlflowClient whose calls wait out an outage (bench.outage: backoff, up to
  the outage limit). A call whose reply was lost may have been done: before it is sent again, what
  it wrote is read back, so that no metric step, run or model is written twice.
- `Writer`: a run's calls made in order on a background thread, so that training goes on while
  the server is away; bounded in memory (a full queue makes training wait).
- `Journal`: the run's metric batches on disk beside its checkpoint until the store has them, so
  that a run stopped (or killed) during an outage delivers them when it is taken up again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

from bench.servers import retry as outage

log = logging.getLogger(__name__)

# At most this many records (metric values, params, tags) wait in a run's queue; past it, the
# training thread waits for the server (an outage of hours with per-step metrics).
CAPACITY = 200_000


class Watch:
    """When the calls of one thread started failing (None while they succeed)."""

    since: float | None = None


def unlogged(client: MlflowClient, run_id: str, metrics: list[Metric]) -> list[Metric]:
    """The metrics whose (key, step) the run does not hold yet."""
    held = {key: {m.step for m in client.get_metric_history(run_id, key)} for key in {m.key for m in metrics}}
    return [m for m in metrics if m.step not in held[m.key]]


class RetryingClient:
    """The calls of an MlflowClient, each retried through an outage of the store (`retry`).

    MLflow's own HTTP retries resend a request whose reply was lost as it is; its SQL stores drop a
    metric sent twice with the same timestamp and value, but not a run, a model or a link sent
    twice. Here the calls that create something read back before they are sent again."""

    def __init__(self, client: MlflowClient, retry: Callable[..., Any]) -> None:
        self._client, self._retry = client, retry

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._retry(lambda: attr(*args, **kwargs))

        call.__name__ = name
        return call

    def log_batch(self, run_id: str, metrics=(), params=(), tags=(), **kwargs: Any) -> None:
        pending = list(metrics)

        def again():
            # Params and tags are the same when set twice; a metric step may not be logged twice.
            nonlocal pending
            # Metrics linked to a model are logged again at their steps on purpose (the model's
            # metrics): those are sent as they are; the store drops an identical one.
            if pending and not any(getattr(m, "model_id", None) for m in pending):
                pending = unlogged(self._client, run_id, pending)
            return True if not (pending or params or tags) else None

        return self._retry(
            lambda: self._client.log_batch(run_id, metrics=pending, params=list(params), tags=list(tags), **kwargs),
            before_again=again,
        )

    def create_run(
        self, experiment_id: str, start_time: int | None = None, tags: dict | None = None, run_name: str | None = None
    ):
        start_time = start_time or get_current_time_millis()  # what tells this run from another of the same name

        def again():
            found = self._client.search_runs(
                [experiment_id], filter_string=f"attributes.start_time = {start_time}", max_results=100
            )
            for run in found:
                if run.info.run_name == run_name and all(run.data.tags.get(k) == v for k, v in (tags or {}).items()):
                    return run
            return None

        return self._retry(
            lambda: self._client.create_run(experiment_id, start_time=start_time, tags=tags, run_name=run_name),
            before_again=again,
        )

    def delete_tag(self, run_id: str, key: str) -> None:
        def again():
            return True if key not in self._client.get_run(run_id).data.tags else None

        return self._retry(lambda: self._client.delete_tag(run_id, key), before_again=again)

    def create_logged_model(self, experiment_id: str, *, name: str, source_run_id: str, **kwargs: Any):
        def again():
            found = self._client.search_logged_models(
                [experiment_id], filter_string=f"source_run_id = '{source_run_id}' AND name = '{name}'", max_results=1
            )
            return found[0] if found else None

        return self._retry(
            lambda: self._client.create_logged_model(experiment_id, name=name, source_run_id=source_run_id, **kwargs),
            before_again=again,
        )

    def log_outputs(self, run_id: str, models) -> None:
        def again():
            run = self._client.get_run(run_id)
            linked = {o.model_id for o in (run.outputs.model_outputs if run.outputs else [])}
            return True if all(m.model_id in linked for m in models) else None

        return self._retry(lambda: self._client.log_outputs(run_id, models), before_again=again)


@dataclass
class _Call:
    run: Callable[[], Any]
    weight: int  # records it writes


class Writer:
    """MLflow calls for one run, made in order on a background thread, so that training never
    waits for the store: while it is away, they wait in the queue and each is retried (through
    the tracker's `RetryingClient`) until it is back or the outage limit has passed.

    `flush()` waits for every call queued so far and raises the first error; `down_s()` says how
    long the writer's current call has been failing."""

    def __init__(
        self,
        watch: Watch | None = None,
        *,
        what: str = "tracking store",
        url: str = "",
        limit: float | None = None,
        capacity: int = CAPACITY,
        on_start: Callable[[Watch], None] = lambda watch: None,
    ) -> None:
        self.watch, self.what, self.url = watch or Watch(), what, url
        self._on_start = on_start  # makes the thread's calls report to `watch`
        self.limit = outage.limit_s() if limit is None else limit
        self.capacity = capacity
        self._cond = threading.Condition()
        self._queue: deque[_Call] = deque()
        self._weight = 0
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="mlflow-writer", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[..., Any], *args: Any, weight: int = 1, **kwargs: Any) -> None:
        with self._cond:
            while self._weight and self._weight + weight > self.capacity and not self._closed:
                self._check()
                self._cond.wait(1.0)
            self._queue.append(_Call(lambda: call(*args, **kwargs), weight))
            self._weight += weight
            self._cond.notify_all()

    def down_s(self) -> float:
        since = self.watch.since
        return 0.0 if since is None else time.monotonic() - since

    def _check(self, limit: float | None = None) -> None:
        """Raise the outage that ended the writer's deliveries, or one longer than the limit."""
        limit = self.limit if limit is None else limit
        if isinstance(self._error, outage.Unavailable):
            raise self._error
        if self.down_s() >= limit:
            raise outage.Unavailable(self.what, self.url, self.down_s(), limit)

    def flush(self, *, through_outage: bool = True, limit: float | None = None) -> bool:
        """Wait until every call queued so far is made; raise the first error. During an outage
        `through_outage=False` returns False at once (the calls stay queued); otherwise it waits
        for the store, up to the outage limit or `limit` (then `outage.Unavailable`)."""
        with self._cond:
            while self._queue and self._error is None:
                if self.watch.since is not None:
                    if not through_outage:
                        return False
                    self._check(limit)
                self._cond.wait(0.5)
            if self._error is not None:
                error, self._error = self._error, None
                if isinstance(error, outage.Unavailable):
                    self._error = error  # the writer delivers nothing more
                raise error
        return True

    def close(self, limit: float | None = None) -> None:
        try:
            self.flush(limit=limit)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Stop delivering: the calls still queued are dropped (their metrics are in the run's
        journal, when it has one). A call being made when this is called may still land."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._weight = 0
            self._cond.notify_all()

    def _work(self) -> None:
        self._on_start(self.watch)
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                item = self._queue[0]
                stalled = isinstance(self._error, outage.Unavailable)
            if stalled:  # the store stayed away past the limit: nothing more is sent
                with self._cond:
                    self._cond.wait(1.0)
                continue
            try:
                item.run()
            except BaseException as exc:  # noqa: BLE001 - raised to the training thread at the next flush
                with self._cond:
                    if self._error is None or isinstance(exc, outage.Unavailable):
                        self._error = exc
            with self._cond:
                if self._queue and self._queue[0] is item:
                    self._queue.popleft()
                    self._weight -= item.weight
                self._cond.notify_all()


class Journal:
    """A run's metric batches, appended (and fsynced) to a file in its checkpoint directory before
    the checkpoint of their epoch is written, and dropped once the store has them.

    A run that stops during an outage, or is killed with batches still queued, has its later
    checkpoint on disk and those epochs' metrics nowhere else: the next attempt sends what the
    journal holds and the store lacks (by key and step) before it trains."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._mend()
        self._sent = 0  # batches up to this number are in the store
        self._next = 1 + max((b["n"] for b in self._read()), default=0)

    def _mend(self) -> None:
        """Cut a line a killed process left half written: what is appended next starts a line."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def _read(self) -> list[dict]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        batches = []
        for line in lines:
            try:
                batches.append(json.loads(line))
            except ValueError:  # the last line of a process killed while writing it
                log.warning("%s: a line cut short is skipped", self.path)
        return batches

    def held(self) -> list[tuple[int, list[Metric]]]:
        """The batches not known to be in the store, oldest first, with their numbers."""
        return [
            (b["n"], [Metric(k, v, ts, step) for k, v, ts, step in b["metrics"]])
            for b in self._read()
            if b["n"] > self._sent
        ]

    def add(self, metrics: list[Metric]) -> int:
        """Append a batch; returns its number, for `sent`."""
        with self._lock:
            n, self._next = self._next, self._next + 1
            line = json.dumps(
                {"n": n, "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics]}, allow_nan=True
            )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
            return n

    def sent(self, n: int) -> None:
        """Every batch up to number `n` is in the store (the writer sends them in order)."""
        with self._lock:
            self._sent = max(self._sent, n)

    def compact(self) -> None:
        """Drop the batches the store has: the file goes once it holds none."""
        with self._lock:
            left = [b for b in self._read() if b["n"] > self._sent]
            if not left:
                self.path.unlink(missing_ok=True)
                return
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(b, allow_nan=True) + "\n" for b in left))
            with open(tmp) as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
