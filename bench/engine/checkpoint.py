"""Checkpoint files: written atomically, checksummed, the previous "last" kept, read with weights_only=True.

A file is torch.save's bytes followed by a trailer: MAGIC and the SHA-256 of those bytes. The
trailer travels with the file (an MLflow artifact downloaded elsewhere still verifies), and plain
`torch.load(path, weights_only=True)` still reads it: the zip reader ignores bytes after the archive.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench.engine import stops

log = logging.getLogger(__name__)

MAGIC = b"\0bench-sha256\0"
TRAILER = len(MAGIC) + hashlib.sha256().digest_size


class CorruptCheckpoint(Exception):
    """A checkpoint file that is truncated, altered or not one of ours."""


def previous(path: Path) -> Path:
    """Where `save_rotating` keeps the checkpoint that `path` held before: last.pt -> last.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: without this a power cut can undo os.replace."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows has no directory handles to sync
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Hashing:
    """A write-only file that hashes what passes through it: torch.save streams the checkpoint
    to disk in one pass, with no copy of it in memory (checkpoints run to hundreds of MB)."""

    def __init__(self, f) -> None:
        self.f, self.hash = f, hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _write_tmp(state: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        hashing = _Hashing(f)
        torch.save(state, hashing)
        f.write(MAGIC + hashing.hash.digest())
        f.flush()
        os.fsync(f.fileno())
    return tmp


def save(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file, fsync, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    with stops.held():  # a stop in the middle of torch.save would come out as another error
        tmp = _write_tmp(state, path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def save_rotating(state: dict[str, Any], path: Path) -> None:
    """Like `save`, keeping the file `path` held as `previous(path)`: if the new one is ever
    unreadable (a disk that lied about fsync, a bad copy), the one before it still is."""
    path = Path(path)
    with stops.held():
        tmp = _write_tmp(state, path)
        if path.exists():
            # A crash between the two renames leaves only previous(path): load_latest reads it.
            os.replace(path, previous(path))
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def load(path: Path) -> dict[str, Any]:
    """The checkpoint's state; CorruptCheckpoint when its checksum does not match its bytes."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < TRAILER or data[-TRAILER : -TRAILER + len(MAGIC)] != MAGIC:
        raise CorruptCheckpoint(f"{path}: no checksum at the end (truncated, or not written by bench)")
    payload, digest = data[:-TRAILER], data[-TRAILER + len(MAGIC) :]
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptCheckpoint(f"{path}: checksum mismatch (the file was altered or damaged)")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def load_latest(path: Path) -> dict[str, Any] | None:
    """The newest valid checkpoint of `path` and `previous(path)`; None when neither exists.

    A corrupt newest one is skipped with a warning naming it and why; when every one that exists
    is corrupt, CorruptCheckpoint names them all."""
    path = Path(path)
    problems = []
    for candidate in (path, previous(path)):
        if not candidate.is_file():
            continue
        try:
            state = load(candidate)
        except CorruptCheckpoint as exc:
            log.warning("skipping checkpoint %s", exc)
            problems.append(str(exc))
            continue
        if problems:
            log.warning("resuming from the previous checkpoint %s instead", candidate)
        return state
    if problems:
        raise CorruptCheckpoint(
            f"no usable checkpoint in {path.parent}: {'; '.join(problems)}; "
            "delete the directory to train the run from the start"
        )
    return None


def snapshot(state: Any, device: str | torch.device | None = "cpu") -> Any:
    """A copy of `state` whose tensors are cloned (to `device`; None: where each one is): training
    may change the originals while the copy waits or is written."""
    if isinstance(state, torch.Tensor):
        return state.detach().to(device or state.device, copy=True)
    if isinstance(state, dict):
        return {k: snapshot(v, device) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v, device) for v in state)
    return state


class Saver:
    """Writes checkpoints in order, on a background thread when `background`, so that
    serializing, hashing and fsyncing do not stall training on an accelerator. (When the CPU
    trains, its cores are the device: a writer thread would only slow every step while it runs,
    so it writes in the caller's thread.) `done` hands back what was written, in order, and
    raises the error of a write that failed. Writes never overlap, so files are replaced in the
    order the checkpoints were taken."""

    def __init__(self, background: bool = True) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer") if background else None
        self._pending: deque[tuple[Future, Any]] = deque()

    def submit(
        self, write: Callable[[dict[str, Any], Path], None], state: dict[str, Any], path: Path, info: Any
    ) -> None:
        """Write `snapshot(state)` with `write(state, path)`; `info` comes back from `done` after."""
        if self._pool is None:
            future: Future = Future()
            try:
                write(state, path)  # nothing runs meanwhile: no copy needed
                future.set_result(None)
            except Exception as exc:
                if stops.within(exc) is not None:  # a write abandoned at a second Ctrl-C: the stop goes on up now
                    raise
                future.set_exception(exc)
            self._pending.append((future, info))
            return
        self._pending.append((self._pool.submit(write, snapshot(state), path), info))

    def done(self, keep: int | None = None) -> list[Any]:
        """The `info` of each finished write, oldest first. With `keep`, first wait until at most
        that many writes are still queued (bounding the snapshots held in memory)."""
        finished = []
        while self._pending and ((keep is not None and len(self._pending) > keep) or self._pending[0][0].done()):
            future, info = self._pending.popleft()
            future.result()
            finished.append(info)
        return finished

    def close(self) -> None:
        """Wait for every write (so the files exist when a run ends, or fails) and stop the thread."""
        try:
            self.done(keep=0)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
