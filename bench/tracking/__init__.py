"""bench.tracking: MLflow, and the only package that imports it.

- store: the tracking store (URIs, a new SQLite store made safely, experiments, runs, searches):
  `Tracker`
- run: `MlflowRun`, the callback that logs a fit (params, metrics each epoch, checkpoints, the
  model, datasets)
- delivery: a run's calls in order, journaled, through outages of the store
- environment: environment tags, collect_env's report, system metrics
- datasets: a run's data as MLflow datasets
- artifacts: checkpoints pinned and linked into a run's artifacts, small texts
- model: a finished run's logged model, and `bench register`
- probe: whether the tracking store answers and, on a server, lets this process in
"""

from bench.tracking import delivery, model, probe, store  # noqa: F401
from bench.tracking.artifacts import CHECKPOINTS, drop_pinned, local_artifact_dir  # noqa: F401
from bench.tracking.datasets import (  # noqa: F401
    CONTEXTS,
    DUPLICATE_KEY,
    INPUT_ATTEMPTS,
    ImageSplit,
    dataset_inputs,
    log_datasets,
)
from bench.tracking.environment import (  # noqa: F401
    ENVIRONMENT_WAIT_S,
    SystemMetrics,
    environment_report,
    environment_tags,
    environment_text,
    git_commit,
)
from bench.tracking.run import MlflowRun  # noqa: F401
from bench.tracking.store import (  # noqa: F401
    CELL_TAGS,
    DEFAULT_URI,
    HTTP_RETRIES,
    NOTE,
    NOTE_DIGEST,
    OUTCOME_TAGS,
    Tracker,
    absolute_uri,
    resolve_uri,
    run_url,
    ui_command,
)
