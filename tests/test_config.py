"""Config loading: experiment files, profiles, --set/--epochs overrides, validation, hashing."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from bench import config
from bench.config import load, parse_assignment
from bench.errors import UserError

EXPERIMENTS = ["bottleneck-cifar10", "hw4-resnet-cifar100", "resnet18-finetune-cifar100", "resnetb-cifar10"]


# --- the recipes as reported -------------------------------------------------------------------


def test_hw4_paper_profile_is_the_reported_recipe():
    cfg = load("hw4-resnet-cifar100", profile="paper")
    assert cfg.experiment == "hw4-resnet-cifar100"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.01, 0.9, 1e-5)
    assert cfg.data.batch_size == 256
    assert cfg.data.dataset == "cifar100"
    assert cfg.data.source == "official"
    assert cfg.eval.mode == "train"
    assert cfg.eval.remeasure_train_acc is True
    assert cfg.model.name == "hw4_resnet"
    assert cfg.model.options["post_add_relu"] is False
    assert cfg.model.options["shortcut_kernel"] == 3
    assert cfg.train.epochs == 100
    assert cfg.schedule.name == "none"


def test_the_other_paper_recipes():
    r2 = load("resnet18-finetune-cifar100", profile="paper")
    assert (r2.optim.name, r2.optim.lr, r2.schedule.name, r2.schedule.gamma) == ("adam", 1e-3, "exponential", 0.95)
    assert r2.model.options["weights"] == "imagenet"
    assert r2.data.image_size == 224
    r4 = load("resnetb-cifar10", profile="paper")
    assert (r4.schedule.name, r4.schedule.step_size, r4.schedule.gamma) == ("step", 20, 0.1)
    assert (r4.optim.lr, r4.data.batch_size, r4.train.epochs) == (0.1, 128, 100)
    r3 = load("bottleneck-cifar10", profile="paper")
    assert r3.model.name == "bottleneck_resnet" and r3.schedule.name == "none" and r3.train.epochs == 200


def test_descriptive_keys_are_not_part_of_the_config():
    flat = load("resnetb-cifar10", profile="paper").flat()
    assert not any(k.startswith(("title", "about")) for k in flat)


# --- profiles ----------------------------------------------------------------------------------


def test_smoke_profile_applies_to_every_experiment():
    for name in EXPERIMENTS:
        cfg = load(name, profile="smoke")
        assert cfg.data.source == "embedded", name
        # R3 and R4 hold out 100 of the subset's images where the paper holds out 5000; R1 and R2
        # train on all of them, as their recipes do.
        assert cfg.data.val_size == (0 if load(name, profile="paper").data.val_size == 0 else 100), name
        assert cfg.data.batch_size == 32, name
        assert cfg.train.epochs == 3, name
        assert cfg.train.checkpoint_every == 2, name


def test_smoke_profile_per_experiment_overrides():
    r2 = load("resnet18-finetune-cifar100", profile="smoke")
    assert r2.model.options["weights"] == "none"
    assert r2.data.image_size == 64
    assert load("resnetb-cifar10", profile="smoke").optim.lr == 0.025
    assert load("bottleneck-cifar10", profile="smoke").optim.lr == 0.025
    # An experiment without a per-experiment part keeps its own values.
    assert load("hw4-resnet-cifar100", profile="smoke").optim.lr == 0.01
    # The paper profile overrides nothing.
    assert load("resnet18-finetune-cifar100", profile="paper").model.options["weights"] == "imagenet"


def test_profile_seeds():
    assert config.profile_seeds("paper") == 3
    assert config.profile_seeds("smoke") == 1


def test_layer_precedence_in_a_custom_experiments_dir(tmp_path, monkeypatch):
    """experiment file < profile < profile's per-experiment part < --epochs < --set."""
    src = Path(config.__file__).resolve().parent.parent / "experiments"
    dst = tmp_path / "exps"
    shutil.copytree(src, dst)
    (dst / "profiles" / "layered.toml").write_text(
        "[overrides.optim]\nlr = 0.2\nmomentum = 0.5\n"
        "[overrides.train]\nepochs = 7\ncheckpoint_every = 3\n"
        "[experiments.resnetb-cifar10.overrides]\noptim.lr = 0.3\ntrain.checkpoint_every = 4\n"
    )
    monkeypatch.setenv("BENCH_EXPERIMENTS", str(dst))
    assert config.experiments_dir() == dst
    assert "layered" in config.list_profiles()
    cfg = load("resnetb-cifar10", profile="layered")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.train.epochs, cfg.train.checkpoint_every) == (0.3, 0.5, 7, 4)
    other = load("bottleneck-cifar10", profile="layered")
    assert (other.optim.lr, other.train.checkpoint_every) == (0.2, 3)
    cfg = load("resnetb-cifar10", profile="layered", epochs=9, sets=["optim.lr=0.4"])
    assert (cfg.optim.lr, cfg.train.epochs) == (0.4, 9)
    cfg = load("resnetb-cifar10", profile="layered", epochs=9, sets=["train.epochs=11"])
    assert cfg.train.epochs == 11


