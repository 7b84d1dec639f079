"""Outages of the tracking store and the Optuna database, one call at a time: what counts as one,
how long bench waits, and that a call whose reply was lost writes nothing twice.

The stores are real (MLflow and Optuna on SQLite in tmp_path); what fails is the way to them: a
client whose calls are refused while the store is "away", or whose reply is dropped after the
store has done the call. tests/test_outages.py restarts real servers.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import optuna
import pytest
import requests
import sqlalchemy
import torch
from conftest import TINY_SETS
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException, RestException
from optuna.storages import RDBStorage

from bench import engine, suite
from bench.errors import UserError
from bench.servers import retry as outage
from bench.suite import claims as lease
from bench.tracking import Tracker, delivery
from bench.tuning.database import TOKEN, Storage

CPU = torch.device("cpu")


class Away:
    """The way to a real store: while `down`, every call is refused; a call named in `lose_reply`
    is done by the store and then its reply is lost (once). `calls` counts what reached the store."""

    def __init__(self, client) -> None:
        self.client, self.down, self.lose_reply, self.calls = client, False, set(), Counter()
        self.after = {}  # name -> f(kwargs), called once the store has done the call

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.down:
                raise requests.exceptions.ConnectionError("Max retries exceeded: Connection refused")
            self.calls[name] += 1
            result = attr(*args, **kwargs)
            if name in self.after:
                self.after[name](kwargs)
            if name in self.lose_reply:
                self.lose_reply.discard(name)
                raise requests.exceptions.ConnectionError("Connection aborted: RemoteDisconnected")
            return result

        return call


@pytest.fixture
def tracker(tmp_path):
    t = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", limit=30)
    t.client._client = Away(t.client._client)
    return t


def steps(tracker, run_id, key):
    return [m.step for m in tracker.client.get_metric_history(run_id, key)]


def test_an_outage_is_told_from_a_refusal():
    refused = MlflowException(
        "API request to http://h:5000/api/2.0/mlflow/runs/log-batch failed with exception "
        "HTTPConnectionPool(host='h', port=5000): Max retries exceeded"
    )
    assert outage.transient(refused)
    assert outage.transient(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "restarting"}))
    assert outage.transient(requests.exceptions.ReadTimeout("read timed out"))
    assert not outage.transient(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad key"}))
    assert not outage.transient(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"}))
    dropped = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
    try:
        raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from dropped
    except optuna.exceptions.StorageInternalError as exc:
        assert outage.transient(exc)
    assert not outage.transient(sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("no such table: trials")))
    assert not outage.transient(ValueError("Connection"))


def test_a_call_waits_out_an_outage_and_stops_past_the_limit():
    failures = iter([ConnectionRefusedError("refused")] * 2)
    watch, seen = delivery.Watch(), []

    def call():
        failure = next(failures, None)
        seen.append(watch.since)
        if failure is not None:
            raise failure
        return "done"

    assert outage.retry(call, what="tracking server", url="http://u:secret@h:5000", limit=60, watch=watch) == "done"
    assert seen[0] is None and seen[1] is not None and watch.since is None  # failing while it failed, not after

    def never():
        raise ConnectionRefusedError("refused")

    with pytest.raises(
        outage.Unavailable, match=r"tracking server http://u:\*\*\*@h:5000 has been unreachable"
    ) as info:
        outage.retry(never, what="tracking server", url="http://u:secret@h:5000", limit=0.5)
    assert "secret" not in str(info.value) and "--outage-limit" in str(info.value)
    with pytest.raises(ValueError):  # not an outage: at once
        outage.retry(lambda: int("x"), what="tracking server", url="http://h", limit=60)


def test_the_limit_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv(outage.LIMIT_ENV, raising=False)
    assert outage.limit_s() == outage.DEFAULT_LIMIT_S
    monkeypatch.setenv(outage.LIMIT_ENV, "45")
    assert outage.limit_s() == 45
    for bad in ("-1", "soon", "inf", "nan"):
        monkeypatch.setenv(outage.LIMIT_ENV, bad)
        with pytest.raises(UserError, match=outage.LIMIT_ENV):
            outage.limit_s()


def test_a_metric_batch_whose_reply_was_lost_is_not_sent_again(tracker):
    exp = tracker.experiment_id("e")
    run_id = tracker.start_run(exp, "r", {})
    away = tracker.client._client
    away.lose_reply.add("log_batch")
    tracker.client.log_batch(run_id, metrics=[Metric("loss", 0.5, 1, s) for s in (1, 2, 3)])
    assert steps(tracker, run_id, "loss") == [1, 2, 3]
    assert away.calls["log_batch"] == 1  # read back, found, not sent again


def test_a_run_or_a_model_whose_reply_was_lost_is_made_once(tracker):
    exp = tracker.experiment_id("e")
    away = tracker.client._client
    away.lose_reply.add("create_run")
    run_id = tracker.start_run(exp, "r", {"bench.kind": "cell"})
    [only] = tracker.client.search_runs([exp])
    assert only.info.run_id == run_id and away.calls["create_run"] == 1
    away.lose_reply.add("create_logged_model")
    model = tracker.client.create_logged_model(exp, name="model", source_run_id=run_id)
    assert [m.model_id for m in tracker.client.search_logged_models([exp])] == [model.model_id]


def test_the_writer_goes_on_while_the_store_is_away_and_delivers_in_order(tracker):
    exp = tracker.experiment_id("e")
    run_id = tracker.start_run(exp, "r", {})
    writer = tracker.writer(run_id)
    away = tracker.client._client
    away.down = True
    for step in range(1, 6):
        writer.submit(tracker.client.log_batch, run_id, metrics=[Metric("loss", 1.0 / step, 1, step)])
    deadline = time.monotonic() + 10
    while writer.down_s() == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert writer.flush(through_outage=False) is False  # a checkpoint does not wait for the store
    away.down = False
    assert writer.flush() is True
    assert steps(tracker, run_id, "loss") == [1, 2, 3, 4, 5] and writer.down_s() == 0
    tracker.end_run(run_id, "FINISHED")


def cell(epochs: int):
    [c] = suite.plan(
        ["resnetb-cifar10"],
        profile="smoke",
        seeds=1,
        sets=[
            *TINY_SETS,
            f"train.epochs={epochs}",
            "train.system_metrics=false",
            "data.val_size=100",
            "train.log_every_steps=10",
        ],
    )
    return c


@pytest.mark.slow
def test_a_cell_stopped_by_an_outage_keeps_its_metrics_and_the_same_command_finishes_its_run(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(uri, limit=2)
    away = first.client._client = Away(first.client._client)
    # The server goes away for good once it has stored epoch 2.
    away.after["log_batch"] = lambda kwargs: setattr(
        away, "down", away.down or any(m.key == "train_loss" and m.step == 2 for m in kwargs.get("metrics", ()))
    )
    c = cell(epochs=8)
    outcomes = suite.run_cells(
        [c, cell(epochs=9)], tracker=first, device=CPU, data_dir=None, checkpoint_root=tmp_path / "ck"
    )
    assert [o.status for o in outcomes] == [suite.UNREACHABLE, suite.NOT_RUN]
    ckdir = c.checkpoint_dir(tmp_path / "ck")
    stopped_at = torch.load(ckdir / engine.LAST, weights_only=True)["epoch"]
    assert stopped_at > 2  # training went on after the server went away, then stopped with a checkpoint
    assert (ckdir / suite.JOURNAL).is_file()
    away.down = False
    [run] = first.client.search_runs([first.experiment_id("resnetb-cifar10")])
    assert run.info.status == "RUNNING" and steps(first, run.info.run_id, "train_loss") == [1, 2]

    # The same command once the server is back, in a new process (the first one's lease lapses).
    monkeypatch.setattr(lease, "_dead_here", lambda owner: True)
    again = Tracker(uri, limit=2)
    [outcome] = suite.run_cells([c], tracker=again, device=CPU, data_dir=None, checkpoint_root=tmp_path / "ck")
    assert outcome.status == "finished" and outcome.run_id == run.info.run_id
    assert steps(again, run.info.run_id, "train_loss") == list(range(1, 9))
    assert not (ckdir / suite.JOURNAL).exists()
    per_epoch = -(-900 // 32)  # 900 training images in batches of 32
    assert steps(again, run.info.run_id, "train_step_loss") == [
        e * per_epoch + i for e in range(8) for i in range(10, per_epoch + 1, 10)
    ]

    # The numbers are those of a run that saw no outage.
    plain = Tracker(f"sqlite:///{tmp_path / 'plain.db'}")
    [done] = suite.run_cells([c], tracker=plain, device=CPU, data_dir=None, checkpoint_root=tmp_path / "plain")
    for key in ("train_loss", "val_acc", "test_acc"):
        assert [m.value for m in again.client.get_metric_history(run.info.run_id, key)] == [
            m.value for m in plain.client.get_metric_history(done.run_id, key)
        ]


def test_the_study_storage_waits_out_dropped_connections(tmp_path, monkeypatch):
    monkeypatch.setenv(outage.LIMIT_ENV, "60")
    monkeypatch.setattr(outage, "FIRST_DELAY_S", 0.02)  # the same retries, without a minute of waits
    storage = Storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    chance = random.Random(0)
    drops = iter([chance.random() < 0.15 for _ in range(150)])  # about one statement in seven fails, for a while

    dropped = []

    @sqlalchemy.event.listens_for(storage.engine, "before_cursor_execute")
    def drop(conn, cursor, statement, params, context, executemany):
        if next(drops, False):
            dropped.append(statement)
            raise sqlalchemy.exc.OperationalError(
                statement, params, Exception("server closed the connection unexpectedly")
            )

    study = optuna.create_study(storage=storage, study_name="s")

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        for step in range(3):
            trial.report(x * step, step)
        return x

    study.optimize(objective, n_trials=3)
    sqlalchemy.event.remove(storage.engine, "before_cursor_execute", drop)
    trials = study.get_trials()
    assert len(dropped) >= 10
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert all(t.intermediate_values == {0: 0.0, 1: t.params["x"], 2: 2 * t.params["x"]} for t in trials)


def test_a_trial_whose_creation_lost_its_reply_is_made_once(tmp_path, monkeypatch):
    storage = Storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(storage=storage, study_name="s")
    made = RDBStorage._create_new_trial
    lost = iter([True])

    def reply_lost(self, study_id, template_trial=None):
        trial = made(self, study_id, template_trial)
        if next(lost, False):  # the database made it; the reply never came
            raise optuna.exceptions.StorageInternalError("commit") from sqlalchemy.exc.OperationalError(
                "COMMIT", {}, Exception("connection is lost")
            )
        return trial

    monkeypatch.setattr(RDBStorage, "_create_new_trial", reply_lost)
    trial = storage._create_new_trial(study._study_id)
    [only] = RDBStorage.get_all_trials(storage, study._study_id)
    assert (
        only._trial_id == trial._trial_id
        and only.state == optuna.trial.TrialState.RUNNING
        and TOKEN in only.system_attrs
    )


def lost_reply(monkeypatch, method: str) -> None:
    """RDBStorage's `method` is done by the database once, and its reply lost."""
    real = getattr(RDBStorage, method)
    lost = iter([True])

    def call(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        if next(lost, False):
            raise optuna.exceptions.StorageInternalError("commit") from sqlalchemy.exc.OperationalError(
                "COMMIT", {}, Exception("connection is lost")
            )
        return result

    monkeypatch.setattr(RDBStorage, method, call)


def test_a_state_change_whose_reply_was_lost_is_read_back(tmp_path, monkeypatch):
    storage = Storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=60)
    study = optuna.create_study(storage=storage, study_name="s")
    study.enqueue_trial({"x": 0.5})
    [waiting] = study.get_trials()
    # Taken from the queue by the lost attempt: not run by this worker (another may have taken it),
    # but given a heartbeat, so that it goes stale and is queued again if nobody runs it.
    lost_reply(monkeypatch, "set_trial_state_values")
    assert storage.set_trial_state_values(waiting._trial_id, optuna.trial.TrialState.RUNNING) is False
    assert RDBStorage.get_trial(storage, waiting._trial_id).state == optuna.trial.TrialState.RUNNING
    assert storage._get_stale_trial_ids(study._study_id) == []  # beaten just now
    # Failed by the lost attempt, a trial another worker runs: made again, and refused as done
    # (Optuna's stale-trial sweep takes that as another worker's doing).
    monkeypatch.undo()
    lost_reply(monkeypatch, "set_trial_state_values")
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(waiting._trial_id, optuna.trial.TrialState.FAIL)
    # Completed by the lost attempt, a trial this worker runs: done, not an error.
    mine = study.ask()
    monkeypatch.undo()
    lost_reply(monkeypatch, "set_trial_state_values")
    assert storage.set_trial_state_values(mine._trial_id, optuna.trial.TrialState.COMPLETE, [0.5]) is True
    assert RDBStorage.get_trial(storage, mine._trial_id).value == 0.5


