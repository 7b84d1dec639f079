"""A finished run's weights as an MLflow model, and `bench register`.

Each finished cell logs its best checkpoint (the final weights where the recipe holds out no
validation split) as an MLflow LoggedModel named "model", at the step of that checkpoint's epoch,
linked to the run: `bench.models.packaged.ImageClassifier` around the network, so the model takes
uint8 or [0, 1] images and needs no other knowledge. MLflow links the run's metrics at that step
(val_acc, test_acc, best_val_acc, best_test_acc) to the model.

The model is saved in MLflow's pickle format: torch.export's pt2 fixes one input dtype and layout,
and the classifier takes several. bench's model classes are pickled by value, so loading needs
torch and torchvision, not bench.
"""

from __future__ import annotations

import contextlib
import logging
import os

import cloudpickle
import mlflow
import numpy as np
import torch
import torchvision
from mlflow.entities import LoggedModelStatus
from mlflow.environment_variables import MLFLOW_TRACKING_URI
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

import bench.models
from bench import config
from bench.data.cifar import NUM_CLASSES
from bench.errors import UserError
from bench.models import create_model
from bench.models.packaged import ImageClassifier

NAME = "model"
EXAMPLE_IMAGES = 4  # test images stored with the model as its input example


def package(cfg, state_dict: dict[str, torch.Tensor]) -> ImageClassifier:
    """The run's network with `state_dict`, inside its test-time input pipeline, on the CPU."""
    options = dict(cfg.model.options)
    if "weights" in options:
        options["weights"] = "none"  # the checkpoint replaces them: nothing to download or read
    net = create_model(cfg.model.name, num_classes=NUM_CLASSES[cfg.data.dataset], **options)
    net.load_state_dict(state_dict)
    d = cfg.data
    return ImageClassifier(
        net, mean=tuple(d.mean), std=tuple(d.std), image_size=d.image_size,
        batch_statistics=cfg.eval.mode == "train", channels_last=cfg.train.channels_last,
    ).eval()


def logged_model(client: MlflowClient, experiment_id: str, run_id: str):
    """The run's model, or None when it has none yet."""
    found = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{NAME}'", max_results=1)
    return found[0] if found else None


@contextlib.contextmanager
def _bench_models_by_value():
    """Pickle bench's model classes into the file itself, not as references to a package the
    loading machine may lack."""
    cloudpickle.register_pickle_by_value(bench.models)
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(bench.models)


def log(client: MlflowClient, uri: str, run_id: str, cfg, checkpoint_file, epoch: int, example: np.ndarray) -> None:
    """Log the weights in `checkpoint_file` (saved after `epoch`) as the run's model, unless the
    run has one already (a finished run resumed with nothing left to train). One left unfinished
    by a process that died while logging it is deleted and logged anew (MLflow links a model to
    a run once). `example`: a few uint8 test images, N x 32 x 32 x 3."""
    run = client.get_run(run_id)
    found = logged_model(client, run.info.experiment_id, run_id)
    if found is not None:
        if found.status == LoggedModelStatus.READY:
            return
        client.delete_logged_model(found.model_id)
    # Created here, in the run's experiment: Model.log would put a model of a run that is not the
    # thread's active run in the default experiment.
    model_id = client.create_logged_model(run.info.experiment_id, name=NAME, source_run_id=run_id, params=run.data.params).model_id
    model = package(cfg, torch.load(checkpoint_file, map_location="cpu", weights_only=True)["model"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *example.shape[1:]))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES[cfg.data.dataset]))]),
    )
    requirements = [*mlflow.pytorch.get_default_pip_requirements(), f"torchvision=={torchvision.__version__.split('+')[0]}"]
    with _fluent_tracking_uri(uri), _bench_models_by_value(), _pickle_warning_muted():
        mlflow.pytorch.log_model(
            model, name=NAME, model_id=model_id, run_id=run_id, step=epoch, signature=signature,
            input_example=example, pip_requirements=requirements, serialization_format="pickle",
        )