# --- --set and --epochs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("optim.lr=0.05", "optim.lr", 0.05),
        ("optim.lr=1e-3", "optim.lr", 1e-3),
        ("train.epochs=12", "train.epochs", 12),
        ("train.deterministic=false", "train.deterministic", False),
        ("optim.nesterov=true", "optim.nesterov", True),
        ("model.widths=[4, 8, 8]", "model.widths", [4, 8, 8]),
        ("data.mean=[0.5,0.5,0.5]", "data.mean", [0.5, 0.5, 0.5]),
        ("model.weights=none", "model.weights", "none"),
        ("model.weights=/tmp/my weights.pt", "model.weights", "/tmp/my weights.pt"),
        ('eval.mode="train"', "eval.mode", "train"),
        (" optim.lr = 0.5 ", "optim.lr", 0.5),
    ],
)
def test_parse_assignment(text, key, value):
    got_key, got_value = parse_assignment(text)
    assert got_key == key
    assert got_value == value
    assert type(got_value) is type(value)


@pytest.mark.parametrize("text", ["garbage", "=1", "optim.lr", "optim..lr=1", "optim.l-r=1", "1optim.lr=2"])
def test_parse_assignment_rejects_malformed_text(text):
    with pytest.raises(UserError, match="key=value"):
        parse_assignment(text)


def test_sets_are_applied_with_their_types(tiny_sets):
    cfg = load(
        "resnetb-cifar10",
        profile="smoke",
        sets=[*tiny_sets, "optim.lr=0.5", "train.deterministic=false", "eval.mode=train", "data.val_size=0"],
    )
    assert cfg.optim.lr == 0.5
    assert cfg.train.deterministic is False
    assert cfg.eval.mode == "train"
    assert cfg.data.val_size == 0
    assert cfg.model.options == {"widths": (4, 8, 8), "blocks_per_stage": 1, "stem_width": 4, "expansion": 4}


def test_set_model_weights_none_on_the_finetune():
    cfg = load("resnet18-finetune-cifar100", profile="paper", sets=["model.weights=none", "model.freeze_backbone=true"])
    assert cfg.model.options == {"weights": "none", "freeze_backbone": True}


def test_int_is_accepted_where_a_float_is_expected():
    cfg = load("resnetb-cifar10", profile="paper", sets=["optim.lr=1"])
    assert cfg.optim.lr == 1.0


def test_epochs_argument():
    assert load("resnetb-cifar10", profile="paper", epochs=5).train.epochs == 5
    assert load("resnetb-cifar10", profile="smoke", epochs=1).train.epochs == 1


def test_set_beats_profile():
    assert load("resnetb-cifar10", profile="smoke", sets=["optim.lr=0.5"]).optim.lr == 0.5
    assert load("resnetb-cifar10", profile="smoke", sets=["data.source=official"]).data.source == "official"
    assert load("resnet18-finetune-cifar100", profile="smoke", sets=["data.image_size=32"]).data.image_size == 32


def test_later_set_wins():
    assert load("resnetb-cifar10", profile="paper", sets=["optim.lr=0.5", "optim.lr=0.25"]).optim.lr == 0.25


