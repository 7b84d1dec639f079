"""A finished run's weights as an MLflow model, and `bench register`.

Each finished cell logs its best checkpoint (the final weights where the recipe holds out no
validation split) as an MLflow LoggedModel named "model", at the step of that checkpoint's epoch,
linked to the run: `bench.models.packaged.ImageClassifier` around the network, so the model takes
uint8 or [0, 1] images and needs no other knowledge. The run's metrics at that step (val_acc,
test_acc, best_val_acc, best_test_acc) are linked to the model.

The model is saved in MLflow's pickle format: torch.export's pt2 fixes one input dtype and layout,
and the classifier takes several. bench's model classes are pickled by value, so loading needs
torch and torchvision, not bench.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import cloudpickle
import mlflow
import numpy as np
import torch
import torchvision
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.environment_variables import MLFLOW_TRACKING_URI
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from mlflow.types import Schema, TensorSpec

import bench.models
from bench import config, engine
from bench.data.cifar import NUM_CLASSES, load_cifar
from bench.errors import UserError, reason
from bench.models import create_model
from bench.models.packaged import ImageClassifier
from bench.servers import retry as outage
from bench.tracking.artifacts import CHECKPOINTS

NAME = "model"
EXAMPLE_IMAGES = 4  # test images stored with the model as its input example
MODEL_ERROR = "bench.model_error"  # a finished run's tag: why its model could not be logged
logger = logging.getLogger(__name__)


def package(cfg, state_dict: dict[str, torch.Tensor]) -> ImageClassifier:
    """The run's network with `state_dict`, inside its test-time input pipeline, on the CPU."""
    options = dict(cfg.model.options)
    if "weights" in options:
        options["weights"] = "none"  # the checkpoint replaces them: nothing to download or read
    net = create_model(cfg.model.name, num_classes=NUM_CLASSES[cfg.data.dataset], **options)
    net.load_state_dict(state_dict)
    d = cfg.data
    return ImageClassifier(
        net,
        mean=tuple(d.mean),
        std=tuple(d.std),
        image_size=d.image_size,
        batch_statistics=cfg.eval.mode == "train",
        channels_last=cfg.train.channels_last,
    ).eval()


def logged_model(client: MlflowClient, experiment_id: str, run_id: str):
    """The run's model, or None when it has none yet."""
    found = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{NAME}'", max_results=1
    )
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


def log(client: MlflowClient, run_id: str, cfg, checkpoint_file, epoch: int, example: np.ndarray) -> None:
    """Log the weights in `checkpoint_file` (saved after `epoch`) as the run's model, unless the
    run has one already (a finished run resumed with nothing left to train). A checkpoint saved
    after another epoch (best.pt and last.pt are not replaced together) is logged at its own
    epoch, with a warning: the metrics linked to the model are those of its weights.

    The model is created, linked to the run and its metrics first, then saved and uploaded: one
    left unfinished by a failed or killed upload is finished in place by the next call, so the run
    keeps one model (MLflow links a model to a run once and keeps the link of a deleted one).
    This is what mlflow.pytorch.log_model does, less its creation of a new model each time.
    `example`: a few uint8 test images, N x 32 x 32 x 3."""
    run = client.get_run(run_id)
    found = logged_model(client, run.info.experiment_id, run_id)
    if found is not None and found.status == LoggedModelStatus.READY:
        return
    state = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    if int(state["epoch"]) != epoch:
        logger.warning(
            "run %s: %s holds the weights of epoch %s, not %d: its model is logged at epoch %s",
            run.info.run_name,
            Path(checkpoint_file).name,
            state["epoch"],
            epoch,
            state["epoch"],
        )
        epoch = int(state["epoch"])
    if found is None:
        # Created here, in the run's experiment: a model of a run that is not the thread's active
        # run would go to the default experiment.
        found = client.create_logged_model(
            run.info.experiment_id, name=NAME, source_run_id=run_id, params=run.data.params
        )
    model_id = found.model_id
    if model_id not in {o.model_id for o in (run.outputs.model_outputs if run.outputs else [])}:
        client.log_outputs(run_id, [LoggedModelOutput(model_id, step=epoch)])
    if not found.metrics:  # a model found by search_logged_models carries its metrics
        _link_metrics(client, run, model_id, epoch)
    _save(client, run_id, cfg, found, state["model"], example)
    client.finalize_logged_model(model_id, LoggedModelStatus.READY)
    if MODEL_ERROR in run.data.tags:
        client.delete_tag(run_id, MODEL_ERROR)


