"""`bench perf`: what it measures and writes, on a small budget. The figures themselves are
benchmarks (README "Performance"), not asserted here: a test checks that each is measured and
means what its name says."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torchvision import transforms as T

from bench import cli, config, engine, perf, process

CPU = torch.device("cpu")
TINY = perf.Budget(pipeline_images=256, train_images=128, epochs=2, repeats=1)
PER_MODEL = {
    "pipeline_ratio",
    "pipeline_images_per_s",
    "pipeline_reference_images_per_s",
    "engine_ratio",
    "engine_images_per_s",
    "bare_images_per_s",
    "tracking_ms_per_epoch",
    "tracking_share",
    "flops_utilization",
    "achieved_flops_per_s",
    "train_flops_per_image",
    "paper_flops_per_seed",
    "epoch_s",
    "engine_ratio_whole_run",
    "closing_s",
    "closing_tracking_s",
    "step_ms",
    "bare_step_ms",
}


def test_every_model_is_trained_by_one_experiment():
    assert perf.models_and_experiments() == {
        "hw4_resnet": "hw4-resnet-cifar100",
        "resnet18_finetune": "resnet18-finetune-cifar100",
        "bottleneck_resnet": "bottleneck-cifar10",
        "resnet_b": "resnetb-cifar10",
    }


def test_the_reference_pipeline_is_torchvisions_for_the_recipes_augmentation():
    crop_flip = perf.reference_transform(config.load("resnetb-cifar10", profile="smoke").data)
    assert [type(t) for t in crop_flip.transforms] == [T.RandomCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert crop_flip.transforms[0].padding == 4
    resized = perf.reference_transform(config.load("resnet18-finetune-cifar100", profile="paper").data)
    assert [type(t) for t in resized.transforms] == [
        T.RandomResizedCrop,
        T.RandomHorizontalFlip,
        T.ToTensor,
        T.Normalize,
    ]
    assert resized.transforms[0].size == (224, 224)


def test_perf_config_trains_every_image_with_no_evaluation_passes():
    cfg = perf.perf_config("hw4-resnet-cifar100", "smoke", TINY)
    assert cfg.data.source == "embedded" and cfg.data.val_size == 0
    assert not cfg.eval.remeasure_train_acc
    assert cfg.train.epochs == TINY.epochs
    assert cfg.data.batch_size == config.load("hw4-resnet-cifar100", profile="smoke").data.batch_size
    # The paper's fine-tune, offline: no ImageNet weights to fetch, the same 224-px compute.
    paper = perf.perf_config("resnet18-finetune-cifar100", "paper", TINY)
    assert paper.model.options["weights"] == "none" and paper.data.image_size == 224


def test_step_flops_count_forward_and_backward():
    cfg = config.load("resnetb-cifar10", profile="smoke")
    train, forward = perf.step_flops(cfg, CPU)
    # The backward pass costs about twice the forward (gradients of inputs and of weights).
    assert 2.5 * forward < train < 3.5 * forward
    bigger, _ = perf.step_flops(cfg, CPU, image_size=64)
    assert bigger == pytest.approx(4 * train, rel=0.05)


def test_paper_flops_cover_every_epoch_and_evaluation_pass():
    cfg = config.load("resnetb-cifar10", profile="paper")
    train, forward = perf.step_flops(cfg, CPU)
    expected = cfg.train.epochs * ((50_000 - cfg.data.val_size) * train + (cfg.data.val_size + 10_000) * forward)
    assert perf.paper_flops("resnetb-cifar10", CPU) == pytest.approx(expected)


@pytest.mark.slow
def test_measure_model_gives_every_figure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    probe = perf.matmul_probe(CPU, torch.float32)
    budget = dataclasses.replace(TINY, repeats=3)
    out = perf.measure_model(
        "resnet_b", "resnetb-cifar10", profile="smoke", device=CPU, budget=budget, probe_flops=probe, say=lines.append
    )
    assert PER_MODEL <= out.keys()
    assert "pipeline_ratio_224" not in out  # a 32-px recipe
    assert out["pipeline_ratio"] == pytest.approx(out["pipeline_images_per_s"] / out["pipeline_reference_images_per_s"])
    assert out["engine_ratio"] == pytest.approx(out["engine_images_per_s"] / out["bare_images_per_s"])
    # Every pair of runs is kept; the pair of median ratio counts.
    assert len(out["engine_images_per_s_runs"]) == len(out["bare_images_per_s_runs"]) == 3
    ratios = [e / b for e, b in zip(out["engine_images_per_s_runs"], out["bare_images_per_s_runs"])]
    assert out["engine_ratio"] == pytest.approx(sorted(ratios)[1])
    assert (out["engine_images_per_s"], out["bare_images_per_s"]) in zip(
        out["engine_images_per_s_runs"], out["bare_images_per_s_runs"]
    )
    assert 0 < out["tracking_share"] < 1
    # The whole run adds its closing (last checkpoint, final upload and flush) to the epochs.
    assert out["engine_ratio_whole_run"] < out["engine_ratio"]
    assert 0 < out["closing_tracking_s"] < out["closing_s"]
    assert out["tracking_ms_per_epoch"] == pytest.approx(1000 * out["tracking_share"] * out["epoch_s"])
    assert out["achieved_flops_per_s"] == pytest.approx(out["train_flops_per_image"] * out["engine_images_per_s"])
    assert out["flops_utilization"] == pytest.approx(out["achieved_flops_per_s"] / probe)
    assert len(lines) == 2 and "data pipeline" in lines[0] and "bare loop" in lines[1]
    # Where a step's time goes: every part, in both loops; the bare loop has no metrics, evaluation,
    # tracking or checkpoints to pay for, and both draw their batches from the pipeline.
    assert set(out["step_ms"]) == set(out["bare_step_ms"]) == set(engine.Clock.PARTS)
    for part in ("data", "forward and backward", "optimizer"):
        assert out["step_ms"][part] > 0 and out["bare_step_ms"][part] > 0
    assert out["step_ms"]["metrics"] > 0 and out["step_ms"]["tracking"] > 0 and out["step_ms"]["checkpoints"] > 0
    assert all(out["bare_step_ms"][part] == 0 for part in ("metrics", "evaluation", "tracking", "checkpoints", "other"))
    assert not (tmp_path / "mlruns").exists()  # the temporary store's artifacts went with it


@pytest.mark.slow
def test_bench_perf_prints_a_table_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(perf.harness, "QUICK", TINY)
    out = tmp_path / "perf.json"
    assert cli.main(["perf", "--quick", "--model", "resnet_b", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures) == {"device", "resnet_b"}
    assert figures["device"]["type"] == "cpu" and figures["device"]["matmul_flops_per_s"] > 0
    assert figures["device"]["host_allocator"] == process.keep_freed_memory()  # the setting it measured under
    assert PER_MODEL <= figures["resnet_b"].keys()
    # Utilization is against the faster of the two matrix-multiply probes, the one in `device`.
    model = figures["resnet_b"]
    assert model["flops_utilization"] == pytest.approx(
        model["achieved_flops_per_s"] / figures["device"]["matmul_flops_per_s"]
    )
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["model", "pipeline", "x"]
    assert "resnet_b" in table
    breakdown = table[table.index("Where a training step's time goes") :].splitlines()
    assert all(part in breakdown[1] for part in engine.Clock.PARTS)
    assert breakdown[3].split()[0] == "resnet_b" and breakdown[3].count(" / ") == len(engine.Clock.PARTS) + 1


@pytest.mark.parametrize(
    "args, names",
    [
        (["--model", "resnet50"], ["--model resnet50", "hw4_resnet"]),
        (["--profile", "huge"], ["huge", "smoke"]),
        (["--json", "no/such/dir/perf.json"], ["--json", "no/such/dir"]),
        (["--device", "tpu"], ["--device 'tpu'"]),
    ],
)
def test_bench_perf_bad_input_is_one_line_before_measuring(args, names, capsys):
    assert cli.main(["perf", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench: error: "), err
    for name in names:
        assert name in err[0]
