"""CIFAR-10/100 in the official python-pickle layout: complete, partial, downloaded or embedded.

torchvision downloads and md5-checks the official archives; a directory whose files are all
present and pass the md5 check is complete. One with some files present or with files that fail
the check (a subset in the official layout) is partial: it loads with a warning giving its counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import calculate_md5

from bench.errors import UserError

log = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).parent / "embedded"
DATASETS = {"cifar10": CIFAR10, "cifar100": CIFAR100}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}


@dataclass(frozen=True)
class Split:
    """Images as uint8 N x 3 x 32 x 32 and labels as int64 N, on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class CifarFiles:
    train: Split
    test: Split
    classes: list[str]
    complete: bool
    location: str
    digest: str  # of the files read: their names and MD5s (the MD5 check computes them anyway)
    # The same of the training files and of the test files (each with the class-name file):
    # a changed training file leaves the test data's digest as it was. Empty: `digest` for both.
    train_digest: str = ""
    test_digest: str = ""


def _unpickle(path: Path, name: str):
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as exc:  # a damaged pickle raises almost any type
        raise _bad_file(path, name, f"{type(exc).__name__}: {exc}") from None


def _bad_file(path: Path, name: str, why: str) -> UserError:
    return UserError(
        f"{path} is not a {name} file ({why}); delete it, or replace it with the one in "
        f"{DATASETS[name].filename} from {DATASETS[name].url}"
    )


def _read_batch(path: Path, name: str) -> Split:
    entry = _unpickle(path, name)
    try:
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[LABEL_KEY[name]], dtype=np.int64)
        if len(labels) != len(data) or not 0 <= labels.min(initial=0) <= labels.max(initial=0) < NUM_CLASSES[name]:
            raise ValueError(f"{len(data)} images, {len(labels)} labels out of 0-{NUM_CLASSES[name] - 1}")
    except Exception as exc:  # a pickle of something else: any type, any shape
        raise _bad_file(path, name, f"{type(exc).__name__}: {exc}") from None
    return Split(torch.from_numpy(data.copy()), torch.from_numpy(labels))


def _concat(splits: list[Split]) -> Split:
    return Split(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]))


def _missing_data_error(name: str, root: Path, reason: str) -> UserError:
    cls = DATASETS[name]
    return UserError(
        f"{name} data not found in {root / cls.base_folder} ({reason}); put the official archive "
        f"{cls.filename} (from {cls.url}) extracted there, pass --data-dir DIR, "
        "or use --profile smoke for the embedded images"
    )


def read_layout(name: str, root: Path) -> CifarFiles:
    """Read whatever official files are in `root/<base_folder>`; raise if there are none."""
    cls = DATASETS[name]
    folder = Path(root) / cls.base_folder
    listed = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    present = [fname for fname, _ in listed if (folder / fname).is_file()]
    train_files = [fname for fname, _ in cls.train_list if fname in present]
    test_files = [fname for fname, _ in cls.test_list if fname in present]
    if not train_files or not test_files:
        raise _missing_data_error(name, Path(root), "no train or no test file")
    md5s = {fname: calculate_md5(str(folder / fname)) for fname in present}
    complete = all(md5s.get(fname) == md5 for fname, md5 in listed)

    def digest_of(names: list[str]) -> str:
        return hashlib.sha256(json.dumps({f: md5s[f] for f in names if f in md5s}, sort_keys=True).encode()).hexdigest()

    digest = digest_of(present)
    train_digest, test_digest = (
        digest_of([*train_files, cls.meta["filename"]]),
        digest_of([*test_files, cls.meta["filename"]]),
    )
    train = _concat([_read_batch(folder / f, name) for f in train_files])
    test = _concat([_read_batch(folder / f, name) for f in test_files])
    classes: list[str] = []
    meta = folder / cls.meta["filename"]
    if meta.is_file():
        try:
            classes = [str(c) for c in _unpickle(meta, name)[cls.meta["key"]]]
        except (KeyError, TypeError, IndexError) as exc:
            raise _bad_file(meta, name, f"{type(exc).__name__}: {exc}") from None
    return CifarFiles(train, test, classes, complete, str(folder), digest, train_digest, test_digest)


def load_cifar(name: str, root: Path | None, *, download: bool = True) -> CifarFiles:
    """Embedded subset when `root` is None, else the official layout under `root`.

    A missing dataset is downloaded (and md5-checked) by torchvision when the network allows.
    """
    if root is None:
        return read_layout(name, EMBEDDED_DIR)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(
            f"--data-dir {root} is not a directory; pass the directory that holds {DATASETS[name].base_folder}/"
        )
    folder = root / DATASETS[name].base_folder
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is not a directory; delete it, or extract {DATASETS[name].filename} in {root}")
    if not folder.is_dir() or not any(folder.iterdir()):
        if not download:
            raise _missing_data_error(name, root, "download disabled")
        try:
            DATASETS[name](root=str(root), train=True, download=True)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            raise _missing_data_error(name, root, f"download failed: {exc}") from None
    files = read_layout(name, root)
    if not files.complete:
        log.warning(
            "%s in %s is partial or fails the md5 check: loaded %d train and %d test images "
            "(the official set has 50000 and 10000)",
            name,
            files.location,
            len(files.train),
            len(files.test),
        )
    return files