def refused_once():
    failures = iter([ConnectionRefusedError("Connection refused")])

    def call():
        failure = next(failures, None)
        if failure is not None:
            raise failure

    return call


def test_after_an_outage_no_running_trial_is_stale_until_its_worker_could_beat(tmp_path, monkeypatch):
    storage = Storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    monkeypatch.setattr(RDBStorage, "_get_stale_trial_ids", lambda self, study_id: [trial._trial_id])
    assert storage._get_stale_trial_ids(study._study_id) == [trial._trial_id]
    storage._retry(refused_once())  # an outage this process waited out, just now
    assert storage._get_stale_trial_ids(study._study_id) == []  # its heartbeat may be as old as the outage
    storage._recovered_at -= 1 + outage.MAX_DELAY_S  # a heartbeat interval and a backoff later
    assert storage._get_stale_trial_ids(study._study_id) == [trial._trial_id]
    # The look for stale trials is itself what waits out the outage: its answer comes too early.
    refused = refused_once()
    monkeypatch.setattr(RDBStorage, "_get_stale_trial_ids", lambda self, study_id: refused() or [trial._trial_id])
    assert storage._get_stale_trial_ids(study._study_id) == []


def test_a_heartbeat_outlives_an_outage_and_a_call_past_the_limit_is_not_waited_for_again(tmp_path, monkeypatch):
    monkeypatch.setenv(outage.LIMIT_ENV, "0.5")
    storage = Storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1)
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()

    def away(self, trial_id):
        raise optuna.exceptions.StorageInternalError("x") from sqlalchemy.exc.OperationalError(
            "", {}, Exception("Connection refused")
        )

    monkeypatch.setattr(RDBStorage, "record_heartbeat", away)
    # Logged, not raised: Optuna's heartbeat thread goes on, and it waits one interval at most.
    storage.record_heartbeat(trial._trial_id)
    assert not storage._gave_up  # a beat does not speak for the worker's own calls
    with pytest.raises(outage.Unavailable):
        storage._retry(lambda: away(storage, trial._trial_id))
    assert storage._gave_up  # the limit is spent: the worker's next call tries once
    tries = []
    with pytest.raises(outage.Unavailable):
        storage._retry(lambda: tries.append(1) or away(storage, trial._trial_id))
    assert tries == [1]
    storage._retry(lambda: None)  # the database is back
    assert not storage._gave_up


