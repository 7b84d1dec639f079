"""Tuning: the search space, the recipe as trial 0, pruning, MLflow parent and child runs, a
study continued after SIGKILL, and optuna-dashboard reading the study."""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import TINY_SETS, fit_stopped_in_a_write
from mlflow.tracking import MlflowClient
from servers import DIRECT

from bench import cli, config, engine, tuning
from bench.errors import UserError
from bench.tuning import sampling

TINY_ARGS = [arg for s in TINY_SETS for arg in ("--set", s)]
TUNE = ["tune", "resnetb-cifar10", "--profile", "smoke", "--epochs", "2", *TINY_ARGS]


def _smoke(experiment="resnetb-cifar10"):
    return config.load(experiment, profile="smoke", seed=0)


# --- search space -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "experiment", ["hw4-resnet-cifar100", "resnet18-finetune-cifar100", "bottleneck-cifar10", "resnetb-cifar10"]
)
def test_every_experiment_searches_lr_and_wd_log_uniform_and_batch_categorical(experiment):
    cfg = config.load(experiment, profile="paper")
    space = {p.name: p for p in tuning.search_space(experiment, cfg)}
    assert sorted(space) == ["data.batch_size", "optim.lr", "optim.weight_decay"]
    for key in ("optim.lr", "optim.weight_decay"):
        p = space[key]
        assert (p.kind, p.log) == ("float", True) and p.low < cfg.flat()[key] < p.high
    assert space["data.batch_size"].kind == "categorical" and cfg.data.batch_size in space["data.batch_size"].choices


def test_the_recipe_is_the_first_trial_and_its_batch_is_a_choice():
    cfg = _smoke()
    space = tuning.search_space("resnetb-cifar10", cfg)
    assert tuning.recipe_values(space, cfg) == {"data.batch_size": 32, "optim.lr": 0.025, "optim.weight_decay": 5e-4}
    assert 32 in next(p for p in space if p.name == "data.batch_size").choices


def _experiments_with_search(tmp_path, monkeypatch, search: str, experiment: str = "resnetb-cifar10") -> None:
    root = tmp_path / "experiments"
    shutil.copytree(config.experiments_dir(), root)
    path = root / f"{experiment}.toml"
    text = path.read_text()
    path.write_text(text[: text.index("[search]")] + search)
    monkeypatch.setenv("BENCH_EXPERIMENTS", str(root))


def test_without_a_search_table_the_default_brackets_the_recipe(tmp_path, monkeypatch):
    _experiments_with_search(tmp_path, monkeypatch, "")
    space = {p.name: p for p in tuning.search_space("resnetb-cifar10", _smoke())}
    assert (space["optim.lr"].low, space["optim.lr"].high) == pytest.approx((0.0025, 0.25))
    assert space["data.batch_size"].choices == (16, 32, 64)


@pytest.mark.parametrize(
    "search, words",
    [
        ('[search]\n"optim.nope" = { type = "float", low = 1, high = 2 }\n', ["optim.nope", "not a config key"]),
        ('[search]\n"optim.lr" = { type = "float", low = 2, high = 1 }\n', ["optim.lr", "low < high"]),
        ('[search]\n"optim.lr" = { type = "float", low = 0, high = 1, log = true }\n', ["optim.lr", "low > 0"]),
        ('[search]\n"optim.lr" = { type = "normal" }\n', ["optim.lr", "float, int or categorical"]),
        ('[search]\n"data.batch_size" = { type = "categorical" }\n', ["data.batch_size", "choices"]),
    ],
)
def test_bad_search_spaces_name_the_key(search, words, tmp_path, monkeypatch):
    _experiments_with_search(tmp_path, monkeypatch, search)
    with pytest.raises(UserError) as err:
        tuning.search_space("resnetb-cifar10", _smoke())
    assert all(w in str(err.value) for w in words)


