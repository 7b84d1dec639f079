"""Model registry: `create_model(name, *, num_classes, **kw)` and `list_models()`.

Each family lives in its own module and registers its builders by name. Builders are
keyword-only and know nothing of devices, dtypes or data.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from bench.models import bottleneck, hw4_resnet, resnet18_finetune  # noqa: F401  (registers)
from bench.models.registry import MODELS


def create_model(name: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
    return MODELS.get(name)(num_classes=num_classes, **kwargs)


def list_models() -> list[str]:
    return MODELS.names()


def model_options(name: str) -> dict[str, Any]:
    """The builder's keyword options (besides num_classes) with their defaults."""
    params = inspect.signature(MODELS.get(name)).parameters
    return {k: p.default for k, p in params.items() if k != "num_classes"}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
