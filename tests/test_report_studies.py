"""The report's tuning section: studies read from a real Optuna storage, the best-trials table,
optuna's plots written, linked and identical from one report to the next."""

from __future__ import annotations

import re

import optuna
import pytest
from test_report import ALL, NO_DIFF, paper_results

from bench import report, results
from bench.report import studies as section

optuna.logging.set_verbosity(optuna.logging.ERROR)

# val_acc of each trial, its epochs (intermediate values) and whether it was pruned.
TRIALS = [
    {"lr": 0.01, "wd": 1e-5, "batch": 32, "acc": [0.20, 0.30, 0.40]},  # trial 0: the recipe
    {"lr": 0.05, "wd": 1e-4, "batch": 64, "acc": [0.30, 0.50, 0.60]},
    {"lr": 0.002, "wd": 1e-6, "batch": 32, "acc": [0.05], "pruned": True},
    {"lr": 0.02, "wd": 3e-5, "batch": 128, "acc": [0.40, 0.55, 0.60]},  # ties trial 1: the earlier first
    {"lr": 0.03, "wd": 5e-5, "batch": 64, "acc": [0.40, 0.45, 0.50]},
    {"lr": 0.04, "wd": 2e-5, "batch": 64, "acc": [0.40, 0.42, 0.45]},
    {"lr": 0.06, "wd": 2e-4, "batch": 128, "acc": [0.40, 0.41, 0.42]},
]


def make_study(storage: str, name: str, trials=TRIALS, attrs: dict | None = None) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    for key, value in (attrs or {}).items():
        study.set_user_attr(key, value)
    dist = {
        "optim.lr": optuna.distributions.FloatDistribution(1e-3, 0.1, log=True),
        "optim.weight_decay": optuna.distributions.FloatDistribution(1e-6, 1e-3, log=True),
        "data.batch_size": optuna.distributions.CategoricalDistribution([32, 64, 128]),
    }
    for i, spec in enumerate(trials):
        pruned = spec.get("pruned", False)
        study.add_trial(
            optuna.trial.create_trial(
                params={"optim.lr": spec["lr"], "optim.weight_decay": spec["wd"], "data.batch_size": spec["batch"]},
                distributions=dist,
                value=None if pruned else max(spec["acc"]),
                intermediate_values=dict(enumerate(spec["acc"], 1)),
                user_attrs={"bench.recipe": True} if i == 0 else {"mlflow_run_id": f"run{i}"},
                state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE,
            )
        )
    return study


@pytest.fixture
def storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    make_study(url, "tuned-by-hand", attrs={"bench.experiment": "hw4-resnet-cifar100", "bench.profile": "smoke"})
    make_study(url, "resnetb-cifar10-paper", trials=TRIALS[:2])  # no attributes: found by its name
    make_study(url, "something-else", trials=TRIALS[:1])
    return url


def test_studies_of_the_suite_are_found_by_attributes_or_name(storage):
    found = results.load_studies(storage, ALL)
    assert sorted(found.handles) == ["resnetb-cifar10-paper", "tuned-by-hand"]
    t = found.trials
    owners = t.groupby("study")[["experiment", "profile"]].first().to_dict("index")
    assert owners == {
        "resnetb-cifar10-paper": {"experiment": "resnetb-cifar10", "profile": "paper"},
        "tuned-by-hand": {"experiment": "hw4-resnet-cifar100", "profile": "smoke"},
    }
    mine = t[t.study == "tuned-by-hand"].reset_index(drop=True)
    assert list(mine.number) == list(range(len(TRIALS)))
    assert list(mine.state) == ["PRUNED" if s.get("pruned") else "COMPLETE" for s in TRIALS]
    assert list(mine.epochs) == [len(s["acc"]) for s in TRIALS]
    assert mine.recipe.tolist() == [True] + [False] * (len(TRIALS) - 1)
    assert mine.loc[1, "optim.lr"] == 0.05 and mine.loc[1, "mlflow_run_id"] == "run1"
    assert results.load_studies(storage, ["bottleneck-cifar10"]).handles == {}


def test_best_table_ranks_complete_trials_and_shows_the_recipe(storage):
    found = results.load_studies(storage, ALL)
    trials = found.trials[found.trials.study == "tuned-by-hand"]
    text = section.markdown(found, {})
    header, _, *body = section.best_table(trials)[0].splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in body]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "trial",
        "best val_acc",
        "epochs",
        "data.batch_size",
        "optim.lr",
        "optim.weight_decay",
    ]
    assert [r[0] for r in rows] == ["1", "3", "4", "5", "6", "0 (recipe)"]  # by val_acc, ties by trial number
    assert rows[0][1:] == ["60.00 %", "3", "64", "0.05", "0.0001"]
    assert rows[-1][1:] == ["40.00 %", "3", "32", "0.01", "1e-05"]
    assert "7 trials (6 complete, 1 pruned), 19 epochs trained." in text
    assert "Best: trial 1, val_acc 0.6000" in text