def test_seed_is_recorded():
    assert load("resnetb-cifar10", profile="paper", seed=2).seed == 2
    with pytest.raises(UserError, match="seed"):
        load("resnetb-cifar10", profile="paper", seed=-1)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sets, names",
    [
        (["optim.nope=1"], ["optim.nope", "unknown key"]),
        (["nope=1"], ["nope", "unknown key"]),
        (["optim.lr=abc"], ["optim.lr", "abc"]),
        (["train.epochs=1.5"], ["train.epochs"]),
        (["optim.lr=-1"], ["optim.lr", "-1"]),
        (["optim.lr=0"], ["optim.lr"]),
        (["optim.momentum=1.5"], ["optim.momentum"]),
        (["schedule.gamma=2"], ["schedule.gamma"]),
        (["data.batch_size=0"], ["data.batch_size"]),
        (["data.val_size=-5"], ["data.val_size"]),
        (["data.mean=[0.5, 0.5]"], ["data.mean"]),
        (["optim.name=rmsprop"], ["optim.name", "rmsprop"]),
        (["eval.mode=test"], ["eval.mode"]),
        (["data.dataset=mnist"], ["data.dataset"]),
        (["model.nope=1"], ["model", "nope"]),
        (["model.widths=3"], ["model", "widths"]),
        (["model.blocks_per_stage=true"], ["model", "blocks_per_stage"]),
        (["model.stem_width=4.5"], ["model", "stem_width"]),
        (["model.name=vgg"], ["model", "vgg"]),
        (["optim.lr.x=1"], ["optim.lr", "value"]),
    ],
)
def test_bad_values_raise_a_user_error_naming_the_key(sets, names):
    with pytest.raises(UserError) as info:
        load("resnetb-cifar10", profile="smoke", sets=sets)
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message


def test_an_error_message_says_which_experiment_and_profile():
    with pytest.raises(UserError, match=r"resnetb-cifar10 \(profile smoke\): optim.lr"):
        load("resnetb-cifar10", profile="smoke", sets=["optim.lr=-1"])


def test_several_errors_are_counted():
    with pytest.raises(UserError, match="and 1 more"):
        load("resnetb-cifar10", profile="smoke", sets=["optim.lr=-1", "train.epochs=0"])


def test_unknown_model_option_lists_the_options():
    with pytest.raises(UserError, match="widths"):
        load("resnetb-cifar10", profile="smoke", sets=["model.width=4"])


def test_unknown_experiment_profile_and_suite():
    with pytest.raises(UserError, match="unknown experiment 'nope'.*resnetb-cifar10"):
        load("nope", profile="paper")
    with pytest.raises(UserError, match="unknown profile 'fast'.*smoke"):
        load("resnetb-cifar10", profile="fast")
    with pytest.raises(UserError, match="unknown suite 'most'.*all"):
        config.suite_experiments("most")


