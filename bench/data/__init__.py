"""Data for one run: CIFAR splits held once on the device, batched and augmented there.

`build(cfg, seed=..., device=..., data_dir=...)` returns a `DataBundle` with train, val and test
batch iterators. The validation split is drawn with `cfg.split_seed` (the same for every run
seed, so seeds compare on the same held-out images); the run seed drives shuffling and
augmentation through one generator, whose state goes into checkpoints.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.data.augment import random_crop_flip, random_resized_crop_flip, resize
from bench.data.cifar import NUM_CLASSES, CifarFiles, Split
from bench.errors import UserError


class Batches:
    """Iterates (normalized float images, labels) over a split that lives on the device."""

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        mean: Tensor,
        std: Tensor,
        image_size: int,
        augment: str,
        padding: int,
        shuffle: bool,
        gen: torch.Generator,
    ) -> None:
        self.images, self.labels = split.images, split.labels
        self.batch_size, self.mean, self.std = batch_size, mean, std
        self.image_size, self.augment, self.padding = image_size, augment, padding
        self.shuffle, self.gen = shuffle, gen

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def drawing_from(self, gen: torch.Generator) -> Batches:
        """The same batches shuffled and augmented with `gen`'s draws, leaving this one's generator alone."""
        other = copy.copy(self)
        other.gen = gen
        return other

    def _prepare(self, images: Tensor) -> Tensor:
        if self.augment == "crop_flip":
            images = random_crop_flip(images, self.padding, self.gen)
        # Normalized before resizing, on the smaller image: every output pixel of a bilinear
        # resize is a weighted mean of input pixels, so a per-channel affine map commutes with it.
        x = images.float().div_(255).sub_(self.mean).div_(self.std)
        if self.augment == "resized_crop_flip":
            return random_resized_crop_flip(x, self.image_size, self.gen)
        return resize(x, self.image_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.labels)
        device = self.labels.device
        order = torch.randperm(n, generator=self.gen, device=device) if self.shuffle else torch.arange(n, device=device)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self._prepare(self.images[idx]), self.labels[idx]


@dataclass(frozen=True)
class Part:
    """One split as tracking records it: a name ("cifar100-train"), where its files are, a digest
    of the images it holds and its counts."""

    name: str
    source: str
    digest: str
    images: int
    classes: int


def part_digest(files: CifarFiles, part: str, indices: Tensor | None) -> str:
    """Changes with the files' content and with the images the part takes from them: `indices`
    into the training set (a validation split's draw), None for all of the part's file. A few
    hundred KB hashed: the files' MD5s were computed when they were read."""
    of_files = (files.test_digest if part == "test" else files.train_digest) or files.digest
    h = hashlib.sha256(f"{of_files}:{part}".encode())
    if indices is not None:
        h.update(indices.numpy().astype("<i8").tobytes())
    return h.hexdigest()[:8]  # MLflow's digests are 8 characters


@dataclass
class DataBundle:
    train: Batches
    val: Batches | None
    test: Batches
    num_classes: int
    classes: list[str]
    generator: torch.Generator
    source: str
    complete: bool
    parts: dict[str, Part]  # "train", "val" (when there is a validation split), "test"

    @property
    def counts(self) -> dict[str, int]:
        return {
            "train": self.train.num_images,
            "val": self.val.num_images if self.val else 0,
            "test": self.test.num_images,
        }


def check_val_size(val_size: int, train_images: int) -> None:
    if val_size >= train_images:
        raise UserError(f"data.val_size={val_size} leaves no training images (the train set has {train_images})")


def split_indices(n: int, val_size: int, split_seed: int) -> tuple[Tensor, Tensor]:
    """(train, validation) indices into a training set of `n` images, each sorted: `val_size` of
    them drawn for validation with `split_seed`."""
    check_val_size(val_size, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


def split_validation(train: Split, val_size: int, split_seed: int) -> tuple[Split, Split | None]:
    if val_size == 0:
        return train, None
    train_idx, val_idx = split_indices(len(train), val_size, split_seed)
    return (
        Split(train.images[train_idx], train.labels[train_idx]),
        Split(train.images[val_idx], train.labels[val_idx]),
    )


def parts(files: CifarFiles, dataset: str, val_size: int, split_seed: int) -> dict[str, Part]:
    """The train, validation (when `val_size` > 0) and test parts of a run's data."""
    n, classes = len(files.train), NUM_CLASSES[dataset]
    train_idx, val_idx = split_indices(n, val_size, split_seed) if val_size else (None, None)
    chosen = {"train": (train_idx, n - val_size), "val": (val_idx, val_size), "test": (None, len(files.test))}
    return {
        part: Part(f"{dataset}-{part}", files.location, part_digest(files, part, idx), size, classes)
        for part, (idx, size) in chosen.items()
        if size
    }


def build(cfg, *, seed: int, device: torch.device, files: CifarFiles) -> DataBundle:
    """`cfg` is the validated `data` section of a run config; `files` what `load_cifar` read."""
    train, val = split_validation(files.train, cfg.val_size, cfg.split_seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)

    def batches(split: Split, batch_size: int, train_mode: bool) -> Batches:
        on_device = Split(split.images.to(device), split.labels.to(device))
        return Batches(
            on_device,
            batch_size=batch_size,
            mean=mean,
            std=std,
            image_size=cfg.image_size,
            augment=cfg.augment if train_mode else "none",
            padding=cfg.crop_padding,
            shuffle=train_mode,
            gen=gen,
        )

    return DataBundle(
        train=batches(train, cfg.batch_size, True),
        val=batches(val, cfg.eval_batch_size, False) if val is not None else None,
        test=batches(files.test, cfg.eval_batch_size, False),
        num_classes=NUM_CLASSES[cfg.dataset],
        classes=files.classes,
        generator=gen,
        source=files.location,
        complete=files.complete,
        parts=parts(files, cfg.dataset, cfg.val_size, cfg.split_seed),
    )