def test_trial_values_round_trip_through_set_and_the_best_command():
    values = {"optim.lr": 0.0123, "data.batch_size": 64, "optim.weight_decay": 1e-4}
    cfg = config.load("resnetb-cifar10", profile="smoke", sets=tuning.as_sets(values))
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.optim.weight_decay) == (0.0123, 64, 1e-4)
    cmd = tuning.best_command("resnetb-cifar10", "smoke", values, fixed=["model.widths=[4,8,8]"], epochs=2)
    assert cmd == (
        "bench run resnetb-cifar10 --profile smoke --seeds 3 --epochs 2 --set 'model.widths=[4,8,8]' "
        "--set data.batch_size=64 --set optim.lr=0.0123 --set optim.weight_decay=0.0001"
    )


# --- the sampler: continued studies draw new values, repeatably ---------------------------------


def _session(storage: str, trials: int, sampler: str, space: list[tuning.Param], cfg) -> optuna.Study:
    """One `bench tune --trials N` as the command opens the study, with a quick objective of the
    drawn values in place of training."""
    store = tuning.storage(storage, 60)
    seed = sampling.sampler_seed(0, store, "s", alone=True)
    study = tuning.open_study(
        store,
        "s",
        sampler_=sampling.sampler(sampler, seed, space),
        pruner_=tuning.pruner("none", 1),
        first_trial=tuning.recipe_values(space, cfg),
        experiment="resnetb-cifar10",
        profile="smoke",
    )

    def quick(trial):
        values = {p.name: p.suggest(trial) for p in space}
        return -abs(math.log(values["optim.lr"] / 0.05)) - values["data.batch_size"] / 1000

    study.optimize(quick, n_trials=trials - len(study.trials))
    return study


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_continued_study_draws_no_set_twice_and_the_same_commands_make_the_same_trials(sampler, tmp_path):
    cfg = _smoke()
    space = tuning.search_space("resnetb-cifar10", cfg)
    studies = []
    for store in ("a", "b"):
        url = f"sqlite:///{tmp_path / store}.db"
        _session(url, 8, sampler, space, cfg)
        studies.append(_session(url, 16, sampler, space, cfg))
    sets = [tuple(sorted(t.params.items())) for t in studies[0].trials]
    assert len(sets) == 16 and len(set(sets)) == 16
    assert sets == [tuple(sorted(t.params.items())) for t in studies[1].trials]


