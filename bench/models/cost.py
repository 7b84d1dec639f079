"""What a config's model costs: its parameter count and its FLOPs, the one FLOP counter of bench
(reports, `bench perf`, `bench run --ablate --dry-run`).

Counted by torch.utils.flop_counter.FlopCounterMode (a multiply-add counts two FLOPs) from the
shapes alone: on the meta device, no weights and no arithmetic, so a report can count every config
in milliseconds. The counts do not depend on the weights: no pretrained ones are fetched.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench import engine
from bench.data.cifar import NUM_CLASSES
from bench.models import count_parameters, create_model

# CIFAR's official split sizes, for the FLOPs of a full paper run.
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000


@dataclass(frozen=True)
class Cost:
    parameters: int
    gflops: float  # per image, forward pass, at the config's image size


def of_config(cfg) -> Cost:
    """The cost of a `config.RunConfig`'s model at its data's image size (cached per model, classes
    and image size)."""
    return _count(cfg.model.name, _options(cfg), NUM_CLASSES[cfg.data.dataset], cfg.data.image_size)


def step_flops(cfg, device: torch.device, image_size: int | None = None, batch: int = 2) -> tuple[float, float]:
    """(training FLOPs, forward-only FLOPs) per image of a config's model at its image size (or
    `image_size`): a training step's forward and backward, and a forward pass alone. Counted on
    `device` (the "meta" device: shapes only)."""
    size = image_size or cfg.data.image_size
    model = create_model(cfg.model.name, num_classes=NUM_CLASSES[cfg.data.dataset], **dict(_options(cfg))).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    model.train()
    return _flops(model, x, y) / batch, _flops(model, x) / batch


def run_flops(
    cfg,
    device: torch.device,
    train_total: int = CIFAR_TRAIN,
    test_total: int = CIFAR_TEST,
    alternatives: Sequence[tuple[str, object]] = (),
) -> float:
    """FLOPs of one run (one seed) of a config whose dataset holds `train_total` training and
    `test_total` test images: every epoch's training steps and evaluation passes, the passes of
    its evaluation-only alternatives (`engine.fit`'s) included. Counted on the "meta" device
    when `device` is: shapes only, no arithmetic."""
    train_per_image, forward_per_image = step_flops(cfg, device)
    train_images = train_total - cfg.data.val_size
    images = {"train": train_images, "val": cfg.data.val_size, "test": test_total}
    passes = engine.evaluation_passes(engine.evaluation_plan(cfg.eval, alternatives), ["val", "test"])
    eval_images = sum(images[split] for split, _ in passes)
    return cfg.train.epochs * (train_images * train_per_image + eval_images * forward_per_image)


def _options(cfg) -> tuple:
    """The model's options, hashable, with no pretrained weights to fetch."""
    options = {**cfg.model.options, **({"weights": "none"} if "weights" in cfg.model.options else {})}
    return tuple(sorted(options.items()))


def _flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> float:
    """FLOPs of a forward pass of `x`; with labels `y`, of a training step's forward and backward."""
    if y is None:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    else:
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


@functools.lru_cache(maxsize=64)
def _count(name: str, options: tuple, num_classes: int, image_size: int) -> Cost:
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, **dict(options)).eval()
        x = torch.empty(1, 3, image_size, image_size)
    return Cost(count_parameters(model), _flops(model, x) / 1e9)
