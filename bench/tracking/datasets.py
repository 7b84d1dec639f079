"""A run's data as MLflow datasets: each part (train, val, test) with its source, digest, schema
and counts, linked to the run once."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
from mlflow.data.dataset import Dataset
from mlflow.data.schema import TensorDatasetSchema
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

log = logging.getLogger(__name__)
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