@contextlib.contextmanager
def _fluent_tracking_uri(uri: str):
    """The run's store as MLflow's process-wide tracking URI while the model is logged or
    registered (Model.log and the registry's lookup of a models:/ source read no other), then the
    one before it. MLflow's own switch unsets $MLFLOW_TRACKING_URI on
    the way back when no URI was set in the process: it is put back as it was."""
    env = os.environ.get(MLFLOW_TRACKING_URI.name)
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if env is not None:
            os.environ[MLFLOW_TRACKING_URI.name] = env


class _PickleWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "by Pickle or CloudPickle" not in record.getMessage()


@contextlib.contextmanager
def _pickle_warning_muted():
    """MLflow warns on every pickled model that pt2 is safer: chosen knowingly (see above)."""
    logger, muted = logging.getLogger("mlflow.pytorch"), _PickleWarning()
    logger.addFilter(muted)
    try:
        yield
    finally:
        logger.removeFilter(muted)


def best_run(client: MlflowClient, experiment: str, profile: str, sets: list[str] = ()):
    """The finished run of the recipe's config in `profile` (with the overrides `sets`) whose
    model scores best: on
    validation accuracy (`best_val_acc`) where the recipe holds out a validation split, else on
    the last epoch's test accuracy, the only figure such a run has; the lowest seed on a tie."""
    cfg = config.load(experiment, profile=profile, sets=sets)
    exp = client.get_experiment_by_name(experiment)
    query = f"tags.`bench.experiment` = '{experiment}' and tags.`bench.profile` = '{profile}' and attributes.status = 'FINISHED'"
    finished = client.search_runs([exp.experiment_id], filter_string=query, max_results=1000) if exp is not None else []
    runs = [r for r in finished if r.data.tags.get("bench.config_hash") == cfg.config_hash()]
    if not runs:
        others = f" ({len(finished)} finished runs of other configs: pass the --set keys they ran with)" if finished else ""
        sets_flags = "".join(f" --set {s}" for s in sets)
        raise UserError(f"no finished run of {experiment} (profile {profile}, config {cfg.config_hash()}){others}; train it first: bench run {experiment} --profile {profile}{sets_flags}")
    key = "best_val_acc" if cfg.data.val_size > 0 else "test_acc"
    return max(runs, key=lambda r: (r.data.metrics.get(key, float("-inf")), -int(r.data.tags["bench.seed"]))), key


def register(client: MlflowClient, experiment: str, profile: str, sets: list[str] = ()) -> tuple[str, str, int]:
    """Register the best seed's model under the experiment's name with the alias `profile`:
    (model URI, chosen run's name, version). Registering the same model again adds no version."""
    run, key = best_run(client, experiment, profile, sets)
    model = logged_model(client, run.info.experiment_id, run.info.run_id)
    if model is None or model.status != LoggedModelStatus.READY:
        raise UserError(
            f"run {run.info.run_name} ({run.info.run_id}) has no logged model (a run finished by a bench "
            "older than logged models has none): delete the run in `mlflow ui` and run its cell again"
        )
    try:
        client.get_registered_model(experiment)
    except MlflowException:
        client.create_registered_model(experiment, description=(
            "The best seed of a config of this experiment, one alias per profile: chosen on validation "
            "accuracy, or on the last epoch's test accuracy where the recipe holds out no validation split"))
    try:
        current = client.get_model_version_by_alias(experiment, profile)
    except MlflowException:
        current = None
    if current is not None and current.source == model.model_uri:  # SQLite's registry keeps no model_id
        version = current.version
    else:
        tags = {"bench.seed": run.data.tags["bench.seed"], "bench.config_hash": run.data.tags["bench.config_hash"], "bench.chosen_on": key}
        with _fluent_tracking_uri(client.tracking_uri):  # the registry finds a models:/ source there
            version = client.create_model_version(experiment, source=model.model_uri, run_id=run.info.run_id, tags=tags, model_id=model.model_id).version
        client.set_registered_model_alias(experiment, profile, version)
    return f"models:/{experiment}@{profile}", run.info.run_name, int(version)
