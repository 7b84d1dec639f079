"""What each MLflow run records about its data, its machine and itself: dataset inputs with
digests, system metrics and peak memory, descriptions, the environment, and run names."""

from __future__ import annotations

import contextlib
import functools
import json
import pickle
import shutil
import threading
from types import SimpleNamespace

import mlflow
import pytest
import torch
from conftest import TINY_SETS
from mlflow.tracking import MlflowClient

from bench import cli, config, data, engine, suite
from bench.data import cifar
from bench.tracking import NOTE, Tracker

CPU = torch.device("cpu")
EXPERIMENT = "resnetb-cifar10"
# Samples every 0.2 s: a run of a few seconds has several.
SETS = [*TINY_SETS, "train.epochs=2", "train.system_metrics_interval_s=0.2"]
OTHER = ["data.val_size=200", "train.system_metrics=false"]  # another split, and no system metrics


def plan(*extra: str) -> list[suite.Cell]:
    return suite.plan([EXPERIMENT], profile="smoke", seeds=1, sets=[*SETS, *extra])


def run(cells, root, uri):
    return suite.run_cells(cells, tracker=Tracker(uri), device=CPU, data_dir=None, checkpoint_root=root / "ck")


def datasets(run) -> dict[str, object]:
    """The run's dataset inputs by context."""
    found = {}
    for d in run.inputs.dataset_inputs:
        [context] = [t.value for t in d.tags if t.key == "mlflow.data.context"]
        assert context not in found, f"{context} logged twice"
        found[context] = d.dataset
    return found


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two tiny 2-epoch cells of one experiment in a fresh SQLite store: the smoke recipe, and
    the same with another validation split and system metrics off."""
    root = tmp_path_factory.mktemp("run_info")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        [a] = run(plan(), root, uri)
        [b] = run(plan(*OTHER), root, uri)
    assert a.status == b.status == "finished"
    client = MlflowClient(uri)
    return SimpleNamespace(root=root, uri=uri, client=client, a=client.get_run(a.run_id), b=client.get_run(b.run_id))


# --- datasets ----------------------------------------------------------------------------------


def test_a_run_records_its_train_validation_and_test_data(store):
    run = store.a
    found = datasets(run)
    assert set(found) == {"training", "validation", "testing"}
    tags = run.data.tags
    counts = {
        "training": tags["bench.data_train"],
        "validation": tags["bench.data_val"],
        "testing": tags["bench.data_test"],
    }
    for context, part in (("training", "train"), ("validation", "val"), ("testing", "test")):
        ds = found[context]
        assert ds.name == f"cifar10-{part}"
        assert ds.source_type == "local" and tags["bench.data_source"] in ds.source
        assert len(ds.digest) == 8
        assert '"num_rows": ' + counts[context] in ds.profile and '"num_classes": 10' in ds.profile
        schema = json.loads(ds.schema)["mlflow_tensorspec"]
        [images], [labels] = json.loads(schema["features"]), json.loads(schema["targets"])
        assert images["tensor-spec"] == {"dtype": "uint8", "shape": [-1, 3, 32, 32]}
        assert labels["tensor-spec"] == {"dtype": "int64", "shape": [-1]}
    assert len({d.digest for d in found.values()}) == 3


def test_search_runs_filters_by_dataset(store):
    exp = store.client.get_experiment_by_name(EXPERIMENT).experiment_id
    train = datasets(store.a)["training"]
    found = store.client.search_runs(
        [exp], filter_string=f"dataset.name = 'cifar10-train' and dataset.digest = '{train.digest}'"
    )
    assert [r.info.run_id for r in found] == [store.a.info.run_id]
    found = store.client.search_runs(
        [exp], filter_string="dataset.context = 'validation' and dataset.name = 'cifar10-val'"
    )
    assert len(found) == 2
    # The seeds of one config by their name's prefix (the README's example).
    prefix = store.a.info.run_name.rsplit("-seed", 1)[0]
    found = store.client.search_runs([exp], filter_string=f"attributes.run_name LIKE '{prefix}-%'")
    assert [r.info.run_id for r in found] == [store.a.info.run_id]


def test_another_split_changes_the_train_and_validation_digests_and_not_the_test_digest(store):
    a, b = datasets(store.a), datasets(store.b)
    assert a["training"].digest != b["training"].digest
    assert a["validation"].digest != b["validation"].digest
    assert a["testing"].digest == b["testing"].digest
    assert '"num_rows": 200' in b["validation"].profile


def parts(files, **changes):
    cfg = config.load(EXPERIMENT, profile="smoke", sets=[f"data.{k}={v}" for k, v in changes.items()]).data
    return data.parts(files, cfg.dataset, cfg.val_size, cfg.split_seed)


def digests(files, **changes) -> dict[str, str]:
    return {k: p.digest for k, p in parts(files, **changes).items()}


def test_the_same_data_gives_the_same_digests_and_the_split_seed_counts_only_with_a_split():
    files = cifar.load_cifar("cifar10", None)
    again = cifar.read_layout("cifar10", cifar.EMBEDDED_DIR)  # read afresh, not a cached object
    assert digests(files) == digests(again)
    assert digests(files, split_seed=1)["train"] != digests(files)["train"]
    assert digests(files, split_seed=1)["val"] != digests(files)["val"]
    assert digests(files, val_size=0) == digests(files, val_size=0, split_seed=1)
    assert set(digests(files, val_size=0)) == {"train", "test"}


def _change_first_label(path) -> None:
    """One label of one image in a CIFAR-10 batch file changed."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    batch["labels"][0] = (batch["labels"][0] + 1) % 10
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def test_changed_files_give_changed_digests(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar.EMBEDDED_DIR / "cifar-10-batches-py", folder)
    before = digests(cifar.read_layout("cifar10", tmp_path))
    _change_first_label(folder / "test_batch")
    after = digests(cifar.read_layout("cifar10", tmp_path))
    # The test data's digest changes, the training data's does not: its files are the same.
    assert before["test"] != after["test"] and before["train"] == after["train"]
    _change_first_label(folder / "data_batch_1")
    again = digests(cifar.read_layout("cifar10", tmp_path))
    assert again["train"] != after["train"] and again["test"] == after["test"]


