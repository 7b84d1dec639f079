"""The reported figures as data: complete series, the headline numbers of SPEC, provenance."""

from __future__ import annotations

import pytest

from bench import config, reference

EXPERIMENTS = ["hw4-resnet-cifar100", "resnet18-finetune-cifar100", "bottleneck-cifar10", "resnetb-cifar10"]


@pytest.fixture(scope="module")
def curves():
    return reference.load_curves()


@pytest.fixture(scope="module")
def runs():
    return reference.load_runs()


def _series(curves, experiment, metric):
    s = curves[(curves.experiment == experiment) & (curves.metric == metric)]
    return dict(zip(s.epoch, s.value))


def test_every_reported_run_and_experiment_match(runs):
    assert sorted(runs) == sorted(EXPERIMENTS) == sorted(config.suite_experiments("all"))


@pytest.mark.parametrize(
    "experiment, metric, epochs",
    [
        ("hw4-resnet-cifar100", "train_loss", range(1, 102)),
        ("hw4-resnet-cifar100", "train_acc", range(1, 102)),
        ("hw4-resnet-cifar100", "test_acc", range(1, 102)),
        ("resnet18-finetune-cifar100", "train_loss", range(1, 15)),
        ("resnet18-finetune-cifar100", "test_acc", range(1, 15)),
        ("bottleneck-cifar10", "train_loss", range(1, 201)),
        ("bottleneck-cifar10", "train_time_s", range(1, 201)),
        ("bottleneck-cifar10", "test_acc", [10, 20, 40, 80, 100, 120, 160, 180, 200]),
        ("resnetb-cifar10", "train_loss", range(1, 101)),
        ("resnetb-cifar10", "lr", range(1, 101)),
        ("resnetb-cifar10", "train_time_s", range(1, 101)),
        ("resnetb-cifar10", "test_acc", range(10, 101, 10)),
    ],
)
def test_series_are_complete(curves, experiment, metric, epochs):
    assert sorted(_series(curves, experiment, metric)) == list(epochs)


def test_spec_figures(curves):
    assert _series(curves, "hw4-resnet-cifar100", "test_acc")[100] == pytest.approx(0.6331)
    assert _series(curves, "hw4-resnet-cifar100", "train_loss")[1] == pytest.approx(4.104180923530033)
    r2 = _series(curves, "resnet18-finetune-cifar100", "test_acc")
    assert (r2[1], r2[14]) == (pytest.approx(0.4299), pytest.approx(0.7123))
    loss = _series(curves, "resnet18-finetune-cifar100", "train_loss")
    assert loss[13] == loss[14]  # the identical loss of epochs 13 and 14, as logged
    r3 = _series(curves, "bottleneck-cifar10", "test_acc")
    assert r3 == pytest.approx(
        {
            10: 0.5111,
            20: 0.5248,
            40: 0.4626,
            80: 0.6385,
            100: 0.6245,
            120: 0.6191,
            160: 0.6294,
            180: 0.5400,
            200: 0.6108,
        }
    )
    r4 = _series(curves, "resnetb-cifar10", "test_acc")
    assert r4 == pytest.approx(
        {
            10: 0.5337,
            20: 0.7010,
            30: 0.6690,
            40: 0.6704,
            50: 0.6790,
            60: 0.6611,
            70: 0.6879,
            80: 0.6871,
            90: 0.6908,
            100: 0.6697,
        }
    )
    lr = _series(curves, "resnetb-cifar10", "lr")
    assert (lr[19], lr[20], lr[40], lr[100]) == pytest.approx((0.1, 0.01, 0.001, 1e-6))


def test_every_figure_has_provenance(curves):
    assert curves.source.str.match(r"seeds/00[1-4]_[0-9a-f]{16}\.txt").all()
    assert (curves.line > 0).all() and curves.raw.str.len().gt(0).all()
    assert not curves.duplicated(["experiment", "metric", "epoch"]).any()
    acc = curves[curves.metric.str.endswith("_acc")]
    assert acc.value.between(0, 1).all()  # accuracies are fractions, as the suite logs them


@pytest.mark.parametrize(
    "experiment, final, best, best_epoch, seconds",
    [
        ("hw4-resnet-cifar100", 0.6331, 0.6352, 89, 108),
        ("resnet18-finetune-cifar100", 0.7123, 0.7123, 14, 900),
        ("bottleneck-cifar10", 0.6108, 0.6385, 80, None),
        ("resnetb-cifar10", 0.6697, 0.7010, 20, 148.5),
    ],
)
def test_headline_figures(curves, runs, experiment, final, best, best_epoch, seconds):
    h = reference.headline(curves, runs[experiment])
    assert h["final_test_acc"] == pytest.approx(final)
    assert h["best_test_acc"] == pytest.approx(best) and h["best_epoch"] == best_epoch
    if seconds is None:  # the bottleneck's logged epochs took 91-182 s
        assert 95 < h["seconds_per_epoch"] < 110
    else:
        assert h["seconds_per_epoch"] == pytest.approx(seconds, abs=0.5)


def test_missing_reference_is_a_user_error(tmp_path, monkeypatch):
    from bench.errors import UserError

    monkeypatch.setenv("BENCH_EXPERIMENTS", str(tmp_path))
    with pytest.raises(UserError, match="curves.csv"):
        reference.load_curves()
    with pytest.raises(UserError, match="runs.toml"):
        reference.load_runs()


def test_reported_seconds_name_the_suite_metric_that_times_the_same(curves, runs):
    # R3/R4 log the training loop's duration (test accuracy came later, from checkpoints): the
    # training pass alone. R1/R2's figure is the whole job's time over its epochs.
    metric = {name: r.seconds_per_epoch_metric for name, r in runs.items()}
    assert metric == {
        "hw4-resnet-cifar100": "epoch_time_s",
        "resnet18-finetune-cifar100": "epoch_time_s",
        "bottleneck-cifar10": "train_time_s",
        "resnetb-cifar10": "train_time_s",
    }
    logged = curves[curves.metric.str.endswith("_time_s")]
    assert set(logged.metric) == {"train_time_s"} and set(logged.experiment) == {
        "bottleneck-cifar10",
        "resnetb-cifar10",
    }
    assert set(logged.raw.str.extract(r"(Duration)")[0]) == {"Duration"}