def first_command_loses_the_store(monkeypatch) -> list:
    """Every command's Tracker sees the store through `Away`; the first command's store goes away
    for good once it holds a train_loss at step 2. Returns the trackers as they are made."""
    from bench import tracking

    made = []

    class GoesAway(Tracker):
        def __init__(self, uri, limit=None):
            super().__init__(uri, limit)
            away = self.client._client = Away(self.client._client)
            if not made:
                away.after["log_batch"] = lambda kw: setattr(
                    away, "down", away.down or any(m.key == "train_loss" and m.step == 2 for m in kw.get("metrics", ()))
                )
            made.append(self)

    monkeypatch.setattr(tracking, "Tracker", GoesAway)
    return made


@pytest.mark.slow
def test_bench_run_exits_75_when_the_server_stays_away_and_the_same_command_finishes(tmp_path, monkeypatch, capsys):
    from bench import cli

    monkeypatch.chdir(tmp_path)
    made = first_command_loses_the_store(monkeypatch)
    monkeypatch.setattr(lease, "_dead_here", lambda owner: True)  # the second command is another process
    argv = [
        "run",
        "resnetb-cifar10",
        "--profile",
        "smoke",
        "--seeds",
        "1",
        "--epochs",
        "6",
        "--outage-limit",
        "2",
        *[a for s in TINY_SETS for a in ("--set", s)],
        "--set",
        "train.system_metrics=false",
    ]
    assert cli.main(argv) == 75
    err = capsys.readouterr().err
    assert (
        "stopped: the tracking store sqlite:///mlflow.db has been unreachable or failing" in err and "checkpoint" in err
    )
    assert cli.main(argv) == 0
    client = made[-1].client
    [run] = client.search_runs([client.get_experiment_by_name("resnetb-cifar10").experiment_id])
    assert run.info.status == "FINISHED" and steps(made[-1], run.info.run_id, "train_loss") == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_trial_stopped_by_an_outage_is_failed_and_run_again_by_the_same_command(tmp_path, monkeypatch, capsys):
    from bench import cli

    monkeypatch.chdir(tmp_path)
    made = first_command_loses_the_store(monkeypatch)
    argv = [
        "tune",
        "resnetb-cifar10",
        "--profile",
        "smoke",
        "--epochs",
        "4",
        "--trials",
        "2",
        "--study",
        "s",
        "--storage",
        f"sqlite:///{tmp_path / 'optuna.db'}",
        "--outage-limit",
        "2",
        *[a for s in TINY_SETS for a in ("--set", s)],
        "--set",
        "train.system_metrics=false",
    ]
    assert cli.main(argv) == 75
    assert "stopped: the tracking store" in capsys.readouterr().err
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    [first, retry] = study.trials
    assert first.state == optuna.trial.TrialState.FAIL and first.user_attrs["bench.failure"] == "tracking_unavailable"
    assert retry.state == optuna.trial.TrialState.WAITING and retry.system_attrs["fixed_params"] == first.params
    assert retry.user_attrs["bench.retry_of"] == 0

    assert cli.main(argv) == 0
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert (
        states.count(optuna.trial.TrialState.FAIL) == 1
        and len(
            [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
        )
        == 2
    )
    client = made[-1].client
    run = client.get_run(first.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"  # left RUNNING by the outage, ended by the next command


def test_the_journal_keeps_unsent_batches_mends_a_torn_line_and_goes_once_all_are_sent(tmp_path):
    path = tmp_path / "metrics-journal.jsonl"
    journal = delivery.Journal(path)
    first = journal.add([Metric("loss", 1.0, 1, 1)])
    second = journal.add([Metric("loss", 0.5, 2, 2), Metric("acc", float("nan"), 2, 2)])
    journal.sent(first)
    journal.compact()
    assert [n for n, _ in journal.held()] == [second]
    with open(path, "a") as f:
        f.write('{"n": 3, "metrics": [["loss", 0.2')  # a process killed while writing
    again = delivery.Journal(path)  # the next attempt
    third = again.add([Metric("loss", 0.1, 3, 3)])
    held = again.held()
    assert [n for n, _ in held] == [second, third] and third > second
    assert [(m.key, m.step) for m in held[0][1]] == [("loss", 2), ("acc", 2)]
    again.sent(third)
    again.compact()
    assert not path.exists()


def test_a_removed_tag_or_a_model_link_whose_reply_was_lost_is_not_an_error(tracker):
    from mlflow.entities import LoggedModelOutput

    exp = tracker.experiment_id("e")
    run_id = tracker.start_run(exp, "r", {"bench.failure": "error"})
    away = tracker.client._client
    away.lose_reply.add("delete_tag")
    tracker.client.delete_tag(run_id, "bench.failure")  # sent again, MLflow would say the tag is not there
    assert "bench.failure" not in tracker.client.get_run(run_id).data.tags and away.calls["delete_tag"] == 1
    model = tracker.client.create_logged_model(exp, name="model", source_run_id=run_id)
    away.lose_reply.add("log_outputs")
    tracker.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=1)])
    assert [o.model_id for o in tracker.client.get_run(run_id).outputs.model_outputs] == [model.model_id]
    assert away.calls["log_outputs"] == 1


def test_a_stop_waits_for_the_store_its_own_short_while(tracker):
    exp = tracker.experiment_id("e")
    run_id = tracker.start_run(exp, "r", {})
    tracker.client._client.down = True
    with tracker.limited(0.5):
        with tracker.limited(5):  # an inner wait is never longer than the outer one
            with pytest.raises(outage.Unavailable) as inner:
                tracker.set_tags(run_id, {"k": "v"})
        with pytest.raises(outage.Unavailable) as outer:
            tracker.set_tags(run_id, {"k": "v"})
    assert inner.value.limit == 0.5 and outer.value.limit == 0.5
    with pytest.raises(outage.Unavailable) as after:
        with tracker.limited(1):
            tracker.end_run(run_id, "KILLED")
    assert after.value.limit == 1 and tracker.limit == 30  # the command's own limit is back
    assert not hasattr(tracker._local, "limit")
