"""A finished cell's weights as an MLflow model (bench.logged_model, bench.models.packaged) and
`bench register`: the model loaded with mlflow.pytorch alone gives the run's logged accuracy."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from conftest import TINY_SETS
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from bench import cli, engine, suite
from bench.errors import UserError
from bench.models import create_model
from bench.tracking import Tracker
from bench.tracking import model as logged_model

CPU = torch.device("cpu")
EXPERIMENT = "resnetb-cifar10"
SETS = [*TINY_SETS, "train.epochs=3"]
# R1's recipe (batch statistics at evaluation, no validation split) on a tiny network without
# dropout: the only difference between the suite's evaluation and the packaged model's is gone.
HW4 = "hw4-resnet-cifar100"
HW4_SETS = [
    "model.blocks=[1,1,1,1]",
    "model.widths=[4,8,8,8]",
    "model.stem_width=4",
    "model.stem_dropout=0.0",
    "data.val_size=0",
    "train.epochs=2",
]


def run(cells, root, uri):
    return suite.run_cells(cells, tracker=Tracker(uri), device=CPU, data_dir=None, checkpoint_root=root / "ck")


def suite_test_images(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images the suite evaluated on, uint8 N x 32 x 32 x 3 as CIFAR's arrays hold them."""
    test = suite.files_for(cfg, None).test
    return test.images.permute(0, 2, 3, 1).contiguous(), test.labels


def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int | None = None) -> float:
    with torch.no_grad():
        batches = images.split(batch_size or len(images))
        predicted = torch.cat([model(x).argmax(1) for x in batches])
    return (predicted == labels).sum().item() / len(labels)  # as the engine counts


def load(uri: str, model_uri: str, monkeypatch):
    """mlflow.pytorch.load_model as a user calls it, with the store in $MLFLOW_TRACKING_URI."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return mlflow.pytorch.load_model(model_uri)


def models_of(client: MlflowClient, run) -> list:
    return list(
        client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Two seeds of a tiny smoke cell run through bench.suite into a fresh SQLite store."""
    root = tmp_path_factory.mktemp("logged")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cells = suite.plan([EXPERIMENT], profile="smoke", seeds=2, sets=SETS)
        outcomes = run(cells, root, uri)
    client = MlflowClient(uri)
    runs = {o.run_id: client.get_run(o.run_id) for o in outcomes}
    return SimpleNamespace(root=root, uri=uri, cfg=cells[0].cfg, outcomes=outcomes, client=client, runs=runs)


def test_each_finished_run_logs_its_best_checkpoint_as_a_model_linked_to_it(smoke):
    for outcome in smoke.outcomes:
        assert outcome.status == "finished"
        run = smoke.runs[outcome.run_id]
        [model] = models_of(smoke.client, run)
        assert model.name == "model" and model.status == LoggedModelStatus.READY
        assert model.experiment_id == run.info.experiment_id
        best_epoch = int(run.data.tags["bench.best_epoch"])
        [output] = run.outputs.model_outputs
        assert (output.model_id, output.step) == (model.model_id, best_epoch)
        linked = {m.key: (m.value, m.step) for m in smoke.client.get_logged_model(model.model_id).metrics}
        for key in ("best_val_acc", "best_test_acc"):
            assert linked[key] == (run.data.metrics[key], best_epoch)
        # What a model evaluated with batch statistics needs, in its MLmodel.
        metadata = mlflow.models.Model.load(model.artifact_location).metadata
        assert metadata == {"eval_mode": smoke.cfg.eval.mode, "eval_batch_size": smoke.cfg.data.eval_batch_size}


def test_the_model_gives_the_runs_test_accuracy_on_raw_uint8_images(smoke, monkeypatch):
    images, labels = suite_test_images(smoke.cfg)
    for outcome in smoke.outcomes:
        [model_info] = models_of(smoke.client, smoke.runs[outcome.run_id])
        model = load(smoke.uri, model_info.model_uri, monkeypatch)
        assert accuracy(model, images, labels) == outcome.best_test_acc


