"""Batched augmentation on the data's device: every image gets its own random draw.

The distributions follow torchvision's reference transforms: RandomCrop(32, padding) +
RandomHorizontalFlip for the 32-px recipes, RandomResizedCrop(size, scale=(0.08, 1),
ratio=(3/4, 4/3)) + flip for the fine-tune, Resize + CenterCrop at test time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(images: Tensor, padding: int, gen: torch.Generator) -> Tensor:
    """Zero-pad uint8 N x C x H x W by `padding`, crop back to H x W at a random offset, flip half."""
    n, _, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=dev)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=dev)
    flip = torch.rand(n, generator=gen, device=dev) < 0.5
    # Every H x W window of every image as a view (no copy); each image then takes its own one.
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)
    out = windows[torch.arange(n, device=dev), :, top, left]
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    gen: torch.Generator,
    device: torch.device,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Tensor:
    """RandomResizedCrop.get_params for n images at once: rows of (top, left, h, w)."""
    area = height * width
    target = area * torch.empty(n, attempts, device=device).uniform_(*scale, generator=gen)
    log_r = torch.empty(n, attempts, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    aspect = torch.exp(log_r)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=device))
    has = first >= 0
    pick = first.clamp(min=0)[:, None]
    w = w.gather(1, pick)[:, 0]
    h = h.gather(1, pick)[:, 0]
    # Fallback when no attempt fits: the whole image (CIFAR is square, inside the ratio range).
    w = torch.where(has, w, torch.full_like(w, width))
    h = torch.where(has, h, torch.full_like(h, height))
    u_top = torch.rand(n, generator=gen, device=device)
    u_left = torch.rand(n, generator=gen, device=device)
    top = torch.where(has, torch.floor(u_top * (height - h + 1)), torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(has, torch.floor(u_left * (width - w + 1)), torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], 1)


def _axis_weights(start: Tensor, length: Tensor, extent: int, size: int) -> Tensor:
    """N x size x extent weights that resize the span [start, start + length) of an axis of
    `extent` pixels to `size` pixels as torchvision's resized_crop does: crop, then interpolate's
    bilinear with antialias=True (v2's RandomResizedCrop default; PIL's filter). Output pixel j is
    centred at (j + 0.5) * scale into the span, scale = length / size; its tent is `scale` pixels
    wide when shrinking, so every pixel of the box counts, and one pixel when enlarging. The tent is
    cut at the box's edges and renormalized, so pixels outside the box never enter."""
    scale = (length / size)[:, None, None]
    j = torch.arange(size, device=start.device, dtype=start.dtype)[:, None]
    centre = start[:, None, None] + (j + 0.5) * scale
    pixels = torch.arange(extent, device=start.device, dtype=start.dtype)
    tent = (1 - (pixels + 0.5 - centre).abs() / scale.clamp(min=1)).clamp_(min=0)
    inside = (pixels >= start[:, None]) & (pixels < (start + length)[:, None])
    tent.mul_(inside[:, None])
    return tent.div_(tent.sum(2, keepdim=True))


def resample_boxes(images: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None) -> Tensor:
    """torchvision's resized_crop (bilinear, antialiased) of float N x C x H x W: box rows
    (top, left, h, w) -> size x size, mirrored left-right where `flip`. An axis-aligned box
    resamples rows and columns apart, so an image is two small matrix products
    (rows x image x columns), not a sampling grid of every output pixel."""
    _, _, height, width = images.shape
    top, left, h, w = boxes.to(images.dtype).unbind(1)
    rows = _axis_weights(top, h, height, size)  # N x size x H
    cols = _axis_weights(left, w, width, size)  # N x size x W
    if flip is not None:
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    n, c, _, _ = images.shape
    across = torch.bmm(images.reshape(n, c * height, width), cols.transpose(1, 2))  # N x CH x size
    return rows[:, None] @ across.view(n, c, height, size)


def random_resized_crop_flip(images: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """float N x C x H x W -> N x C x size x size, each image its own crop box and flip."""
    n, _, height, width = images.shape
    boxes = resized_crop_boxes(n, height, width, gen, images.device)
    flip = torch.rand(n, generator=gen, device=images.device) < 0.5
    return resample_boxes(images, boxes, size, flip)


def resize(images: Tensor, size: int) -> Tensor:
    """Resize(size) + CenterCrop(size) of square images: a plain bilinear resize."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
