"""Output places checked at the edge, before anything is trained or written, without creating them."""

from __future__ import annotations

import os
from pathlib import Path

from bench.errors import UserError


def check_writable(path: Path, what: str, *, want_dir: bool = True) -> None:
    """A UserError unless `path` is, or could be made, a directory (a file when not `want_dir`)
    that this process can write: its nearest existing ancestor is a writable directory."""
    path = Path(path)
    kind = "directory" if want_dir else "file"
    try:
        if path.exists():
            if path.is_dir() != want_dir:
                raise UserError(f"{what} {path} is not a {kind}; pass another path")
            if not os.access(path, os.W_OK):
                raise UserError(f"cannot write {what} {path}: not writable; pass a path you can write")
            return
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte
        raise UserError(f"{what} {path} is not a usable path ({exc})") from None
    if not parent.is_dir():
        raise UserError(f"cannot write {what} {path}: {parent} is not a directory; pass another path")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {what} {path}: {parent} is not writable; pass a path you can write")