def test_the_model_takes_nchw_uint8_and_float_images_alike(smoke, monkeypatch):
    [model_info] = models_of(smoke.client, smoke.runs[smoke.outcomes[0].run_id])
    model = load(smoke.uri, model_info.model_uri, monkeypatch)
    nhwc, _ = suite_test_images(smoke.cfg)
    nchw = nhwc[:64].permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = model(nhwc[:64])
        assert torch.equal(model(nchw), expected)
        assert torch.equal(model(nchw.float() / 255), expected)


def test_the_registered_alias_loads_with_mlflow_alone_and_is_the_best_seed(smoke, capsys, monkeypatch):
    base = ["register", EXPERIMENT, "--profile", "smoke", "--tracking-uri", smoke.uri, *(f"--set={s}" for s in SETS)]
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert "models:/resnetb-cifar10@smoke" in out and "mlflow.pytorch.load_model" in out
    version = smoke.client.get_model_version_by_alias(EXPERIMENT, "smoke")
    best = max(smoke.outcomes, key=lambda o: (smoke.runs[o.run_id].data.metrics["best_val_acc"], -o.cell.cfg.seed))
    assert version.run_id == best.run_id
    assert version.tags["bench.chosen_on"] == "best_val_acc"
    # The same model registered again is the same version.
    assert cli.main(base) == 0
    assert len(smoke.client.search_model_versions(f"name = '{EXPERIMENT}'")) == 1
    # The alias moved to another model (by hand, in the UI) and back: the version it had before.
    [other] = [o for o in smoke.outcomes if o.run_id != best.run_id]
    [other_model] = models_of(smoke.client, smoke.runs[other.run_id])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", smoke.uri)  # where the registry looks up a models:/ source
    moved = smoke.client.create_model_version(
        EXPERIMENT, source=other_model.model_uri, run_id=other.run_id, model_id=other_model.model_id
    )
    smoke.client.set_registered_model_alias(EXPERIMENT, "smoke", moved.version)
    assert cli.main(base) == 0
    assert len(smoke.client.search_model_versions(f"name = '{EXPERIMENT}'")) == 2
    assert smoke.client.get_model_version_by_alias(EXPERIMENT, "smoke").version == version.version

    # A user's process with neither bench nor anything but the store's URI.
    images, labels = suite_test_images(smoke.cfg)
    np.save(smoke.root / "images.npy", images.numpy())
    np.save(smoke.root / "labels.npy", labels.numpy())
    script = (
        "import sys; sys.modules['bench'] = None\n"
        "import json, mlflow, numpy as np, torch\n"
        "model = mlflow.pytorch.load_model('models:/resnetb-cifar10@smoke')\n"
        "x, y = torch.from_numpy(np.load('images.npy')), torch.from_numpy(np.load('labels.npy'))\n"
        "with torch.no_grad():\n"
        "    print(json.dumps((model(x).argmax(1) == y).sum().item() / len(y)))\n"
    )
    env = {"MLFLOW_TRACKING_URI": smoke.uri, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=smoke.root, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == best.best_test_acc


def test_a_resumed_or_rerun_cell_logs_one_model(in_tmp, monkeypatch):
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    cells = suite.plan([EXPERIMENT], profile="smoke", seeds=1, sets=SETS)
    with monkeypatch.context() as mp:  # interrupted after epoch 2 of 3: no model yet
        mp.setattr(engine, "fit", functools.partial(engine.fit, max_epochs=2))
        [partial] = run(cells, in_tmp, uri)
    assert partial.status == "stopped"
    assert models_of(client, client.get_run(partial.run_id)) == []
    [done] = run(cells, in_tmp, uri)
    assert done.status == "finished" and done.run_id == partial.run_id
    [model] = models_of(client, client.get_run(done.run_id))
    # Killed after the model was logged, before the run was marked FINISHED: resumed with
    # nothing left to train, it keeps its model.
    client.set_terminated(done.run_id, "KILLED")
    [again] = run(cells, in_tmp, uri)
    assert again.status == "finished" and again.run_id == done.run_id
    assert [m.model_id for m in models_of(client, client.get_run(done.run_id))] == [model.model_id]
    [skipped] = run(cells, in_tmp, uri)
    assert skipped.status == "skipped"
    assert len(models_of(client, client.get_run(done.run_id))) == 1


def test_batch_statistics_and_final_weights_where_the_recipe_has_no_validation_split(in_tmp, monkeypatch):
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    cells = suite.plan([HW4], profile="smoke", seeds=1, sets=HW4_SETS)
    cfg = cells[0].cfg
    assert (cfg.eval.mode, cfg.data.val_size) == ("train", 0)
    [outcome] = run(cells, in_tmp, uri)
    mlrun = client.get_run(outcome.run_id)
    [model_info] = models_of(client, mlrun)
    assert [(o.model_id, o.step) for o in mlrun.outputs.model_outputs] == [(model_info.model_id, 2)]
    model = load(uri, model_info.model_uri, monkeypatch)
    assert not any(
        b is not None and b.dtype.is_floating_point for name, b in model.named_buffers() if "running" in name
    )
    images, labels = suite_test_images(cfg)
    # Batch statistics: the suite's figure comes back given its evaluation batches.
    assert accuracy(model, images, labels, cfg.data.eval_batch_size) == outcome.final_test_acc
    # Nothing is updated: the same batches give the same logits twice.
    with torch.no_grad():
        assert torch.equal(model(images[:32]), model(images[:32]))
    assert (
        cli.main(["register", HW4, "--profile", "smoke", "--tracking-uri", uri, *(f"--set={s}" for s in HW4_SETS)]) == 0
    )
    assert client.get_model_version_by_alias(HW4, "smoke").tags["bench.chosen_on"] == "test_acc"


def test_register_errors(in_tmp, capsys, caplog):
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    assert cli.main(["register", EXPERIMENT, "--profile", "smoke", "--tracking-uri", uri]) == 2
    assert "no finished run of resnetb-cifar10 (profile smoke" in capsys.readouterr().err
    assert cli.main(["register", "nope", "--tracking-uri", uri]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err

    [done] = run(suite.plan([EXPERIMENT], profile="smoke", seeds=1, sets=SETS), in_tmp, uri)
    # A run of another config than the one named: the message says to pass its --set keys.
    assert cli.main(["register", EXPERIMENT, "--profile", "smoke", "--tracking-uri", uri]) == 2
    assert "1 finished runs of other configs: pass the --set keys" in capsys.readouterr().err
    # A finished run without the ranking metric is left out, and named.
    client = MlflowClient(uri)
    tags = {k: v for k, v in client.get_run(done.run_id).data.tags.items() if k.startswith("bench.")}
    bare = client.create_run(
        client.get_run(done.run_id).info.experiment_id, run_name="no-metrics", tags={**tags, "bench.seed": "7"}
    )
    client.set_terminated(bare.info.run_id, "FINISHED")
    with caplog.at_level(logging.WARNING, logger="bench"):
        assert logged_model.best_run(client, EXPERIMENT, "smoke", SETS)[0].info.run_id == done.run_id
    assert "left out 1 finished run(s) without best_val_acc: no-metrics" in caplog.text
    # The config named with --epochs, as `bench run --epochs 3` names it.
    assert (
        cli.main(
            [
                "register",
                EXPERIMENT,
                "--profile",
                "smoke",
                "--tracking-uri",
                uri,
                "--epochs",
                "3",
                *(f"--set={s}" for s in TINY_SETS),
            ]
        )
        == 0
    )
    assert MlflowClient(uri).get_model_version_by_alias(EXPERIMENT, "smoke").run_id == done.run_id
    client.delete_run(done.run_id)
    with pytest.raises(UserError, match="has best_val_acc to be chosen on"):
        logged_model.best_run(client, EXPERIMENT, "smoke", SETS)


def test_register_logs_the_model_of_a_run_that_has_none_from_its_checkpoint_artifacts(in_tmp, monkeypatch, capsys):
    """A run finished before bench logged models: `register` logs its model, from the run's
    checkpoints in MLflow (not the local ones), and registers it."""
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    with monkeypatch.context() as mp:
        mp.setattr(logged_model, "log", lambda *args: None)
        [done] = run(suite.plan([EXPERIMENT], profile="smoke", seeds=1, sets=SETS), in_tmp, uri)
    assert done.status == "finished" and models_of(client, client.get_run(done.run_id)) == []
    shutil.rmtree(in_tmp / "ck")
    assert (
        cli.main(["register", EXPERIMENT, "--profile", "smoke", "--tracking-uri", uri, *(f"--set={s}" for s in SETS)])
        == 0
    )
    assert "Registered the model of" in capsys.readouterr().out
    mlrun = client.get_run(done.run_id)
    [model] = models_of(client, mlrun)
    assert model.status == LoggedModelStatus.READY
    assert [(o.model_id, o.step) for o in mlrun.outputs.model_outputs] == [
        (model.model_id, int(mlrun.data.tags["bench.best_epoch"]))
    ]
    images, labels = suite_test_images(suite.plan([EXPERIMENT], profile="smoke", seeds=1, sets=SETS)[0].cfg)
    assert accuracy(load(uri, f"models:/{EXPERIMENT}@smoke", monkeypatch), images, labels) == done.best_test_acc


def fail_once(monkeypatch, exc: BaseException) -> list[BaseException]:
    """mlflow.pytorch.save_model raises `exc` the first time it is called."""
    raised, save = [], mlflow.pytorch.save_model

    def save_model(*args, **kwargs):
        if not raised:
            raised.append(exc)
            raise exc
        return save(*args, **kwargs)

    monkeypatch.setattr(mlflow.pytorch, "save_model", save_model)
    return raised


def assert_one_ready_model(client: MlflowClient, run_id: str, uri: str, monkeypatch, test_acc: float) -> str:
    mlrun = client.get_run(run_id)
    [output] = mlrun.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.status == LoggedModelStatus.READY and [m.model_id for m in models_of(client, mlrun)] == [
        model.model_id
    ]
    assert logged_model.MODEL_ERROR not in mlrun.data.tags
    cfg = suite.plan([EXPERIMENT], profile="smoke", seeds=1, sets=SETS)[0].cfg
    assert accuracy(load(uri, model.model_uri, monkeypatch), *suite_test_images(cfg)) == test_acc
    return model.model_id


def test_a_failed_model_upload_leaves_the_run_finished_and_register_logs_the_model(in_tmp, monkeypatch, caplog):
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    raised = fail_once(monkeypatch, OSError(28, "No space left on device"))
    with caplog.at_level(logging.WARNING, logger="bench"):
        [done] = run(suite.plan([EXPERIMENT], profile="smoke", seeds=1, sets=SETS), in_tmp, uri)
    assert raised
    assert (done.status, done.epochs) == ("finished", 3)
    mlrun = client.get_run(done.run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.tags[logged_model.MODEL_ERROR] == "[Errno 28] No space left on device"
    assert f"run {mlrun.info.run_name}: its model was not logged ([Errno 28] No space left on device)" in caplog.text
    [failed] = models_of(client, mlrun)
    assert failed.status != LoggedModelStatus.READY
    assert (
        cli.main(["register", EXPERIMENT, "--profile", "smoke", "--tracking-uri", uri, *(f"--set={s}" for s in SETS)])
        == 0
    )
    assert assert_one_ready_model(client, done.run_id, uri, monkeypatch, done.best_test_acc) == failed.model_id


@pytest.mark.slow
def test_a_killed_model_upload_is_finished_in_place_when_the_cell_runs_again(in_tmp, monkeypatch, caplog):
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    cells = suite.plan([EXPERIMENT], profile="smoke", seeds=1, sets=SETS)
    with monkeypatch.context() as mp:
        fail_once(mp, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            run(cells, in_tmp, uri)
    [killed] = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert killed.info.status == "KILLED"
    [pending] = models_of(client, killed)
    save = mlflow.pytorch.save_model

    def slow_save_model(*args, **kwargs):  # an upload that takes a while: the console says what the run waits for
        time.sleep(1.5)
        return save(*args, **kwargs)

    monkeypatch.setattr(mlflow.pytorch, "save_model", slow_save_model)
    with caplog.at_level(logging.INFO, logger="bench"):
        [done] = run(cells, in_tmp, uri)
    assert done.status == "finished" and done.run_id == killed.info.run_id
    assert assert_one_ready_model(client, done.run_id, uri, monkeypatch, done.best_test_acc) == pending.model_id
    assert f"finishing the model upload of {killed.info.run_name} ..." in caplog.text


def test_a_checkpoint_of_another_epoch_is_logged_at_its_own(in_tmp, caplog):
    """best.pt and last.pt are not replaced together: the weights say which epoch they are."""
    tracker = Tracker(f"sqlite:///{in_tmp / 'mlflow.db'}")
    cfg = suite.plan([EXPERIMENT], profile="smoke", seeds=1, sets=SETS)[0].cfg
    net = create_model(cfg.model.name, num_classes=10, **cfg.model.options)
    torch.save({"epoch": 3, "model": net.state_dict()}, in_tmp / "best.pt")
    run_id = tracker.start_run(tracker.experiment_id(EXPERIMENT), "other-epoch", {})
    with caplog.at_level(logging.WARNING, logger="bench"):
        logged_model.log(tracker.client, run_id, cfg, in_tmp / "best.pt", 2, np.zeros((2, 32, 32, 3), dtype=np.uint8))
    [output] = tracker.client.get_run(run_id).outputs.model_outputs
    assert output.step == 3
    assert "best.pt holds the weights of epoch 3, not 2: its model is logged at epoch 3" in caplog.text


@pytest.mark.parametrize("experiment", [EXPERIMENT, "resnet18-finetune-cifar100"])
def test_the_classifier_prepares_images_as_the_suites_evaluation_does(experiment):
    """The input pipeline alone (an identity network): the suite's test batches, bit for bit,
    at 32 px and resized (the fine-tune's smoke profile: 64 px)."""
    from bench import data
    from bench.models.packaged import ImageClassifier

    cfg = suite.plan([experiment], profile="smoke", seeds=1)[0].cfg
    bundle = data.build(cfg.data, seed=0, device=CPU, files=suite.files_for(cfg, None))
    pipeline = ImageClassifier(
        torch.nn.Identity(),
        mean=tuple(cfg.data.mean),
        std=tuple(cfg.data.std),
        image_size=cfg.data.image_size,
        batch_statistics=False,
        channels_last=False,
    )
    x, _ = next(iter(bundle.test))
    assert x.shape[-1] == cfg.data.image_size
    images = bundle.test.images[: len(x)]
    assert torch.equal(pipeline(images.permute(0, 2, 3, 1)), x)
    assert torch.equal(pipeline(images.float() / 255), x)


def test_no_model_for_a_tuning_trial_an_unfinished_fit_or_a_run_without_an_example(in_tmp):
    from bench.engine import FitResult
    from bench.tracking import MlflowRun

    tracker = Tracker(f"sqlite:///{in_tmp / 'mlflow.db'}")
    cfg = suite.plan([EXPERIMENT], profile="smoke", seeds=1, sets=SETS)[0].cfg
    example = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    finished = FitResult(status="finished", epochs_done=3, checkpoint_dir=in_tmp / "none")  # no checkpoint to read
    cases = [
        (dict(log_checkpoints=False, model_example=example), finished),  # a tuning trial
        (dict(model_example=example), FitResult(status="stopped", epochs_done=2, checkpoint_dir=in_tmp / "none")),
        (dict(), finished),
    ]
    for kwargs, result in cases:
        run_id = tracker.start_run(tracker.experiment_id(EXPERIMENT), "no-model", {})
        MlflowRun(tracker, run_id, cfg, **kwargs).on_fit_end(result)
        tracker.end_run(run_id, "FINISHED")
        assert models_of(tracker.client, tracker.client.get_run(run_id)) == [], kwargs
