"""bench.job: the one training sequence, the one end of a stopped run, a command's device."""

from __future__ import annotations

import contextlib

import pytest
import torch

from bench import config, data, engine, job
from bench.data import cifar
from bench.errors import UserError
from bench.models import create_model
from bench.servers import retry as outage


class StoreAway:
    """A tracker whose store is away for tags (`tags_fail`: with an outage, or another error)."""

    def __init__(self, tags_fail: BaseException | None) -> None:
        self.tags_fail, self.calls = tags_fail, []

    @contextlib.contextmanager
    def limited(self, seconds: float):
        self.calls.append(("limited", seconds))
        yield

    def set_tags(self, run_id, tags):
        self.calls.append(("set_tags", dict(tags)))
        if self.tags_fail is not None:
            raise self.tags_fail

    def end_run(self, run_id, status):
        self.calls.append(("end_run", status))

    def abandon(self, run_id):
        self.calls.append(("abandon", run_id))


def test_a_stopped_run_ends_killed_with_what_stopped_it_within_the_stop_wait():
    tracker = StoreAway(None)
    stop = KeyboardInterrupt()
    stop.signal_name = "SIGTERM"
    assert job.end_stopped(tracker, "r1", stop, {"bench.status": "interrupted"}) is None
    assert tracker.calls == [
        ("limited", job.STOP_WAIT_S),
        ("set_tags", {"bench.status": "interrupted", "bench.interrupted_by": "SIGTERM"}),
        ("end_run", "KILLED"),
    ]
    assert job.end_stopped(StoreAway(None), None, stop, {}) is None  # no run yet: nothing to end


def test_a_stopped_trial_whose_store_is_away_leaves_its_run_running_and_a_cell_still_tries_to_end_it():
    away = outage.Unavailable("tracking store", "http://h", 400.0, 300.0)
    trial = StoreAway(away)
    assert job.end_stopped(trial, "r1", KeyboardInterrupt(), {}, abandon=True) is away
    assert [c[0] for c in trial.calls] == ["limited", "set_tags", "abandon"]  # no end_run: taken up again
    cell = StoreAway(away)
    assert job.end_stopped(cell, "r1", KeyboardInterrupt(), {}) is away
    assert [c[0] for c in cell.calls] == ["limited", "set_tags", "end_run"]


def test_a_store_error_that_is_no_outage_does_not_hide_the_stop():
    tracker = StoreAway(RuntimeError("500 from the server"))
    assert job.end_stopped(tracker, "r1", KeyboardInterrupt(), {}, abandon=True) is None
    assert [c[0] for c in tracker.calls] == ["limited", "set_tags", "end_run"]


def test_a_stop_a_library_made_into_another_error_is_found_and_is_that_stop():
    stop = KeyboardInterrupt()
    try:
        try:
            raise stop
        except KeyboardInterrupt:
            raise RuntimeError("unexpected pos 54080 vs 53968")  # noqa: B904 (as torch's zip writer raises it)
    except RuntimeError as exc:
        assert job.stop_in(exc, "a cell") is stop
    assert job.stop_in(ValueError("plain"), "a cell") is None


@pytest.mark.parametrize(
    ("device", "words"),
    [("meta", "--device 'meta' is not supported; use auto"), ("tpu", "--device 'tpu' is not a device; use auto")],
)
def test_a_commands_device_error_names_the_flag(device, words):
    with pytest.raises(UserError, match=words):
        job.resolve_device(device)
    with pytest.raises(UserError) as raised:
        engine.resolve_device(device)
    assert "--device" not in str(raised.value)  # the engine's own words name no flag


def test_build_seeds_then_draws_the_data_then_the_model_as_every_trainer_did():
    cfg = config.load("resnetb-cifar10", profile="smoke", sets=["model.widths=[4, 8, 8]"])
    files = cifar.load_cifar(cfg.data.dataset, None)
    cpu = torch.device("cpu")
    bundle, model = job.build(cfg, cpu, files)
    engine.seed_everything(cfg.seed, cfg.train.deterministic)
    expected_bundle = data.build(cfg.data, seed=cfg.seed, device=cpu, files=files)
    expected = create_model(cfg.model.name, num_classes=expected_bundle.num_classes, **cfg.model.options)
    for got, want in zip(model.state_dict().values(), expected.state_dict().values(), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(next(iter(bundle.train))[0], next(iter(expected_bundle.train))[0])