def _save(client: MlflowClient, run_id: str, cfg, found, weights: dict[str, torch.Tensor], example: np.ndarray) -> None:
    """The packaged network saved as the model `found` and uploaded into it; the model marked
    FAILED where that fails (unless the store is away)."""
    model_id = found.model_id
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *example.shape[1:]))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES[cfg.data.dataset]))]),
    )
    requirements = [
        *mlflow.pytorch.get_default_pip_requirements(),
        f"torchvision=={torchvision.__version__.split('+')[0]}",
    ]
    # What a model evaluated with batch statistics needs to give the run's figure.
    metadata = {"eval_mode": cfg.eval.mode, "eval_batch_size": cfg.data.eval_batch_size}
    mlmodel = Model(artifact_path=found.artifact_location, model_uuid=model_id, run_id=run_id, model_id=model_id)
    try:
        with tempfile.TemporaryDirectory() as tmp, _bench_models_by_value(), _pickle_warning_muted():
            path = Path(tmp) / NAME
            mlflow.pytorch.save_model(
                package(cfg, weights),
                path,
                mlflow_model=mlmodel,
                signature=signature,
                input_example=example,
                pip_requirements=requirements,
                metadata=metadata,
                serialization_format="pickle",
            )
            client.log_model_artifacts(model_id, str(path))
    except Exception as exc:
        if not isinstance(exc, outage.Unavailable):  # a store that is away is not asked again
            with contextlib.suppress(Exception):  # the store may be what failed: the next call finishes it anyway
                client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
        raise


def _link_metrics(client: MlflowClient, run, model_id: str, step: int) -> None:
    """The run's metrics at `step` linked to the model, as mlflow.pytorch.log_model links them."""
    linked = [
        Metric(
            m.key,
            m.value,
            m.timestamp,
            m.step,
            model_id=model_id,
            dataset_name=m.dataset_name,
            dataset_digest=m.dataset_digest,
            run_id=m.run_id,
        )
        for key in run.data.metrics
        for m in client.get_metric_history(run.info.run_id, key)
        if m.step == step
    ]
    client.log_batch(run.info.run_id, metrics=linked)


def log_from_artifacts(client: MlflowClient, run, cfg) -> None:
    """Log the model of a finished run that has none (one finished before bench logged models, or
    whose model logging failed) from its checkpoint artifacts, with test images of the embedded
    CIFAR subset as the input example."""
    tags = run.data.tags
    name, epoch = (
        (engine.BEST, tags["bench.best_epoch"])
        if "bench.best_epoch" in tags
        else (engine.LAST, tags["bench.epochs_done"])
    )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            file = client.download_artifacts(run.info.run_id, f"{CHECKPOINTS}/{name}", tmp)
        except (MlflowException, OSError) as exc:
            raise UserError(
                f"run {run.info.run_name} ({run.info.run_id}) has no logged model and no {CHECKPOINTS}/{name} to log one from: {reason(exc)}"
            ) from None
        images = load_cifar(cfg.data.dataset, None).test.images[:EXAMPLE_IMAGES]
        log(client, run.info.run_id, cfg, file, int(epoch), images.permute(0, 2, 3, 1).numpy())


@contextlib.contextmanager
def _fluent_tracking_uri(uri: str):
    """The run's store as MLflow's process-wide tracking URI while the model is registered (the
    registry's lookup of a models:/ source reads no other), then the one before it. MLflow's own
    switch unsets $MLFLOW_TRACKING_URI on the way back when no URI was set in the process: it is
    put back as it was."""
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


