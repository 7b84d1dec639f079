"""`bench perf`: what the suite's harness costs beside the model's own compute, per model.

For each model, on the current device, in one process:
- data pipeline: the suite's batched on-device augmentation against torchvision's per-sample PIL
  transforms (same augmentations) in a DataLoader on every core, at 32 px and, for the
  fine-tune, at 224 px;
- training: the engine with full MLflow tracking (a temporary SQLite store: params, per-epoch
  metrics, checkpoints) against a bare PyTorch loop over pre-made batches in memory, with the same
  model, optimizer, batch, memory format and autocast;
- tracking: the time spent in the MLflow callback and the CPU time of MLflow's system-metrics
  sampling thread, per epoch and as a share of the epoch;
- FLOP/s achieved in training against a matrix-multiply probe of the device.

The images are the embedded CIFAR subset (throughput does not depend on which images they are).
The data pipeline is measured in `perf.pipeline`, training and tracking in `perf.training`, FLOPs
counted by `models.cost`; this module puts them together per model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench import config, engine, process
from bench.models import cost
from bench.perf import pipeline
from bench.perf.pipeline import embedded_files
from bench.perf.training import engine_against_bare, perf_config


@dataclass(frozen=True)
class Budget:
    """How much to measure: the full run by default, a quick look with --quick."""

    pipeline_images: int  # images per pipeline measurement
    train_images: int  # images per training epoch (at most the embedded subset's 1000)
    epochs: int  # epochs per training measurement
    repeats: int  # pairs of training measurements (bare loop, suite); the pair of median ratio counts


FULL = Budget(pipeline_images=8192, train_images=1000, epochs=3, repeats=5)
QUICK = Budget(pipeline_images=2048, train_images=512, epochs=2, repeats=1)


def models_and_experiments() -> dict[str, str]:
    """Model name -> the experiment that trains it (one reported run per model)."""
    return {config.load(e, profile="paper").model.name: e for e in config.list_experiments()}


def matmul_probe(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix multiply: what the device can do at best, in practice."""
    n = 4096 if device.type != "cpu" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        engine.synchronize(device)
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        engine.synchronize(device)
        best = min(best, (time.perf_counter() - started) / 4)
    return 2 * n**3 / best


def paper_flops(experiment: str, device: torch.device) -> float:
    """FLOPs of one seed of the reported run: training steps plus its evaluation passes."""
    from bench import ablation

    cfg = config.load(experiment, profile="paper")
    return cost.run_flops(cfg, device, alternatives=ablation.alternatives(experiment, cfg))


def measure_model(
    model_name: str,
    experiment: str,
    *,
    profile: str,
    device: torch.device,
    budget: Budget,
    probe_flops: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    cfg = perf_config(experiment, profile, budget)
    files = embedded_files(cfg.data.dataset, budget.train_images)
    out: dict[str, Any] = {
        "experiment": experiment,
        "batch_size": cfg.data.batch_size,
        "image_size": cfg.data.image_size,
    }
    out.update(pipeline.rates(model_name, cfg, budget.pipeline_images, device, say))
    compared = engine_against_bare(cfg, files, device, budget.repeats)
    bare_rate, suite = compared.bare_images_per_s, compared.suite
    suite_rate = suite.images_per_s
    epoch_s = files.train.labels.numel() / suite_rate
    tracking_epoch_s = suite.tracking_s / cfg.train.epochs
    train_flops, _ = cost.step_flops(cfg, device)
    out.update(
        {
            "engine_images_per_s": suite_rate,
            "bare_images_per_s": bare_rate,
            "engine_ratio": suite_rate / bare_rate,
            "engine_images_per_s_runs": [t.images_per_s for _, t in compared.pairs],
            "bare_images_per_s_runs": [b for b, _ in compared.pairs],
            "engine_ratio_whole_run": suite.whole_run_images_per_s / bare_rate,
            "closing_s": suite.closing_s,
            "closing_tracking_s": suite.closing_tracking_s,
            "epoch_s": epoch_s,
            "tracking_ms_per_epoch": 1000 * tracking_epoch_s,
            "tracking_share": tracking_epoch_s / epoch_s,
            "train_flops_per_image": train_flops,
            "achieved_flops_per_s": train_flops * suite_rate,
            "flops_utilization": train_flops * suite_rate / probe_flops,
            "paper_flops_per_seed": paper_flops(experiment, device),
            "step_ms": compared.step_ms,
            "bare_step_ms": compared.bare_step_ms,
        }
    )
    say(
        f"{model_name}: training {suite_rate:,.1f} images/s against a bare loop's {bare_rate:,.1f} "
        f"(x{suite_rate / bare_rate:.3f}), tracking {1000 * tracking_epoch_s:.1f} ms per epoch; "
        f"closing the run {suite.closing_s:.2f} s"
    )
    return out


def run(
    models: list[str], *, profile: str, device: torch.device, quick: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    budget = QUICK if quick else FULL
    allocator = process.keep_freed_memory()  # as the command line sets it for every run
    experiments = models_and_experiments()
    dtype = (
        engine.autocast_dtype(device, config.load(experiments[models[0]], profile=profile).train.amp) or torch.float32
    )
    probe = matmul_probe(device, dtype)
    say(
        f"{engine.device_name(device)}: matrix multiply {probe / 1e9:,.1f} GFLOP/s ({str(dtype).removeprefix('torch.')})"
    )
    results: dict[str, Any] = {
        "device": {
            "name": engine.device_name(device),
            "type": device.type,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "matmul_flops_per_s": probe,
            "matmul_dtype": str(dtype).removeprefix("torch."),
            "host_allocator": allocator,
            "profile": profile,
            "quick": quick,
        },
    }
    for name in models:
        results[name] = measure_model(
            name, experiments[name], profile=profile, device=device, budget=budget, probe_flops=probe, say=say
        )
    # Probed again at the end: a slow spell of the machine during the first, short probe would
    # overstate every utilization. The faster of the two counts.
    again = matmul_probe(device, dtype)
    if again > probe:
        say(f"{engine.device_name(device)}: matrix multiply probed again: {again / 1e9:,.1f} GFLOP/s")
        results["device"]["matmul_flops_per_s"] = again
        for name in models:
            results[name]["flops_utilization"] = results[name]["achieved_flops_per_s"] / again
    return results
