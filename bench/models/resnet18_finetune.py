"""R2: torchvision's ImageNet ResNet-18 with its head replaced by Linear(512, num_classes).

`weights` is "imagenet" (torchvision's weights API, cached under TORCH_HOME), a path to a local
state-dict file of a 1000-class ResNet-18, or "none" (random init).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from bench.errors import UserError
from bench.models.registry import register_model


def imagenet_weights_file() -> Path:
    """Where torchvision caches (and looks for) the ImageNet ResNet-18 weights."""
    url = ResNet18_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    weights = ResNet18_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except OSError as exc:  # URLError is an OSError: no network
        raise UserError(
            f"ImageNet ResNet-18 weights are not cached and cannot be downloaded ({exc}); "
            f"fetch {weights.url} to {imagenet_weights_file()}, or set model.weights to a "
            "local state-dict file or 'none'"
        ) from None


def _file_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise UserError(f"model.weights file {path!r} does not exist; give a ResNet-18 state-dict file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise UserError(f"model.weights file {path!r} is not a readable state dict: {exc}") from None


@register_model("resnet18_finetune")
def resnet18_finetune(*, num_classes: int = 100, weights: str = "imagenet", freeze_backbone: bool = False) -> nn.Module:
    model = resnet18(weights=None)
    if weights == "imagenet":
        model.load_state_dict(_imagenet_state_dict())
    elif weights != "none":
        state = _file_state_dict(weights)
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as exc:
            raise UserError(
                f"model.weights file {weights!r} does not fit ResNet-18: {str(exc).splitlines()[0]}"
            ) from None
    if freeze_backbone:
        for p in model.parameters():
            p.requires_grad_(False)
    # Everything but the last layer is the feature extractor; the new head is trained.
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model