def best_run(client: MlflowClient, experiment: str, profile: str, sets: list[str] = (), epochs: int | None = None):
    """The finished run of the recipe's config in `profile` (with the overrides `sets` and
    `epochs`) whose model scores best, its ranking metric and the config: on validation accuracy
    (`best_val_acc`) where the recipe holds out a validation split, else on the last epoch's test
    accuracy, the only figure such a run has; the lowest seed on a tie. A finished run without
    that metric is left out, with a warning."""
    cfg = config.load(experiment, profile=profile, sets=sets, epochs=epochs)
    exp = client.get_experiment_by_name(experiment)
    query = f"tags.`bench.experiment` = '{experiment}' and tags.`bench.profile` = '{profile}' and attributes.status = 'FINISHED'"
    same_config = f"{query} and tags.`bench.config_hash` = '{cfg.config_hash()}'"
    runs = (
        client.search_runs([exp.experiment_id], filter_string=same_config, max_results=1000) if exp is not None else []
    )
    key = "best_val_acc" if cfg.data.val_size > 0 else "test_acc"
    unranked = [r for r in runs if key not in r.data.metrics]
    if unranked:
        logger.warning(
            "left out %d finished run(s) without %s: %s",
            len(unranked),
            key,
            ", ".join(r.info.run_name for r in unranked),
        )
    runs = [r for r in runs if key in r.data.metrics]
    if not runs:
        sets_flags = "".join(f" --set {s}" for s in sets) + (f" --epochs {epochs}" if epochs is not None else "")
        if unranked:
            raise UserError(
                f"no finished run of {experiment} (profile {profile}, config {cfg.config_hash()}) has {key} to be chosen on"
            )
        finished = (
            client.search_runs([exp.experiment_id], filter_string=query, max_results=1000) if exp is not None else []
        )
        others = (
            f" ({len(finished)} finished runs of other configs: pass the --set keys or --epochs they ran with)"
            if finished
            else ""
        )
        raise UserError(
            f"no finished run of {experiment} (profile {profile}, config {cfg.config_hash()}){others}; train it first: bench run {experiment} --profile {profile}{sets_flags}"
        )
    return max(runs, key=lambda r: (r.data.metrics[key], -int(r.data.tags["bench.seed"]))), key, cfg


def register(
    client: MlflowClient, experiment: str, profile: str, sets: list[str] = (), epochs: int | None = None
) -> tuple[str, str, int]:
    """Register the best seed's model under the experiment's name with the alias `profile`:
    (model URI, chosen run's name, version). A chosen run without a model gets one from its
    checkpoints first. A model registered before is not registered again: the alias points at
    its version."""
    run, key, cfg = best_run(client, experiment, profile, sets, epochs)
    model = logged_model(client, run.info.experiment_id, run.info.run_id)
    if model is None or model.status != LoggedModelStatus.READY:
        logger.info("run %s has no logged model: logging it from its checkpoints", run.info.run_name)
        log_from_artifacts(client, run, cfg)
        model = logged_model(client, run.info.experiment_id, run.info.run_id)
    try:
        client.get_registered_model(experiment)
    except MlflowException:
        client.create_registered_model(
            experiment,
            description=(
                "The best seed of a config of this experiment, one alias per profile: chosen on validation "
                "accuracy, or on the last epoch's test accuracy where the recipe holds out no validation split"
            ),
        )
    # SQLite's registry keeps no model_id: a version is known by its source.
    versions = client.search_model_versions(f"name = '{experiment}' and run_id = '{run.info.run_id}'")
    same = [v for v in versions if v.source == model.model_uri]
    if same:
        version = min(int(v.version) for v in same)
    else:
        tags = {
            "bench.seed": run.data.tags["bench.seed"],
            "bench.config_hash": run.data.tags["bench.config_hash"],
            "bench.chosen_on": key,
        }
        with _fluent_tracking_uri(client.tracking_uri):  # the registry finds a models:/ source there
            version = int(
                client.create_model_version(
                    experiment, source=model.model_uri, run_id=run.info.run_id, tags=tags, model_id=model.model_id
                ).version
            )
    client.set_registered_model_alias(experiment, profile, str(version))
    return f"models:/{experiment}@{profile}", run.info.run_name, version
