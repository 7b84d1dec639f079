"""`bench perf`'s data pipeline: the suite's batched on-device augmentation against torchvision's
per-sample PIL transforms (same augmentations) in a DataLoader on every core, in images/s; and the
embedded images every measurement trains on (throughput does not depend on which images they are).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from bench import data, engine
from bench.data import cifar

# Timed passes over the images per pipeline; the median counts (a pass of the suite's pipeline
# takes a tenth of a second on a CPU: one alone is at the mercy of a moment's load).
PIPELINE_PASSES = 3


def embedded_files(dataset: str, train_images: int) -> cifar.CifarFiles:
    """The embedded subset of `dataset` with its training images repeated to `train_images`:
    throughput does not depend on which images they are."""
    embedded = cifar.load_cifar(dataset, None)
    return cifar.CifarFiles(
        _tiled(embedded.train, train_images), embedded.test, embedded.classes, False, embedded.location, embedded.digest
    )


def _tiled(split: cifar.Split, n: int) -> cifar.Split:
    reps = -(-n // len(split))
    return cifar.Split(split.images.repeat(reps, 1, 1, 1)[:n], split.labels.repeat(reps)[:n])


def suite_pipeline_rate(split: cifar.Split, cfg_data, device: torch.device) -> float:
    """Images/s of the suite's training batches (augmented, normalized, on the device)."""
    on_device = cifar.Split(split.images.to(device), split.labels.to(device))
    gen = torch.Generator(device=device).manual_seed(0)
    mean = torch.tensor(cfg_data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg_data.std, device=device).view(1, 3, 1, 1)
    batches = data.Batches(
        on_device,
        batch_size=cfg_data.batch_size,
        mean=mean,
        std=std,
        image_size=cfg_data.image_size,
        augment=cfg_data.augment,
        padding=cfg_data.crop_padding,
        shuffle=True,
        gen=gen,
    )
    next(iter(batches))  # kernels and allocator warm
    seconds = []
    for _ in range(PIPELINE_PASSES):
        engine.synchronize(device)
        started = time.perf_counter()
        for _batch in batches:
            pass
        engine.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return batches.num_images / statistics.median(seconds)


class _PilImages(Dataset):
    def __init__(self, split: cifar.Split, transform: Callable) -> None:
        self.images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in split.images]
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def reference_transform(cfg_data) -> Callable:
    """torchvision's per-sample reference transforms for the recipe's augmentation."""
    if cfg_data.augment == "resized_crop_flip":
        crop = T.RandomResizedCrop(cfg_data.image_size)
    else:
        crop = T.RandomCrop(32, padding=cfg_data.crop_padding)
    return T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(cfg_data.mean, cfg_data.std)])


def reference_pipeline_rate(split: cifar.Split, cfg_data, device: torch.device) -> float:
    """Images/s of torchvision's PIL pipeline in a DataLoader with a worker per core, delivered
    to the device as the training loop would get them."""
    loader = DataLoader(
        _PilImages(split, reference_transform(cfg_data)),
        batch_size=cfg_data.batch_size,
        shuffle=True,
        num_workers=os.cpu_count() or 1,
        pin_memory=device.type == "cuda",
        persistent_workers=True,
    )
    for _ in loader:  # workers started and warm: the first epoch is not timed
        pass
    seconds = []
    for _ in range(PIPELINE_PASSES):
        started = time.perf_counter()
        for x, _ in loader:
            x.to(device, non_blocking=True)
        engine.synchronize(device)
        seconds.append(time.perf_counter() - started)
    del loader
    return len(split) / statistics.median(seconds)


def rates(model_name: str, cfg, pipeline_images: int, device: torch.device, say: Callable[[str], None]) -> dict:
    """The pipeline figures of a recipe `cfg` over `pipeline_images` embedded images: every model's
    32-px crop-and-flip path, and the fine-tune's own 224-px path too (suffix "_224")."""
    embedded = cifar.load_cifar(cfg.data.dataset, None)
    images = _tiled(embedded.train, pipeline_images)
    # Every model gets the 32-px crop-and-flip path; the fine-tune also its own 224-px path.
    pipelines = {"": cfg.data.model_copy(update={"augment": "crop_flip", "image_size": 32})}
    if cfg.data.augment == "resized_crop_flip":
        pipelines["_224"] = cfg.data.model_copy(update={"image_size": 224})
    out: dict[str, float] = {}
    for suffix, cfg_data in pipelines.items():
        suite_rate = suite_pipeline_rate(images, cfg_data, device)
        reference_rate = reference_pipeline_rate(images, cfg_data, device)
        out.update(
            {
                f"pipeline_images_per_s{suffix}": suite_rate,
                f"pipeline_reference_images_per_s{suffix}": reference_rate,
                f"pipeline_ratio{suffix}": suite_rate / reference_rate,
            }
        )
        say(
            f"{model_name}: data pipeline at {cfg_data.image_size} px {suite_rate:,.0f} images/s against "
            f"torchvision's {reference_rate:,.0f} (x{suite_rate / reference_rate:.1f})"
        )
    return out