def test_write_adds_the_plots_links_them_and_repeats_the_bytes(storage, tmp_path):
    import matplotlib

    found = results.load_studies(storage, ALL)
    summary = report.summarize(paper_results(), ALL, suite="all", **NO_DIFF)
    with matplotlib.rc_context({"axes.facecolor": "red"}):
        first = report.write(summary, tmp_path / "a", found)
        assert matplotlib.rcParams["axes.facecolor"] == "red"  # optuna's ggplot style did not leak
    second = report.write(summary, tmp_path / "b", results.load_studies(storage, ALL))
    text = first.read_text()
    assert "## Tuning" in text and "### Study `tuned-by-hand`: hw4-resnet-cifar100, profile `smoke`" in text
    for stem in ("tuning_tuned-by-hand", "tuning_resnetb-cifar10-paper"):
        for kind in ("history", "parallel", "intermediate", "timeline"):
            assert f"({stem}_{kind}.png)" in text
    assert "(tuning_tuned-by-hand_importances.png)" in text
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (first.parent / link).is_file(), link
    for path in first.parent.iterdir():
        assert path.read_bytes() == (second.parent / path.name).read_bytes(), path.name


def test_plots_that_need_complete_trials_are_left_out_and_said_so(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    make_study(url, "hw4-resnet-cifar100-smoke", trials=[TRIALS[2]])  # pruned only
    make_study(url, "resnetb-cifar10-smoke", trials=TRIALS[:3])  # two complete trials
    make_study(url, "bottleneck-cifar10-smoke", trials=[TRIALS[0], TRIALS[2]])  # one complete trial
    found = results.load_studies(url, ALL)
    drawn = section.draw(found, tmp_path)
    # What the pruner saw and when the trials ran need no complete trial.
    assert set(drawn["hw4-resnet-cifar100-smoke"]) == {"intermediate", "timeline"}
    assert set(drawn["bottleneck-cifar10-smoke"]) == {"history", "parallel", "intermediate", "timeline"}
    assert set(drawn["resnetb-cifar10-smoke"]) == {"history", "importances", "parallel", "intermediate", "timeline"}
    text = section.markdown(found, drawn)
    parts = dict(zip(re.findall(r"### Study `([^`]+)`", text), re.split(r"### Study ", text)[1:]))
    pruned_only = parts["hw4-resnet-cifar100-smoke"]
    assert "No complete trial yet" in pruned_only and "_history.png" not in pruned_only
    assert "(tuning_hw4-resnet-cifar100-smoke_intermediate.png)" in pruned_only and "_timeline.png)" in pruned_only
    assert "Parameter importances need two complete trials" in parts["bottleneck-cifar10-smoke"]
    assert "Parameter importances need" not in parts["resnetb-cifar10-smoke"]


@pytest.mark.slow
def test_a_running_trial_leaves_the_timeline_as_it_was(tmp_path):
    # Optuna draws a running trial up to the clock of the moment it draws: the same store would
    # give a new figure every time while a worker trains.
    import datetime as dt
    import hashlib
    import time

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="resnetb-cifar10-smoke", storage=url, direction="maximize")
    now = dt.datetime.now()
    lr = {"optim.lr": optuna.distributions.FloatDistribution(1e-3, 0.1, log=True)}
    study.add_trial(
        optuna.trial.FrozenTrial(
            number=0,
            state=optuna.trial.TrialState.COMPLETE,
            value=0.5,
            datetime_start=now - dt.timedelta(minutes=10),
            datetime_complete=now - dt.timedelta(minutes=5),
            params={"optim.lr": 0.01},
            distributions=lr,
            user_attrs={},
            system_attrs={},
            intermediate_values={1: 0.4, 2: 0.5},
            trial_id=0,
        )
    )
    running = study.ask()
    running.suggest_float("optim.lr", 1e-3, 0.1, log=True)
    running.report(0.3, 1)
    found = results.load_studies(url, ALL)
    digests = []
    for i in range(2):
        out = tmp_path / f"report{i}"
        out.mkdir()
        drawn = section.draw(found, out)["resnetb-cifar10-smoke"]
        digests.append(hashlib.sha256((out / drawn["timeline"]).read_bytes()).hexdigest())
        time.sleep(1.5)
    assert digests[0] == digests[1]


def test_failed_trials_alone_draw_no_intermediate_values_and_an_empty_study_is_named(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="resnetb-cifar10-smoke", storage=url, direction="maximize")
    lr = {"optim.lr": optuna.distributions.FloatDistribution(1e-3, 0.1, log=True)}
    study.add_trial(
        optuna.trial.create_trial(
            params={"optim.lr": 0.01},
            distributions=lr,
            intermediate_values={1: 0.2},
            state=optuna.trial.TrialState.FAIL,
        )
    )
    optuna.create_study(study_name="bottleneck-cifar10-smoke", storage=url)  # created, never run
    found = results.load_studies(url, ALL)
    drawn = section.draw(found, tmp_path)
    assert "intermediate" not in drawn["resnetb-cifar10-smoke"]  # optuna would draw empty axes
    text = section.markdown(found, drawn)
    assert "### Study `bottleneck-cifar10-smoke`" in text and "No trials yet." in text


def test_studies_whose_names_differ_only_in_replaced_characters_get_their_own_files():
    assert section.file_stem("resnetb-cifar10-smoke") == "tuning_resnetb-cifar10-smoke"  # a plain name stays as it is
    assert section.file_stem("resnetb smoke a") != section.file_stem("resnetb smoke_a")
