"""What a config's model costs: its parameter count and the FLOPs of one image's forward pass.

Counted by torch.utils.flop_counter.FlopCounterMode (a multiply-add counts two FLOPs, as in
`bench perf`) on the meta device: the shapes alone, no weights and no arithmetic, so a report
can count every config in milliseconds. Cached per model, classes and image size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.data.cifar import NUM_CLASSES
from bench.models import count_parameters, create_model


@dataclass(frozen=True)
class Cost:
    parameters: int
    gflops: float  # per image, forward pass, at the config's image size


def of_config(cfg) -> Cost:
    """The cost of a `config.RunConfig`'s model at its data's image size."""
    # The counts do not depend on the weights: no pretrained ones to fetch.
    options = {**cfg.model.options, **({"weights": "none"} if "weights" in cfg.model.options else {})}
    return _count(cfg.model.name, tuple(sorted(options.items())), NUM_CLASSES[cfg.data.dataset], cfg.data.image_size)


@functools.lru_cache(maxsize=64)
def _count(name: str, options: tuple, num_classes: int, image_size: int) -> Cost:
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, **dict(options)).eval()
        x = torch.empty(1, 3, image_size, image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return Cost(count_parameters(model), counter.get_total_flops() / 1e9)