# --- system metrics and peak memory --------------------------------------------------------------


def test_system_metrics_and_peak_memory_are_recorded_and_system_metrics_can_be_switched_off(store):
    a, b = store.a.data.metrics, store.b.data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= a.keys()
    assert not [k for k in b if k.startswith("system/")]
    for run in (store.a, store.b):
        history = store.client.get_metric_history(run.info.run_id, "peak_memory_mb")
        assert [m.step for m in history] == [1, 2]
        assert all(m.value > 10 for m in history)  # MiB: a Python process with torch holds more
        assert history[0].value <= history[1].value  # a peak never falls
    assert not monitor_threads()


@pytest.mark.parametrize("error", [RuntimeError("the device fell over"), KeyboardInterrupt()])
def test_the_monitor_stops_when_a_run_fails_or_is_interrupted(error, in_tmp, monkeypatch):
    def fails_after_start(model, bundle, cfg, *, callbacks, **kwargs):
        for cb in callbacks:
            cb.on_fit_start(start_epoch=0, epochs=cfg.train.epochs)
        assert monitor_threads()  # sampling while the run trains
        raise error

    monkeypatch.setattr(engine, "fit", fails_after_start)
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    if isinstance(error, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            run(plan(), in_tmp, uri)
    else:
        [outcome] = run(plan(), in_tmp, uri)
        assert outcome.status == "failed"
    assert not monitor_threads()
    client = MlflowClient(uri)
    [mlrun] = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert mlrun.info.status == ("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
    assert "environment.txt" in [a.path for a in client.list_artifacts(mlrun.info.run_id)]


def test_the_system_metrics_keys_change_no_config_hash():
    [a], [b] = plan(), plan("train.system_metrics=false", "train.system_metrics_interval_s=3")
    assert a.cfg.config_hash() == b.cfg.config_hash()
    assert a.cfg.earlier_hash() == b.cfg.earlier_hash()


# --- descriptions, environment, names ------------------------------------------------------------


def test_the_experiment_and_its_runs_carry_the_about_table_as_their_description(store):
    about = config.about_markdown(EXPERIMENT)
    assert about.startswith("# ResNet-B on CIFAR-10\n") and "**Reported:** test accuracy 0.6697" in about
    assert "- seeds/004 Table 2" in about and "**Gaps:** StepLR(step 20" in about
    assert store.client.get_experiment_by_name(EXPERIMENT).tags[NOTE] == about
    note = store.a.data.tags[NOTE]
    assert note.startswith(about)
    assert "profile `smoke`" in note and "seed 0" in note and store.a.data.tags["bench.config_hash"] in note


def test_descriptions_edited_in_the_ui_are_kept_and_bench_s_own_follow_the_experiment_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    exp_id = tracker.experiment_id("demo", "first")
    note = lambda: tracker.client.get_experiment(exp_id).tags[NOTE]  # noqa: E731
    assert note() == "first"
    tracker.experiment_id("demo", "second")  # the [about] table changed: bench's own text follows it
    assert note() == "second"
    tracker.client.set_experiment_tag(exp_id, NOTE, "my notes")  # written in the UI
    tracker.experiment_id("demo", "third")
    assert note() == "my notes"
    # A run's description is written when the run starts; a resume keeps what a user wrote.
    [first] = run(plan("train.system_metrics=false"), tmp_path, uri)
    tracker.client.set_tag(first.run_id, NOTE, "seed 0 looked odd")
    tracker.client.set_terminated(first.run_id, "FAILED")
    [again] = run(plan("train.system_metrics=false"), tmp_path, uri)
    assert again.run_id == first.run_id and again.status == "finished"
    assert tracker.client.get_run(first.run_id).data.tags[NOTE] == "seed 0 looked odd"


def test_a_run_records_its_environment(store):
    run = store.a
    path = store.client.download_artifacts(run.info.run_id, "environment.txt", str(store.root))
    text = open(path).read()
    assert "PyTorch version: " + torch.__version__.split("+")[0] in text and "Python version" in text
    tags = run.data.tags
    assert tags["bench.mlflow"] == mlflow.__version__
    assert tags["bench.optuna"] == __import__("optuna").__version__
    assert tags["bench.cuda"] == (torch.version.cuda or "none")
    assert tags["bench.cudnn"] != "" and tags["bench.device"].startswith("cpu")
    assert tags["mlflow.source.git.commit"] == tags["bench.git_commit"]
    assert tags["bench.git_dirty"] in ("true", "false")


def test_two_configs_of_a_cell_have_different_run_names_and_seeds_share_a_prefix(store):
    a, b = store.a, store.b
    for mlrun in (a, b):
        assert mlrun.info.run_name == f"{EXPERIMENT}-smoke-{mlrun.data.tags['bench.config_hash'][:8]}-seed0"
    assert a.info.run_name != b.info.run_name
    seeds = suite.plan([EXPERIMENT], profile="smoke", seeds=2, sets=SETS)
    assert [c.run_name.rsplit("-seed", 1)[0] for c in seeds] == [a.info.run_name.rsplit("-seed", 1)[0]] * 2


# --- resume, trials --------------------------------------------------------------------------------


def test_a_resumed_run_logs_its_datasets_and_system_metric_steps_once(in_tmp, monkeypatch):
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    with monkeypatch.context() as mp:
        mp.setattr(engine, "fit", functools.partial(engine.fit, max_epochs=1))
        [first] = run(plan(), in_tmp, uri)
    assert first.status == "stopped"
    [second] = run(plan(), in_tmp, uri)
    assert second.status == "finished" and second.run_id == first.run_id
    client = MlflowClient(uri)
    mlrun = client.get_run(second.run_id)
    assert len(mlrun.inputs.dataset_inputs) == 3 and len(datasets(mlrun)) == 3
    steps = [m.step for m in client.get_metric_history(second.run_id, "system/cpu_utilization_percentage")]
    assert len(steps) >= 2 and len(steps) == len(set(steps))


def test_tuning_trials_record_their_training_and_validation_data(in_tmp):
    args = [
        "tune",
        EXPERIMENT,
        "--profile",
        "smoke",
        "--epochs",
        "1",
        "--trials",
        "1",
        "--sampler",
        "random",
        *[a for s in TINY_SETS for a in ("--set", s)],
    ]
    assert cli.main(args) == 0
    client = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp.tags[NOTE] == config.about_markdown(EXPERIMENT)
    [trial] = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("bench.kind") == "trial"]
    assert set(datasets(trial)) == {"training", "validation"}  # trials never see the test set
    assert trial.data.tags[NOTE].startswith(config.about_markdown(EXPERIMENT))
    assert "environment.txt" in [a.path for a in client.list_artifacts(trial.info.run_id)]


# --- what may go wrong around a run must not change how it ends --------------------------------------


def _ended_run(tmp_path, before_end=lambda tracker, run_id: None):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracker.start_run(tracker.experiment_id("demo"), "demo", {})
    tracker.log_environment(run_id)
    before_end(tracker, run_id)
    tracker.end_run(run_id, "FINISHED")
    run = tracker.client.get_run(run_id)
    text = open(tracker.client.download_artifacts(run_id, "environment.txt", str(tmp_path))).read()
    return tracker, run, text


@pytest.mark.parametrize("how", ["raises", "hangs"])
def test_an_environment_report_that_fails_or_hangs_leaves_the_run_finished(tmp_path, monkeypatch, how):
    import time

    from bench import tracking

    def report():
        if how == "raises":
            raise UnicodeDecodeError(
                "utf-8", b"\xff", 0, 1, "invalid start byte"
            )  # as collect_env does on some machines
        time.sleep(30)  # a command it starts (nvidia-smi, pip) that hangs

    monkeypatch.setattr(tracking.environment, "get_pretty_env_info", report)
    monkeypatch.setattr(tracking.environment, "ENVIRONMENT_WAIT_S", 0.5)
    tracking.environment_report.cache_clear()
    try:
        started = time.monotonic()
        _, run, text = _ended_run(tmp_path)
        assert run.info.status == "FINISHED" and time.monotonic() - started < 15
        assert text.startswith(
            "torch.utils.collect_env failed: UnicodeDecodeError"
            if how == "raises"
            else "torch.utils.collect_env did not finish within"
        )
    finally:
        tracking.environment_report.cache_clear()


def test_a_run_shorter_than_the_sampling_interval_still_has_its_system_metrics(tmp_path):
    import time

    tracker, run, _ = _ended_run(
        tmp_path, lambda tracker, run_id: (tracker.monitor_system(run_id, 10.0), time.sleep(1.5))
    )
    assert "system/cpu_utilization_percentage" in run.data.metrics


def test_git_dirty_is_unknown_when_git_cannot_say(monkeypatch):
    from bench import tracking

    monkeypatch.setattr(tracking.environment, "_git", lambda *args: "0" * 40 if args[0] == "rev-parse" else None)
    assert tracking.environment_tags("cpu")["bench.git_dirty"] == "unknown"


class _LosesTheDatasetRace(MlflowClient):
    """A real client whose first `log_inputs` loses MLflow's look-up-then-insert race: another run
    of the experiment adds the same datasets just before, and the store's duplicate-key error
    (as PostgreSQL gives it through a tracking server) ends the call, rolled back."""

    def __init__(self, uri: str, rival: str, error: str) -> None:
        super().__init__(uri)
        self.rival, self.error, self.calls = rival, error, 0

    def log_inputs(self, run_id, datasets=None, models=None):
        self.calls += 1
        if self.calls == 1:
            super().log_inputs(self.rival, datasets=datasets)
            raise mlflow.exceptions.MlflowException(self.error)
        return super().log_inputs(run_id, datasets=datasets, models=models)


DUPLICATE = (
    'BAD_REQUEST: (psycopg.errors.UniqueViolation) duplicate key value violates unique constraint "dataset_pk" '
    "DETAIL: Key (experiment_id, name, digest)=(2, cifar10-train, df64d8d7) already exists."
)


def test_a_run_that_loses_the_race_for_a_new_dataset_links_the_winners_row(in_tmp):
    from bench import tracking

    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    files = cifar.load_cifar("cifar10", None)
    parts = data.parts(files, "cifar10", 100, 0)
    plain = MlflowClient(uri)
    exp = plain.create_experiment("race")
    rival, mine = (plain.create_run(exp).info.run_id for _ in range(2))
    client = _LosesTheDatasetRace(uri, rival, DUPLICATE)
    tracking.log_datasets(client, mine, parts)
    assert client.calls == 2
    for run_id in (rival, mine):
        assert sorted(d.dataset.name for d in plain.get_run(run_id).inputs.dataset_inputs) == [
            "cifar10-test",
            "cifar10-train",
            "cifar10-val",
        ]
    # One dataset row each in the store, shared by the two runs.
    import sqlite3

    with contextlib.closing(sqlite3.connect(in_tmp / "mlflow.db")) as db:
        rows = db.execute("SELECT name FROM datasets WHERE experiment_id = ?", (int(exp),)).fetchall()
    assert sorted(name for (name,) in rows) == ["cifar10-test", "cifar10-train", "cifar10-val"]
    # Another error is the store's to report, at once.
    other = _LosesTheDatasetRace(uri, plain.create_run(exp).info.run_id, "INTERNAL_ERROR: disk full")
    with pytest.raises(mlflow.exceptions.MlflowException, match="disk full"):
        tracking.log_datasets(other, plain.create_run(exp).info.run_id, parts)
    assert other.calls == 1