def test_a_categorical_only_space_is_tried_once_each_then_reported_spent(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", direction="maximize")
    space = [tuning.Param("data.batch_size", "categorical", choices=(16, 32, 64))]
    study.sampler = sampling.sampler("tpe", 0, space)
    study.enqueue_trial({"data.batch_size": 32})
    assert sampling.untried_sets(study, space) == 2
    # TPE alone draws the best choice again and again once it has a model (n_startup_trials=1).
    study.sampler.base = optuna.samplers.TPESampler(seed=0, n_startup_trials=1)
    study.optimize(lambda t: t.suggest_categorical("data.batch_size", [16, 32, 64]) / 64, n_trials=3)
    assert sorted(t.params["data.batch_size"] for t in study.trials) == [16, 32, 64]
    assert sampling.untried_sets(study, space) == 0


class CountingTPE(optuna.samplers.TPESampler):
    """Optuna's TPE, counting the trials whose values it drew together (multivariate)."""

    together = 0

    def sample_relative(self, study, trial, search_space):
        values = super().sample_relative(study, trial, search_space)
        self.together += bool(values)
        return values


def test_tpe_still_draws_the_values_together():
    """Optuna 5's TPE is multivariate: it models the values jointly once its start-up is over."""
    space = [
        tuning.Param("optim.lr", "float", low=1e-3, high=1.0, log=True),
        tuning.Param("optim.weight_decay", "float", low=1e-6, high=1e-2, log=True),
    ]
    study = optuna.create_study(direction="maximize")
    study.sampler = sampling.sampler("tpe", 0, space)
    study.sampler.base = CountingTPE(seed=0, n_startup_trials=3)
    study.optimize(lambda t: -sum(abs(math.log10(p.suggest(t))) for p in space), n_trials=8)
    assert study.sampler.base.together == 5


def test_under_hyperband_no_set_is_drawn_twice():
    """The hyperband pruner shows a sampler one bracket's trials; the sets tried are the study's."""
    space = [
        tuning.Param("data.batch_size", "categorical", choices=tuple(range(8))),
        tuning.Param("model.stem_width", "categorical", choices=tuple(range(5))),
    ]
    study = optuna.create_study(direction="maximize", pruner=tuning.pruner("hyperband", 3))
    study.sampler = sampling.sampler("tpe", 0, space)

    def objective(trial):
        a, b = (p.suggest(trial) for p in space)
        for step in (1, 2, 3):
            trial.report(a + b / 10 + step, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return a + b / 10

    study.optimize(objective, n_trials=40)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 40


def test_of_two_trials_that_drew_the_same_values_the_later_gives_way_and_holds_none():
    study = optuna.create_study()
    first, second = study.ask(), study.ask()  # two workers, drawing at the same instant
    for trial in (first, second):
        trial.suggest_categorical("data.batch_size", [32])
    assert not sampling.repeats(first) and sampling.repeats(second)
    second.set_user_attr("bench.failure", "repeat")
    study.tell(second, state=optuna.trial.TrialState.FAIL)
    assert sampling.tried([study.trials[second.number]]) == set()  # its values still count as untried


def test_a_finite_space_is_not_spent_while_a_retry_waits():
    space = [tuning.Param("data.batch_size", "categorical", choices=(32,))]
    study = optuna.create_study()
    study.enqueue_trial({"data.batch_size": 32})
    trial = study.ask()
    trial.suggest_categorical("data.batch_size", [32])
    trial.set_user_attr("bench.failure", "interrupted")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert sampling.spent(study, space)
    assert sampling.queue_interrupted(study) == [trial.number]
    assert not sampling.spent(study, space)  # the retry holds a tried set and is still to run
    assert sampling.queue_interrupted(study) == []  # queued once
    [retry] = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert retry.user_attrs["bench.retry_of"] == trial.number


def test_pruning_callback_reports_val_acc_and_asks_the_engine_to_stop():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    trial = study.ask()
    cb = tuning.Pruning(trial)
    assert cb.on_epoch_end(1, {"val_acc": 0.7}) is False
    assert cb.on_epoch_end(2, {"val_acc": 0.3}) is True and cb.pruned_at == 2
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {1: 0.7, 2: 0.3}


# --- the command ------------------------------------------------------------------------------------


def _children(uri: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("resnetb-cifar10")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("bench.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("bench.kind") == "trial"]
    return parents, children


def test_tune_runs_a_study_tracked_as_one_parent_with_a_child_per_trial(in_tmp, capsys):
    assert cli.main([*TUNE, "--trials", "3"]) == 0
    study = optuna.load_study(study_name="resnetb-cifar10-smoke", storage="sqlite:///optuna.db")
    trials = study.get_trials(states=tuning.FINISHED)
    assert len(trials) == 3
    assert trials[0].params == {"data.batch_size": 32, "optim.lr": 0.025, "optim.weight_decay": 5e-4}  # the recipe
    assert all(len(t.intermediate_values) >= 1 for t in trials)  # every epoch reported to the pruner

    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    parents, children = _children(uri)
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.data.params["search.optim.lr"] == "float [0.01, 0.5] log"
    assert parent.data.metrics["best_val_acc"] == pytest.approx(study.best_value)
    assert parent.data.tags["best.optim.lr"] == str(study.best_params["optim.lr"])
    assert sorted(int(c.data.tags["optuna.trial"]) for c in children) == [0, 1, 2]
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert c.data.tags["optuna.study"] == "resnetb-cifar10-smoke"
        assert c.data.tags["optuna.state"] in ("COMPLETE", "PRUNED")
        t = study.trials[int(c.data.tags["optuna.trial"])]
        assert c.data.params["optim.lr"] == str(t.params["optim.lr"])  # the same dotted names
        assert "bench.config_hash" not in c.data.tags  # never mistaken for a suite cell
        assert "val_acc" in c.data.metrics and not {"test_acc", "test_loss", "best_test_acc"} & c.data.metrics.keys()
    out = capsys.readouterr().out
    assert (
        "3 finished trials in study resnetb-cifar10-smoke" in out and "bench run resnetb-cifar10 --profile smoke" in out
    )

    # The same command with more trials continues the same study under the same parent run.
    assert cli.main([*TUNE, "--trials", "4"]) == 0
    assert len(study.get_trials(states=tuning.FINISHED)) == 4
    parents, children = _children(uri)
    assert len(parents) == 1 and len(children) == 4 and parents[0].info.status == "FINISHED"
    capsys.readouterr()
    assert cli.main([*TUNE, "--trials", "4", "--best"]) == 0
    assert f"best trial {study.best_trial.number}: val_acc {study.best_value:.4f}" in capsys.readouterr().out


def _stopped_in_trial_1(args, tmp_path, env, sig: int) -> tuple[subprocess.Popen, optuna.trial.FrozenTrial | None, str]:
    """Start `bench tune`, send `sig` in the middle of trial 1 (after its first epoch): the
    process (ended), trial 1 as it was then, and the process's stderr."""
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    stopped = None
    deadline = time.time() + 240
    while stopped is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name="resnetb-cifar10-smoke", storage=storage)
        except Exception:  # not created yet
            continue
        running = [
            t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING and t.number == 1
        ]
        if running and running[0].intermediate_values:
            proc.send_signal(sig)
            stopped = running[0]
    _, err = proc.communicate(timeout=60)
    return proc, stopped, err


@pytest.mark.slow
def test_a_trial_killed_by_sigkill_is_failed_and_rerun_with_its_parameters(tmp_path, subprocess_env):
    args = [sys.executable, "-m", "bench", *TUNE, "--trials", "3", "--heartbeat", "1", "--sampler", "random"]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    _, killed, err = _stopped_in_trial_1(args, tmp_path, subprocess_env, signal.SIGKILL)
    assert killed is not None, err
    time.sleep(3)  # past the grace period of two heartbeats

    again = subprocess.run(args, cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name="resnetb-cifar10-smoke", storage=storage)
    assert len(study.get_trials(states=tuning.FINISHED)) == 3
    assert study.trials[1].state == optuna.trial.TrialState.FAIL
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retried) == 1 and retried[0].params == killed.params and retried[0].state in tuning.FINISHED
    _, children = _children(f"sqlite:///{tmp_path / 'mlflow.db'}")
    by_trial = {}
    for c in children:
        by_trial.setdefault(c.data.tags["optuna.trial"], []).append(c)
    assert all(len(v) == 1 for v in by_trial.values())  # each trial exactly one child run
    dead = by_trial["1"][0]
    assert (dead.info.status, dead.data.tags["optuna.state"]) == ("FAILED", "FAIL")


def test_a_stop_a_library_made_an_error_of_ends_the_trial_as_a_stop(in_tmp, monkeypatch):
    """SIGTERM that torch.save (say) turned into its own error while it cleaned up: the trial is
    interrupted and queued again, not failed as an error the study goes on past."""
    stopped_in_a_write = fit_stopped_in_a_write(engine.fit)
    monkeypatch.setattr(engine, "fit", stopped_in_a_write)
    assert cli.main([*TUNE, "--trials", "3"]) == 143
    study = optuna.load_study(study_name="resnetb-cifar10-smoke", storage="sqlite:///optuna.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert study.trials[0].user_attrs["bench.failure"] == "interrupted"
    assert study.trials[1].user_attrs["bench.retry_of"] == 0
    _, [child] = _children(
        f"sqlite:///{in_tmp / 'mlflow.db'}"
    )  # absolute: MLflow keeps one engine per URI in a process
    assert (child.info.status, child.data.tags["bench.interrupted_by"]) == ("KILLED", "SIGTERM")


@pytest.mark.slow
def test_a_trial_stopped_by_sigterm_is_queued_again_with_its_parameters(tmp_path, subprocess_env):
    """Preemption: optuna fails an interrupted trial at once (no heartbeat to run out), so its
    retry is queued by the command; the next command trains it."""
    args = [sys.executable, "-m", "bench", *TUNE, "--trials", "3", "--sampler", "random"]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc, stopped, err = _stopped_in_trial_1(args, tmp_path, subprocess_env, signal.SIGTERM)
    assert stopped is not None, err
    assert proc.returncode == 143, err
    study = optuna.load_study(study_name="resnetb-cifar10-smoke", storage=storage)
    assert study.trials[1].state == optuna.trial.TrialState.FAIL
    assert study.trials[1].user_attrs["bench.failure"] == "interrupted"
    [queued] = [t for t in study.trials if t.user_attrs.get("bench.retry_of") == 1]
    assert queued.state == optuna.trial.TrialState.WAITING
    _, children = _children(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [child] = [c for c in children if c.data.tags["optuna.trial"] == "1"]
    assert (child.info.status, child.data.tags["bench.interrupted_by"]) == ("KILLED", "SIGTERM")

    again = subprocess.run(args, cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name="resnetb-cifar10-smoke", storage=storage)
    assert len(study.get_trials(states=tuning.FINISHED)) == 3
    retried = study.trials[queued.number]
    assert retried.params == stopped.params and retried.state in tuning.FINISHED


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_optuna_dashboard_serves_the_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = _smoke()
    space = tuning.search_space("resnetb-cifar10", cfg)
    tuning.open_study(
        tuning.storage(storage, 60),
        "resnetb-cifar10-smoke",
        sampler_=sampling.sampler("tpe", 0, space),
        pruner_=tuning.pruner("median", 3),
        first_trial=tuning.recipe_values(space, cfg),
        experiment="resnetb-cifar10",
        profile="smoke",
    )
    port = _free_port()
    exe = Path(sys.executable).with_name("optuna-dashboard")
    server = subprocess.Popen(
        [str(exe), storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        body = None
        # Start-up imports take seconds, and more on 2 busy cores.
        deadline = time.monotonic() + 120
        while body is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with DIRECT.open(f"http://127.0.0.1:{port}/api/studies", timeout=5) as resp:
                    body = json.load(resp)
            except OSError:
                time.sleep(0.25)
        assert body is not None, f"optuna-dashboard did not answer (exit {server.poll()})"
        names = [s["study_name"] for s in body["study_summaries"]]
        assert names == ["resnetb-cifar10-smoke"]
        with DIRECT.open(
            f"http://127.0.0.1:{port}/api/studies/{body['study_summaries'][0]['study_id']}", timeout=30
        ) as resp:
            assert json.load(resp)["objective_names"] == ["val_acc"]  # the value's name in the dashboard
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert server.returncode is not None


def test_without_optuna_dashboard_trials_still_name_their_runs_and_an_older_study_gets_its_objective_name(
    in_tmp, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # not installed: importing it raises ImportError
    storage = "sqlite:///optuna.db"
    optuna.create_study(
        study_name="resnetb-cifar10-smoke", storage=storage, direction="maximize"
    )  # made before val_acc was named
    assert cli.main([*TUNE, "--trials", "1"]) == 0
    study = optuna.load_study(study_name="resnetb-cifar10-smoke", storage=storage)
    assert study.metric_names == ["val_acc"]
    client = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    run = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert run.data.tags["optuna.trial"] == "0"
    # The path to open in `mlflow ui`, as the parent run's at the end of the output.
    assert (
        study.trials[0].user_attrs["mlflow_run_url"] == f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    )
    parent = study.user_attrs["mlflow_run_url"]
    assert parent == f"#/experiments/{run.info.experiment_id}/runs/{run.data.tags['mlflow.parentRunId']}"
    assert (
        f"See the study's runs: mlflow ui --backend-store-uri sqlite:///mlflow.db, then open {parent}"
        in capsys.readouterr().out
    )
    monkeypatch.undo()
    from optuna_dashboard import get_note

    assert get_note(optuna.Trial(study, study.trials[0]._trial_id)) == ""


@pytest.mark.parametrize(
    "args, words",
    [
        (["tune", "nope"], ["nope"]),
        ([*TUNE, "--trials", "0"], ["--trials"]),
        ([*TUNE, "--storage", "nope://x"], ["Optuna storage", "nope://x"]),
        ([*TUNE, "--storage", "postgresql://u:s3cret@127.0.0.1:9/db"], ["Optuna storage", "u:***@"]),
        ([*TUNE, "--set", "optim.lr=-1"], ["optim.lr"]),
    ],
)
def test_tune_bad_input_exits_2_with_one_line(args, words, in_tmp, capsys):
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err
    assert "s3cret" not in err


# --- a recipe without a validation split; trials that fail ----------------------------------------


@pytest.mark.slow
def test_tune_holds_out_a_split_when_the_recipe_has_none_and_the_best_command_does_not_keep_it(in_tmp, capsys):
    args = [
        "tune",
        "resnetb-cifar10",
        "--profile",
        "smoke",
        "--epochs",
        "1",
        *TINY_ARGS,
        "--set",
        "data.val_size=0",
        "--sampler",
        "random",
    ]
    assert cli.main([*args, "--trials", "2"]) == 0
    assert "tuning holds out 100 of them" in capsys.readouterr().err  # a tenth of the 1000 embedded images
    assert cli.main([*args, "--trials", "3"]) == 0  # continued: new values, the same split
    study = optuna.load_study(study_name="resnetb-cifar10-smoke", storage="sqlite:///optuna.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3
    assert all(t.user_attrs["data.val_size"] == 100 for t in study.trials)
    _, children = _children(f"sqlite:///{in_tmp / 'mlflow.db'}")
    assert sorted(c.data.params["data.val_size"] for c in children) == ["100"] * 3
    capsys.readouterr()
    assert cli.main([*args, "--best"]) == 0
    command = capsys.readouterr().out.splitlines()[-1]
    assert command.startswith("bench run") and "data.val_size=0" in command and "data.val_size=100" not in command


# hw4 at 8 px ends on a 1x1 map: a batch of one image cannot train its BatchNorm, and a batch of
# 1016 of the 1017 training images (1117 embedded, 100 held out) leaves one for the last step.
HW4 = [
    "tune",
    "hw4-resnet-cifar100",
    "--profile",
    "smoke",
    "--epochs",
    "1",
    "--sampler",
    "random",
    "--pruner",
    "none",
    *[
        a
        for s in (
            "model.widths=[4,4,4,4]",
            "model.blocks=[1,1,1,1]",
            "model.stem_width=4",
            "data.image_size=8",
            "model.pool_kernel=1",
            "data.val_size=100",
        )
        for a in ("--set", s)
    ],
]


@pytest.mark.slow
def test_a_trial_that_raises_fails_alone_with_its_reason_and_the_study_goes_on(
    tmp_path, monkeypatch, in_tmp, capsys, caplog
):
    search = '[search]\n"optim.lr" = { type = "float", low = 1e-3, high = 0.1, log = true }\n"data.batch_size" = { type = "categorical", choices = [1016] }\n'
    _experiments_with_search(tmp_path, monkeypatch, search, "hw4-resnet-cifar100")
    # Batches of 1016 fail, the recipe's 32 trains; the draws are the same for a seed, and seed 1
    # mixes them (seed 0 draws 1016 five times in a row: the study stops, as the next test has it).
    assert cli.main([*HW4, "--trials", "3", "--seed", "1"]) == 0
    study = optuna.load_study(study_name="hw4-resnet-cifar100-smoke", storage="sqlite:///optuna.db")
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(study.get_trials(states=tuning.FINISHED)) == 3 and failed
    client = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    for t in failed:
        assert t.params["data.batch_size"] == 1016 and t.user_attrs["bench.failure"] == "error"
        assert t.user_attrs["bench.failure_reason"].startswith("ValueError: Expected more than 1 value per channel")
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert (run.info.status, run.data.tags["optuna.state"]) == ("FAILED", "FAIL")
        assert run.data.tags["bench.failure_reason"] == t.user_attrs["bench.failure_reason"]
    assert f"trial {failed[0].number} " in capsys.readouterr().err
    # Where it failed, without --debug (optuna's own warning with the traceback is hidden).
    shown = [r.getMessage() for r in caplog.records if r.name == "bench.tuning.trial" and r.levelno == logging.ERROR]
    assert any(
        m.startswith(f"trial {failed[0].number} of study hw4-resnet-cifar100-smoke failed:") and "Traceback" in m
        for m in shown
    )


@pytest.mark.slow
def test_a_study_whose_every_trial_fails_stops_after_five_in_a_row_with_exit_1(tmp_path, monkeypatch, in_tmp, capsys):
    _experiments_with_search(
        tmp_path,
        monkeypatch,
        '[search]\n"optim.lr" = { type = "float", low = 1e-3, high = 0.1, log = true }\n',
        "hw4-resnet-cifar100",
    )
    assert cli.main([*HW4, "--set", "data.batch_size=1016", "--trials", "2"]) == 1
    study = optuna.load_study(study_name="hw4-resnet-cifar100-smoke", storage="sqlite:///optuna.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * tuning.MAX_FAILURES_IN_A_ROW
    assert "5 trials in a row failed, the last with ValueError: Expected more than 1 value" in capsys.readouterr().err


@pytest.mark.slow
def test_tune_stops_when_a_finite_space_has_no_untried_values_left(tmp_path, monkeypatch, in_tmp, capsys):
    _experiments_with_search(
        tmp_path, monkeypatch, '[search]\n"data.batch_size" = { type = "categorical", choices = [16] }\n'
    )
    assert (
        cli.main(["tune", "resnetb-cifar10", "--profile", "smoke", "--epochs", "1", *TINY_ARGS, "--trials", "3"]) == 1
    )
    study = optuna.load_study(study_name="resnetb-cifar10-smoke", storage="sqlite:///optuna.db")
    assert sorted(t.params["data.batch_size"] for t in study.trials) == [16, 32]  # the recipe's 32 and the one choice
    assert "every set of values of the search space has been tried: 2 of 3 trials finished" in capsys.readouterr().err


def test_a_trial_whose_outcome_tags_cannot_be_written_still_ends_its_run(monkeypatch, in_tmp):
    # Its run would stay RUNNING, and its system metrics sampled for the rest of the process.
    from bench.tracking import Tracker

    original = Tracker.set_tags

    def failing(self, run_id, tags):
        if "optuna.state" in tags:
            raise RuntimeError("the tracking store went away")
        return original(self, run_id, tags)

    monkeypatch.setattr(Tracker, "set_tags", failing)
    with pytest.raises(RuntimeError, match="went away"):
        cli.main([*HW4, "--trials", "1"])
    client = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hw4-resnet-cifar100")
    trials = client.search_runs([exp.experiment_id], filter_string="tags.`bench.kind` = 'trial'")
    assert trials and all(r.info.status != "RUNNING" for r in trials)
