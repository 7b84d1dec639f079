"""bench.tracking."""

from bench.tracking import delivery, model, store  # noqa: F401
from bench.tracking.store import DEFAULT_URI, NOTE, CELL_TAGS, OUTCOME_TAGS, resolve_uri, ui_command, run_url, git_commit, environment_tags, ENVIRONMENT_WAIT_S, environment_report, environment_text, SystemMetrics, absolute_uri, NOTE_DIGEST, HTTP_RETRIES, Tracker, CHECKPOINTS, CONTEXTS, ImageSplit, dataset_inputs, DUPLICATE_KEY, INPUT_ATTEMPTS, log_datasets, MlflowRun, drop_pinned, local_artifact_dir  # noqa: F401
