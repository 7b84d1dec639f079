"""What a run records of the machine and the code it ran on: environment tags (versions, device,
threads, git commit), torch.utils.collect_env's report, and MLflow's system metrics."""

from __future__ import annotations

import functools
import logging
import platform
import subprocess
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout  # the built-in one from Python 3.11 only
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import torch
import torchvision
from mlflow.entities import Metric
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from torch.utils.collect_env import get_pretty_env_info

from bench.tracking import delivery

log = logging.getLogger(__name__)


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
