"""The host's memory allocator, set for training: freed memory stays with the process.

A training step frees and allocates the same activations, gradients and batches every step.
glibc's malloc adjusts two thresholds as a process runs: blocks above the first come from fresh
mmap calls, and free space above the second at the top of a heap goes back to the kernel. Where
they settle depends on the order of earlier allocations, and when they settle low, every step
hands its memory back and faults it in again page by page: on this suite's CPU runs, 2-3 million
page faults and 4-6 s of system time in 3 epochs of the fine-tune, 10-17 % of its speed, in some
runs of the same code and not in others.

`keep_freed_memory()` fixes both thresholds (freed memory is kept up to TRIM_THRESHOLD of free
space; blocks up to MMAP_THRESHOLD come from the heap), as a GPU's caching allocator keeps its
memory. The process holds its peak; nothing else changes. It is called by the command line, once,
before any work. glibc's own settings win: with MALLOC_*_ variables or glibc.malloc tunables in the
environment, or on another C library (musl, macOS, Windows), nothing is changed.
"""

from __future__ import annotations

import ctypes
import os

TRIM_THRESHOLD = 1 << 30  # bytes of free space at the top of a heap kept before any goes back
MMAP_THRESHOLD = 32 << 20  # the largest block served from the heap: glibc's own ceiling on 64-bit

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def glibc_version() -> str | None:
    """The C library's version when it is glibc, else None."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    return name.split()[-1] if name and name.startswith("glibc") else None


def user_settings() -> list[str]:
    """The environment's own malloc settings, which this module leaves in charge."""
    found = [v for v in _USER_SETTINGS if v in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        found.append("GLIBC_TUNABLES")
    return found


def keep_freed_memory() -> str:
    """Fix glibc's malloc thresholds where nothing else has set them; says what the allocator is."""
    version = glibc_version()
    if version is None:
        return "the C library's default"
    if user_settings():
        return f"glibc {version}, as set by {', '.join(user_settings())}"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)):
        return f"glibc {version}, default (mallopt refused)"
    return f"glibc {version}, freed memory kept (trim {TRIM_THRESHOLD >> 20} MiB, mmap {MMAP_THRESHOLD >> 20} MiB)"
