"""Ablations: the switches each experiment lists, their variants and cells, and `bench run --ablate`."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch

from bench import ablation, cli, config, suite
from bench.errors import UserError

EXPERIMENTS = ["hw4-resnet-cifar100", "resnet18-finetune-cifar100", "bottleneck-cifar10", "resnetb-cifar10"]
HW4 = "hw4-resnet-cifar100"

# Every quirk SPEC.md and the experiment files document, by the config keys that switch it.
QUIRKS = {
    HW4: {
        "eval.mode": "eval",  # accuracy measured without model.eval()
        "eval.remeasure_train_acc": False,  # train accuracy re-measured on the augmented loader
        "model.post_add_relu": True,  # no ReLU after the residual addition
        "model.shortcut_kernel": 1,  # 3x3 projection shortcuts
        "data.val_size": 5000,  # trained on all 50k images
        "optim.lr": 0.1,  # the other copy of the log's lr
    },
    "resnet18-finetune-cifar100": {"data.val_size": 5000},
    # No decay (the standard one, and ResNet-B's from the same seed); "Stack layers 4".
    "bottleneck-cifar10": {"schedule.name": "cosine", "schedule.step_size": 20, "model.widths": [32, 64, 128, 256]},
    "resnetb-cifar10": {
        "schedule.step_before_epoch": False,
        "model.widths": [32, 64, 128, 256],
    },  # R4's schedule step; "Stack layers 4"
}
# Keys the [about] gaps name that are not quirks to flip, and why.
NOT_SWITCHES = {
    "train.epochs": "R1 configured 500 epochs with a constant rate and reported epoch 100: its first 100 epochs are the recipe's",
    "model.blocks_per_stage": "Table 2's 'Stack layers 4' counts stacks (seed 004 3.4: 'three stack layers'): model.widths flips it",
}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_documented_quirk_is_an_ablation(experiment):
    found: dict[str, list] = {}
    for a in ablation.read(experiment):
        for k, v in a.values.items():
            found.setdefault(k, []).append(v)
    assert {k: v for k, v in QUIRKS[experiment].items() if v not in found.get(k, [])} == {}, "a quirk no ablation flips"
    gaps = config.read_experiment(experiment)["about"]["gaps"]
    named = set(re.findall(r"\b(?:model|data|optim|schedule|train|eval)\.[a-z_]+\b(?!\()", gaps))  # not model.eval()
    assert named - set(found) <= set(NOT_SWITCHES), "a switch the gaps name is neither an ablation nor explained"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("profile", ["paper", "smoke"])
def test_each_variant_is_a_valid_config_that_differs_from_the_recipe(experiment, profile):
    recipe = config.load(experiment, profile="paper").flat()
    rows = ablation.variants(experiment, profile)
    assert rows[0].name == ablation.RECIPE
    for v in rows[1:]:
        assert v.source and v.label != "-"
        if v.ablation is not None:
            assert any(
                recipe[k] != x for k, x in v.ablation.values.items()
            )  # it flips something (a step decay may keep gamma's default)
            assert (
                v.ablation.evaluation_only
                == (v.kind == ablation.EVALUATION_ONLY)
                == (set(v.ablation.values) <= set(ablation.EVALUATION_KEYS))
            )
        # Every trained variant is a config of its own: the recipe's hash would make it the recipe's cell.
        assert v.kind == ablation.EVALUATION_ONLY or (v.same_as is None and v.config_hash != rows[0].config_hash)


def test_the_profile_scales_an_ablation_and_all_standard_takes_every_standard_value():
    by_name = {v.name: v for v in ablation.variants(HW4, "smoke")}
    assert by_name["val-split"].sets == ("data.val_size=100",)
    assert {v.name: v.sets for v in ablation.variants(HW4, "paper")}["val-split"] == ("data.val_size=5000",)
    standard = [a for a in ablation.read(HW4) if a.kind == "standard"]
    cfg = config.load(HW4, profile="smoke", sets=list(by_name[ablation.ALL_STANDARD].sets))
    assert {k: cfg.flat()[k] for a in standard for k in a.values} == {
        "eval.mode": "eval",
        "eval.remeasure_train_acc": False,
        "model.post_add_relu": True,
        "model.shortcut_kernel": 1,
        "data.val_size": 100,
    }
    assert cfg.optim.lr == 0.01  # a reported alternative is not a standard value
    # One standard switch alone: no all-standard row (it would be that switch's config again).
    assert ablation.ALL_STANDARD not in {v.name for v in ablation.variants("resnetb-cifar10", "paper")}


def test_alternatives_are_the_evaluation_only_switches_a_config_does_not_already_measure():
    recipe = config.load(HW4, profile="smoke")
    assert [(s, e.mode, e.remeasure_train_acc) for s, e in ablation.alternatives(HW4, recipe)] == [
        ("eval.mode-eval", "eval", True),
        ("eval.remeasure_train_acc-false", "train", False),
    ]
    evaluated = config.load(HW4, profile="smoke", sets=['eval.mode="eval"'])
    assert [s for s, _ in ablation.alternatives(HW4, evaluated)] == ["eval.remeasure_train_acc-false"]
    standard = config.load(HW4, profile="smoke", sets=['eval.mode="eval"', "eval.remeasure_train_acc=false"])
    assert ablation.alternatives(HW4, standard) == []
    assert ablation.alternatives("resnetb-cifar10", config.load("resnetb-cifar10", profile="smoke")) == []
    names = {a.name: a.metric_name() for a in ablation.read(HW4) if a.evaluation_only}
    assert names == {
        "eval-mode": "test_acc/eval.mode-eval",
        "running-train-acc": "train_acc/eval.remeasure_train_acc-false",
    }


@pytest.fixture
def experiments_copy(tmp_path, monkeypatch):
    dst = tmp_path / "experiments"
    shutil.copytree(config.experiments_dir(), dst)
    monkeypatch.setenv("BENCH_EXPERIMENTS", str(dst))
    return dst


def _with_ablations(dst: Path, text: str) -> None:
    path = dst / "resnetb-cifar10.toml"
    body = path.read_text()
    start = body.index("[ablations.")
    path.write_text(body[:start] + text + "\n" + body[body.index("# `bench tune`") :])


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '[ablations.x]\nset = { "eval.mode" = "train" }\nkind = "standard"\nsource = "s"',
            "evaluation_only should be true",
        ),
        (
            '[ablations.x]\nset = { "optim.lr" = 0.2 }\nkind = "standard"\nsource = "s"\nevaluation_only = true',
            "evaluation_only should be false",
        ),
        (
            '[ablations.x]\nset = { "optim.lr" = 0.2 }\nkind = "usual"\nsource = "s"',
            "kind should be one of standard, reported",
        ),
        ('[ablations.x]\nset = { "optim.lr" = 0.2 }\nkind = "standard"', "source should say where"),
        ('[ablations.x]\nset = {}\nkind = "standard"\nsource = "s"', "set should be a table"),
        ('[ablations.recipe]\nset = { "optim.lr" = 0.2 }\nkind = "standard"\nsource = "s"', "the name is taken"),
        (
            '[ablations.x]\nset = { "optim.lr" = 0.2 }\nkind = "standard"\nsource = "s"\nnote = "n"',
            "should hold set, kind, source",
        ),
        (
            '[ablations.x]\nset = { "eval.mode" = "train", "eval.remeasure_train_acc" = true }\nkind = "standard"\nsource = "s"\nevaluation_only = true',
            "flips one key",
        ),
    ],
)
def test_a_malformed_ablation_is_named_with_its_file(experiments_copy, text, message):
    _with_ablations(experiments_copy, text)
    with pytest.raises(UserError, match=message) as err:
        ablation.variants("resnetb-cifar10", "paper")
    assert "resnetb-cifar10.toml: ablations." in str(err.value)


def test_an_ablation_value_the_config_rejects_names_the_ablation(experiments_copy):
    _with_ablations(experiments_copy, '[ablations.x]\nset = { "optim.lr" = -1.0 }\nkind = "standard"\nsource = "s"')
    with pytest.raises(UserError, match="ablation x of resnetb-cifar10: .*optim.lr"):
        ablation.variants("resnetb-cifar10", "paper")


def test_plan_with_ablate_trains_the_recipe_and_each_trained_variant_for_every_seed():
    cells = suite.plan([HW4, "resnetb-cifar10"], profile="smoke", seeds=2, ablate=True)
    got = [(c.experiment, c.ablation, c.cfg.seed) for c in cells]
    hw4 = ["recipe", "post-add-relu", "shortcut-1x1", "val-split", "lr-0.1", "all-standard"]
    r4 = ["recipe", "decay-after-epoch", "four-stages"]
    assert got == [(HW4, v, s) for v in hw4 for s in (0, 1)] + [("resnetb-cifar10", v, s) for v in r4 for s in (0, 1)]
    assert len({c.key for c in cells}) == len(cells)
    plain = suite.plan([HW4], profile="smoke", seeds=2)
    assert [c.key for c in plain] == [c.key for c in cells[:2]]  # the recipe's cells are the plain run's
    assert cells[2].run_tags["bench.ablation"] == "post-add-relu" and "bench.ablation" not in cells[2].tags


def test_ablate_refuses_set_and_epochs(in_tmp, capsys):
    for extra in (["--set", "optim.lr=0.05"], ["--epochs", "2"]):
        assert cli.main(["run", HW4, "--ablate", "--profile", "smoke", "--dry-run", *extra]) == 2
        assert "--ablate flips the switches of the profile's recipe" in capsys.readouterr().err


def test_dry_run_lists_every_variant_with_its_cost(in_tmp, capsys):
    assert cli.main(["run", HW4, "--ablate", "--profile", "smoke", "--seeds", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert set(rows) == {
        "recipe",
        "eval-mode",
        "running-train-acc",
        "post-add-relu",
        "shortcut-1x1",
        "val-split",
        "lr-0.1",
        "all-standard",
    }
    assert "0 (measured on every run's weights)" in rows["eval-mode"] and "evaluation only" in rows["eval-mode"]
    assert rows["post-add-relu"].split()[-3:-1] == ["2", "6"]  # 2 cells, 6 epochs
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split()[1] == "36"  # 6 trained variants x 2 seeds x 3 epochs
    assert "12 cells (the recipe and each trained variant x 2 seeds), profile smoke" in out
    assert "(post-add-relu)" in out and "(all-standard)" in out


TINY_PROFILE = """
description = "tiny models on the embedded subset"
seeds = 1
[overrides.data]
source = "embedded"
batch_size = 64
[overrides.train]
epochs = 2
checkpoint_every = 1
[experiments.hw4-resnet-cifar100.overrides]
model.blocks = [1, 1, 1, 1]
model.widths = [4, 8, 8, 8]
model.stem_width = 4
[ablations]
"data.val_size" = 100
"""


def _weights_hash(path: Path) -> str:
    state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode() + state[key].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
def test_ablate_runs_every_trained_variant_once_and_measures_the_evaluation_only_ones_on_the_recipes_weights(
    in_tmp, monkeypatch, capsys
):
    import mlflow

    experiments = in_tmp / "experiments"
    shutil.copytree(config.experiments_dir(), experiments)
    (experiments / "profiles" / "tiny.toml").write_text(TINY_PROFILE)
    monkeypatch.setenv("BENCH_EXPERIMENTS", str(experiments))
    # The recipe's seed 0 trained first by a plain run: --ablate skips it and tags it.
    assert cli.main(["run", HW4, "--profile", "tiny"]) == 0
    args = ["run", HW4, "--ablate", "--profile", "tiny", "--seeds", "2"]
    assert cli.main(args) == 0
    # An absolute URI: MLflow keeps a store (and its open SQLite connection) per URI string.
    client = mlflow.MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(HW4)
    runs = client.search_runs([exp.experiment_id])
    names = ["recipe", "post-add-relu", "shortcut-1x1", "val-split", "lr-0.1", "all-standard"]
    assert sorted((r.data.tags["bench.ablation"], r.data.tags["bench.seed"]) for r in runs) == sorted(
        (n, s) for n in names for s in "01"
    )
    assert {r.info.status for r in runs} == {"FINISHED"}
    recipe = {r.data.tags["bench.seed"]: r for r in runs if r.data.tags["bench.ablation"] == "recipe"}
    for run in recipe.values():
        for name in ("test_acc/eval.mode-eval", "test_loss/eval.mode-eval", "train_acc/eval.remeasure_train_acc-false"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2]
    standard = next(r for r in runs if r.data.tags["bench.ablation"] == "all-standard")
    assert not [k for k in standard.data.metrics if "/eval." in k]  # it measures the standard way already
    # The alternatives' passes are timed apart from the epoch the reported runs timed.
    assert "alternatives_time_s" in recipe["0"].data.metrics and "alternatives_time_s" not in standard.data.metrics

    # A second command skips every cell; nothing is trained or logged twice.
    capsys.readouterr()
    assert cli.main(args) == 0
    assert len(client.search_runs([exp.experiment_id])) == len(runs)
    assert capsys.readouterr().out.count(" skipped ") == len(runs)

    # The evaluation-only figures are those of the same weights evaluated the standard way: a run
    # trained with eval.mode = "eval" ends with the recipe's checkpoint, and its test_acc is the
    # recipe's test_acc/eval.mode-eval at every epoch.
    assert cli.main(["run", HW4, "--profile", "tiny", "--set", 'eval.mode="eval"']) == 0
    evaluated = next(
        r
        for r in client.search_runs(
            [exp.experiment_id], "tags.`bench.config_hash` != '{}'".format(recipe["0"].data.tags["bench.config_hash"])
        )
        if r.data.params.get("eval.mode") == "eval" and "bench.ablation" not in r.data.tags
    )
    ck = in_tmp / "checkpoints" / HW4
    recipe_ck = ck / f"tiny-seed0-{recipe['0'].data.tags['bench.config_hash']}" / "last.pt"
    evaluated_ck = ck / f"tiny-seed0-{evaluated.data.tags['bench.config_hash']}" / "last.pt"
    assert _weights_hash(recipe_ck) == _weights_hash(evaluated_ck)
    history = [m.value for m in client.get_metric_history(evaluated.info.run_id, "test_acc")]
    assert history == [m.value for m in client.get_metric_history(recipe["0"].info.run_id, "test_acc/eval.mode-eval")]


def test_a_study_records_the_config_it_starts_from(in_tmp):
    from bench import tuning
    from bench.tuning import sampling

    def opened(sets: list[str], name: str = f"{HW4}-smoke"):
        base = config.load(HW4, profile="smoke", sets=sets)
        space = tuning.search_space(HW4, base)
        return tuning.open_study(
            tuning.storage(f"sqlite:///{in_tmp / 'optuna.db'}", 60),
            name,
            sampler_=sampling.sampler("random", 0, space),
            pruner_=tuning.pruner("none", 1),
            first_trial=tuning.recipe_values(space, base),
            experiment=HW4,
            profile="smoke",
            base_config_hash=base.config_hash(),
        )

    study = opened(["model.post_add_relu=true"])
    post_add_relu = {v.name: v for v in ablation.variants(HW4, "smoke")}["post-add-relu"]
    assert study.user_attrs["bench.base_config_hash"] == post_add_relu.config_hash
    assert opened(["model.post_add_relu=true"]).user_attrs == study.user_attrs  # the same config continues the study
    # Only its recipe trial queued: nothing trained yet, so another command may still choose the config.
    assert opened([]).user_attrs["bench.base_config_hash"] == config.load(HW4, profile="smoke").config_hash()
    study = opened(["model.post_add_relu=true"])
    study.tell(study.ask(), 0.1)  # a trial trained on it
    with pytest.raises(UserError, match=f"study {HW4}-smoke tunes another config .*give this one its own --study NAME"):
        opened([])
    # --best reads the study whatever config the command names, and records none.
    assert (
        cli.main(["tune", HW4, "--profile", "smoke", "--best", "--storage", f"sqlite:///{in_tmp / 'optuna.db'}"]) == 0
    )
    # A study --best made (its recipe trial queued) takes the config of the first command that tunes it.
    assert (
        cli.main(
            [
                "tune",
                HW4,
                "--profile",
                "smoke",
                "--best",
                "--study",
                "fresh",
                "--storage",
                f"sqlite:///{in_tmp / 'optuna.db'}",
            ]
        )
        == 0
    )
    assert (
        opened(["model.post_add_relu=true"], "fresh").user_attrs["bench.base_config_hash"] == post_add_relu.config_hash
    )


def test_an_evaluation_only_switch_the_recipe_already_has_is_the_recipes(experiments_copy, in_tmp, capsys):
    profile = (experiments_copy / "profiles" / "smoke.toml").read_text()
    (experiments_copy / "profiles" / "standard.toml").write_text(profile + '\n[overrides.eval]\nmode = "eval"\n')
    by_name = {v.name: v for v in ablation.variants(HW4, "standard")}
    assert by_name["eval-mode"].same_as == ablation.RECIPE and by_name["running-train-acc"].same_as is None
    assert cli.main(["run", HW4, "--ablate", "--profile", "standard", "--dry-run"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  eval-mode"))
    assert "0 (the same as recipe)" in row


def test_a_profile_value_for_a_key_no_ablation_sets_is_refused(experiments_copy):
    smoke = experiments_copy / "profiles" / "smoke.toml"
    smoke.write_text(smoke.read_text().replace('"data.val_size" = 100', '"data.valsize" = 100'))
    with pytest.raises(UserError, match=r"smoke.toml: ablations.data.valsize: no experiment's ablation sets this key"):
        ablation.variants(HW4, "smoke")


def test_a_variant_the_data_cannot_hold_is_named_before_anything_trains(experiments_copy, in_tmp, capsys):
    smoke = experiments_copy / "profiles" / "smoke.toml"
    smoke.write_text(smoke.read_text().replace('"data.val_size" = 100', '"data.val_size" = 5000'))
    assert cli.main(["run", HW4, "--ablate", "--profile", "smoke"]) == 2
    assert (
        "hw4-resnet-cifar100 (ablation val-split): data.val_size=5000 leaves no training images"
        in capsys.readouterr().err
    )
    assert not (in_tmp / "checkpoints").exists() or not any((in_tmp / "checkpoints").rglob("*.pt"))


def test_a_study_an_older_bench_made_is_not_given_a_base_it_may_not_have_tuned(in_tmp):
    import optuna

    from bench import tuning
    from bench.tuning import sampling

    base = config.load(HW4, profile="smoke")
    space = tuning.search_space(HW4, base)
    store = tuning.storage(f"sqlite:///{in_tmp / 'optuna.db'}", 60)
    older = optuna.create_study(study_name="older", storage=store, direction="maximize")
    older.enqueue_trial(tuning.recipe_values(space, base))
    older.tell(older.ask(), 0.2)  # it tuned something, with no record of what
    study = tuning.open_study(
        store,
        "older",
        sampler_=sampling.sampler("random", 0, space),
        pruner_=tuning.pruner("none", 1),
        first_trial=tuning.recipe_values(space, base),
        experiment=HW4,
        profile="smoke",
        base_config_hash=base.config_hash(),
    )
    assert "bench.base_config_hash" not in study.user_attrs and study.user_attrs["bench.experiment"] == HW4


def test_the_cost_of_a_run_counts_its_evaluation_only_passes():
    from bench import perf

    meta = torch.device("meta")
    cfg = config.load(HW4, profile="paper")
    alternatives = ablation.alternatives(HW4, cfg)
    _, forward = perf.step_flops(cfg, meta)
    # eval.mode=eval measures the test set once more each epoch; the running train accuracy is free.
    extra = perf.run_flops(cfg, meta, alternatives=alternatives) - perf.run_flops(cfg, meta)
    assert extra == pytest.approx(cfg.train.epochs * perf.CIFAR_TEST * forward)
    assert perf.paper_flops(HW4, meta) == pytest.approx(perf.run_flops(cfg, meta, alternatives=alternatives))


def test_a_profile_cannot_scale_an_evaluation_only_switch(experiments_copy):
    smoke = experiments_copy / "profiles" / "smoke.toml"
    smoke.write_text(smoke.read_text() + '"eval.mode" = "train"\n')
    with pytest.raises(
        UserError, match=r"smoke.toml: ablations.eval.mode: an evaluation-only switch has no scale to change"
    ):
        ablation.variants(HW4, "smoke")
