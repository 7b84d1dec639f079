"""The callback that logs one engine fit into one MLflow run: params, metrics each epoch (through
the run's journal), checkpoints, datasets, and a finished run's model."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param, RunTag

from bench import engine
from bench.engine.callbacks import Callback
from bench.errors import reason, redact
from bench.servers import retry as outage
from bench.tracking import delivery
from bench.tracking import model as logged_model
from bench.tracking.artifacts import CHECKPOINTS, _log_pinned, _log_text, _pin
from bench.tracking.datasets import dataset_inputs, log_datasets
from bench.tracking.environment import SystemMetrics
from bench.tracking.store import Tracker

log = logging.getLogger(__name__)


class _FitEnd:
    """What MlflowRun sends when the fit ends: config.json, the summary tags and best metrics, and
    a finished run's model, waited for before the run ends."""

    tracker: Tracker
    client: delivery.RetryingClient
    writer: delivery.Writer
    journal: delivery.Journal | None
    run_id: str
    cfg: Any
    log_checkpoints: bool
    model_example: np.ndarray | None
    _stopped_by_outage: float | None

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


class MlflowRun(_FitEnd, Callback):
    """Logs one engine fit into one MLflow run: params, per-epoch metrics, checkpoints (what the
    fit's end sends is `_FitEnd`'s).

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
        self._resume()
        if self.cfg.train.system_metrics:
            self.monitor = self.tracker.monitor_system(self.run_id, self.cfg.train.system_metrics_interval_s)
        self._log_params_and_datasets()

    def _resume(self) -> None:
        """The epochs and steps the run has logged, and its journal's batches sent again first."""
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

    def _log_params_and_datasets(self) -> None:
        """The config as params, the extra tags, and the datasets the run does not have yet."""
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
