"""`bench perf --workers`: K trainers at once on one device, and the paper suite's wall time
estimated from their rates. The rates themselves are benchmarks (README "Performance"): the
tests check that K processes ran at once and that the estimate follows from the figures."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bench import cli, config, perf, workers
from bench.perf import workers as perf_workers

TINY = perf_workers.Budget(train_images=64, epochs=2)


@pytest.mark.parametrize(
    "seconds, workers, wall",
    [
        ([10, 5, 5, 1], 1, 21),
        # In order to the first free: 10 -> A, 5 -> B, 5 -> B (free at 5), 1 -> A or B (both free at 10).
        ([10, 5, 5, 1], 2, 11),
        ([10, 5, 5, 1], 4, 10),
        ([1, 5, 5, 10], 2, 15),  # the order counts: the longest cell last waits for a free worker
        ([3, 3], 8, 3),  # more workers than cells
    ],
)
def test_cells_go_in_order_to_the_first_free_worker(seconds, workers, wall):
    assert perf_workers.wall_time(seconds, workers) == wall


def test_the_estimate_is_each_cells_flops_at_its_models_rate_per_trainer():
    experiments = perf.models_and_experiments()
    measured = {
        k: {m: {"train_flops_per_image": 1e9, "images_per_s": rate} for m in experiments}
        for k, rate in (("1", 100.0), ("2", 150.0), ("8", 1000.0))
    }
    est = perf_workers.estimate(measured, experiments, "smoke")
    assert est["cells"] == config.suite_experiments("all") and est["complete"]
    meta = torch.device("meta")
    # K=2: two trainers at 75 images/s each, 1 GFLOP an image: 75 GFLOP/s per cell.
    seconds = [perf.paper_flops(e, meta) / 75e9 for e in est["cells"]]
    assert est["cell_s"]["2"] == pytest.approx(dict(zip(est["cells"], seconds)))
    assert est["minutes"]["2"] == pytest.approx(perf_workers.wall_time(seconds, 2) / 60)
    assert est["minutes"]["1"] == pytest.approx(sum(perf.paper_flops(e, meta) for e in est["cells"]) / 100e9 / 60)
    assert est["fastest_workers"] == 2 and "--profile smoke" in est["assumption"]
    # More workers than the four cells is not a K that `bench run` runs (it starts one a cell):
    # however fast its measurement, it is not estimated, nor chosen.
    assert est["minutes"]["8"] is None and "8" not in est["cell_s"]


@pytest.mark.slow
def test_bench_perf_workers_runs_k_trainers_at_once(in_tmp, monkeypatch, capsys):
    monkeypatch.setattr(perf_workers, "CPU_QUICK", TINY)
    out = in_tmp / "perf.json"
    assert (
        cli.main(
            ["perf", "--workers", "2", "1", "--quick", "--model", "resnet_b", "--device", "cpu", "--json", str(out)]
        )
        == 0
    )
    figures = json.loads(out.read_text())
    assert list(figures["workers"]) == ["1", "2"]
    for k in (1, 2):
        model = figures["workers"][str(k)]["resnet_b"]
        trainers = model["trainers"]
        assert len(trainers) == k and all(t["images_per_s"] > 0 and t["images"] == TINY.train_images for t in trainers)
        # Together: every timed image over the span from the first start to the last end.
        span = max(t["ended"] for t in trainers) - min(t["started"] for t in trainers)
        assert model["images_per_s"] == pytest.approx(sum(t["images"] for t in trainers) / span)
        # (each trainer's own rate is over its own window: their sum can only be more; the two are
        # read on two clocks a moment apart, hence the margin)
        assert model["images_per_s"] <= sum(t["images_per_s"] for t in trainers) * 1.01
        assert model["relative_to_smallest_k"] == pytest.approx(
            model["images_per_s"] / figures["workers"]["1"]["resnet_b"]["images_per_s"]
        )
        # Each in a process of its own, with its share of the cores.
        assert len({t["pid"] for t in trainers} | {os.getpid()}) == k + 1
        assert all(t["threads"] == max(1, workers.usable_cores() // k) for t in trainers)
    a, b = figures["workers"]["2"]["resnet_b"]["trainers"]
    assert a["started"] < b["ended"] and b["started"] < a["ended"]  # the timed epochs overlapped
    est = figures["estimate"]
    # One cell: two workers would be one, so K=2 is not estimated and K=1 is the choice.
    assert est["cells"] == ["resnetb-cifar10"] and not est["complete"] and est["fastest_workers"] == 1
    assert est["minutes"]["2"] is None
    assert est["minutes"]["1"] == pytest.approx(
        est["paper_flops"]["resnetb-cifar10"]
        / (
            figures["workers"]["1"]["resnet_b"]["train_flops_per_image"]
            * figures["workers"]["1"]["resnet_b"]["images_per_s"]
        )
        / 60
    )
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["K", "resnet_b", "img/s", "paper", "suite", "min"]
    assert [line.split()[0] for line in lines[2:4]] == ["1", "2"] and lines[3].split()[-1] == "-"
    fastest = next(line for line in lines if line.startswith("fastest: "))
    assert f"K={est['fastest_workers']}," in fastest and fastest.endswith("min (estimate)")
    progress = [line for line in captured.err.splitlines() if line.startswith("resnet_b, K=")]
    threads = max(1, workers.usable_cores() // 2)
    assert len(progress) == 2 and f"{threads} thread{'s' * (threads > 1)} each" in progress[1]


@pytest.mark.slow
def test_a_failing_trainer_fails_the_measurement_without_hanging_the_others(monkeypatch):
    # An experiment no trainer can load: each fails before its barrier, the others are released.
    with pytest.raises(RuntimeError, match="a trainer of 2 failed: .*no-such-experiment"):
        perf_workers.measure(
            2,
            {"resnet_b": "no-such-experiment"},
            profile="smoke",
            device=torch.device("cpu"),
            budget=TINY,
            on_model=lambda *_: None,
        )


@pytest.mark.parametrize("workers", [["0"], ["1", "-2"]])
def test_bench_perf_workers_below_one_is_one_line_before_measuring(workers, capsys):
    assert cli.main(["perf", "--workers", *workers]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench: error: --workers must be at least 1"), err