def test_missing_or_broken_toml_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        config.read_toml(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = ")
    with pytest.raises(UserError, match="not valid TOML"):
        config.read_toml(bad)


# --- flat, hash, listing -----------------------------------------------------------------------


def test_flat_has_dotted_keys_and_plain_values():
    cfg = load("resnetb-cifar10", profile="paper")
    flat = cfg.flat()
    for key in (
        "experiment",
        "seed",
        "model.name",
        "model.widths",
        "data.batch_size",
        "data.mean",
        "optim.lr",
        "optim.momentum",
        "schedule.step_size",
        "train.epochs",
        "eval.mode",
    ):
        assert key in flat, key
    assert flat["optim.lr"] == 0.1
    assert flat["model.widths"] == [32, 64, 128]
    assert flat["data.mean"] == [0.4914, 0.4822, 0.4465]
    assert not any(isinstance(v, dict) for v in flat.values())
    # Every section's every field is there, defaults included.
    assert {k.split(".")[0] for k in flat} == {
        "experiment",
        "seed",
        "model",
        "data",
        "optim",
        "schedule",
        "train",
        "eval",
    }
    assert "data.split_seed" in flat and "eval.remeasure_train_acc" in flat


def test_config_hash():
    a = load("resnetb-cifar10", profile="paper")
    b = load("resnetb-cifar10", profile="paper")
    assert a.config_hash() == b.config_hash()
    assert len(a.config_hash()) == 12 and int(a.config_hash(), 16) >= 0
    assert load("resnetb-cifar10", profile="paper", seed=2).config_hash() == a.config_hash()
    assert load("resnetb-cifar10", profile="paper", sets=["optim.lr=0.05"]).config_hash() != a.config_hash()
    assert load("resnetb-cifar10", profile="paper", epochs=3).config_hash() != a.config_hash()
    assert load("resnetb-cifar10", profile="smoke").config_hash() != a.config_hash()
    assert load("bottleneck-cifar10", profile="paper").config_hash() != a.config_hash()
    # Setting a value to what it already is does not change the hash.
    assert load("resnetb-cifar10", profile="paper", sets=["optim.lr=0.1"]).config_hash() == a.config_hash()


def test_config_is_frozen():
    cfg = load("resnetb-cifar10", profile="paper")
    with pytest.raises(Exception):  # noqa: B017 (pydantic's error for a frozen model)
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_listing():
    assert config.list_experiments() == EXPERIMENTS
    assert config.list_profiles() == ["paper", "smoke"]
    suites = config.read_suites()
    assert sorted(suites["all"]) == EXPERIMENTS
    assert sorted(suites["cifar10"]) == ["bottleneck-cifar10", "resnetb-cifar10"]
    for name, exps in suites.items():
        assert set(exps) <= set(EXPERIMENTS), name


@pytest.mark.parametrize("profile", ["paper", "smoke"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_validates_in_every_profile(experiment, profile):
    cfg = load(experiment, profile=profile)
    assert cfg.experiment == experiment
    assert cfg.train.epochs >= 1


def test_experiments_dir_falls_back_to_the_package_source(in_tmp):
    assert config.experiments_dir().resolve() == Path(config.__file__).resolve().parent.parent / "experiments"
    assert config.list_experiments() == EXPERIMENTS


def test_experiments_dir_prefers_the_working_directory(in_tmp):
    src = Path(config.__file__).resolve().parent.parent / "experiments"
    shutil.copytree(src, in_tmp / "experiments")
    (in_tmp / "experiments" / "extra-cifar10.toml").write_text((src / "resnetb-cifar10.toml").read_text())
    assert config.experiments_dir() == Path("experiments")
    assert "extra-cifar10" in config.list_experiments()
    assert load("extra-cifar10", profile="paper").experiment == "extra-cifar10"


@pytest.mark.parametrize("value", ["[4.5, 8, 8]", '["a", "b", "c"]'])
def test_model_list_options_check_their_items(value):
    with pytest.raises(UserError, match="widths"):
        load("resnetb-cifar10", profile="smoke", sets=[f"model.widths={value}"])


@pytest.mark.parametrize("text, key, value", [("seed=5", "seed", 5), ("experiment=other", "experiment", "other")])
def test_a_set_of_seed_or_experiment_is_not_silently_ignored(text, key, value):
    try:
        cfg = load("resnetb-cifar10", profile="paper", seed=0, sets=[text])
    except UserError as exc:
        assert key in str(exc)
    else:
        assert cfg.flat()[key] == value


# --- result keys: what the config hash and "comparable" use -------------------------------------

NON_RESULT_SETS = [
    "train.compile=true",
    "train.channels_last=false",
    "train.checkpoint_every=1",
    "train.checkpoint_min_interval_s=0",
    "train.log_every_steps=10",
    "train.deterministic=false",
    "data.eval_batch_size=1000",
]


def test_result_keys_leave_out_speed_checkpoints_and_logging():
    keys = load("resnetb-cifar10", profile="paper").result_keys()
    assert keys == sorted(keys) and "seed" in keys
    for key in (
        "optim.lr",
        "data.batch_size",
        "data.val_size",
        "data.source",
        "model.widths",
        "schedule.step_size",
        "train.epochs",
        "train.amp",
        "eval.mode",
        "eval.remeasure_train_acc",
    ):
        assert key in keys, key
    for key in (
        "experiment",
        "data.eval_batch_size",
        "train.compile",
        "train.channels_last",
        "train.checkpoint_every",
        "train.checkpoint_min_interval_s",
        "train.log_every_steps",
        "train.deterministic",
    ):
        assert key not in keys, key
    # R1 evaluates with BatchNorm's batch statistics: there the eval batch changes the accuracy.
    assert "data.eval_batch_size" in load("hw4-resnet-cifar100", profile="paper").result_keys()


@pytest.mark.parametrize("assignment", NON_RESULT_SETS)
def test_settings_that_change_no_result_keep_the_config_hash(assignment):
    a = load("resnetb-cifar10", profile="paper")
    assert load("resnetb-cifar10", profile="paper", sets=[assignment]).config_hash() == a.config_hash()


@pytest.mark.parametrize(
    "assignment", ["train.amp=false", "optim.nesterov=true", "data.split_seed=1", 'eval.mode="train"']
)
def test_settings_that_change_the_result_change_the_config_hash(assignment):
    a = load("resnetb-cifar10", profile="paper")
    assert load("resnetb-cifar10", profile="paper", sets=[assignment]).config_hash() != a.config_hash()


def test_eval_batch_size_changes_the_hash_where_evaluation_uses_batch_statistics():
    a = load("hw4-resnet-cifar100", profile="paper")
    assert (
        load("hw4-resnet-cifar100", profile="paper", sets=["data.eval_batch_size=1000"]).config_hash()
        != a.config_hash()
    )


def test_a_weights_file_counts_by_its_content(tmp_path):
    state = tmp_path / "state.pth"
    state.write_bytes(b"weights one")
    copy = tmp_path / "elsewhere" / "copy.pth"
    copy.parent.mkdir()
    copy.write_bytes(b"weights one")
    other = tmp_path / "other.pth"
    other.write_bytes(b"weights two")

    def hashed(weights: str) -> str:
        return load("resnet18-finetune-cifar100", profile="paper", sets=[f"model.weights={weights}"]).config_hash()

    assert hashed(str(state)) == hashed(str(copy)) != hashed(str(other))
    assert hashed(str(state)) not in (hashed("imagenet"), hashed("none"))
    digest = hashlib.sha256(b"weights one").hexdigest()
    assert config.weights_identity(str(copy)) == f"sha256:{digest}"
    # torchvision's ImageNet file, wherever it lies, is "imagenet": its name carries its digest's first digits.
    assert config.weights_identity(str(copy), imagenet_prefix=digest[:8]) == "imagenet"
    assert config.imagenet_sha256_prefix() == "f37072fd"
    assert config.weights_identity(str(tmp_path / "missing.pth")) == str(tmp_path / "missing.pth")


@pytest.mark.parametrize(
    "experiment, profile, sets, before",
    [
        # The hashes bench gave these configs before the hash counted only the result keys.
        ("bottleneck-cifar10", "smoke", [], "b2734f207511"),
        ("bottleneck-cifar10", "paper", [], "474161d37c51"),
        ("bottleneck-cifar10", "paper", ["optim.lr=0.05"], "e30a4daa8fad"),
        # The smoke profile held out 100 images of R2's subset then.
        ("resnet18-finetune-cifar100", "smoke", ["data.val_size=100"], "63851a220e98"),
        ("resnetb-cifar10", "smoke", ["optim.lr=0.05", "schedule.step_before_epoch=false"], "1ecb18de9088"),
    ],
)
def test_the_earlier_hash_is_the_one_bench_gave_the_same_config_before(experiment, profile, sets, before):
    assert config.load(experiment, profile=profile, seed=0, sets=sets).earlier_hash() == before


def test_no_earlier_hash_for_a_config_no_earlier_bench_could_run():
    assert config.load("resnetb-cifar10", profile="paper").schedule.step_before_epoch
    assert config.load("resnetb-cifar10", profile="paper").earlier_hash() is None


def test_a_config_whose_evaluation_draws_random_numbers_is_another_config_than_before():
    """Evaluation passes draw from streams of their own now; before, R1's train-mode evaluation
    (dropout) and re-measure pass (augmentation) took training's draws, and learned other weights."""
    import hashlib
    import json

    def before(cfg) -> str:  # the hash as it was: the result keys alone
        values = {k: v for k, v in cfg.result_values().items() if k != "seed"}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    for sets in ([], ['eval.mode="eval"'], ["eval.remeasure_train_acc=false"]):
        cfg = load("hw4-resnet-cifar100", profile="smoke", sets=sets)
        assert cfg.evaluation_draws() and cfg.config_hash() != before(cfg) and cfg.earlier_hash() is None
    standard = load("hw4-resnet-cifar100", profile="smoke", sets=['eval.mode="eval"', "eval.remeasure_train_acc=false"])
    assert not standard.evaluation_draws() and standard.config_hash() == before(standard)
    r4 = load("resnetb-cifar10", profile="smoke")
    assert r4.config_hash() == before(r4)
