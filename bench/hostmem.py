"""The host's memory allocator, set for training: freed memory stays with the process.

A training step frees and allocates the same activations, gradients and batches every step.
glibc's malloc adjusts two thresholds as a process runs: blocks above the first come from fresh
mmap calls, and free space above the second at the top of a heap goes back to the kernel. Where
they settle depends on the order of earlier allocations, and when they settle low, every step
hands its memory back and faults it in again page by page: on this suite's CPU runs, 2-3 million
page faults and 4-6 s of system time in 3 epochs of the fine-tune, 10-17 % of its speed, in some
runs of the same code and not in others.

`keep_freed_memory()` fixes both thresholds: blocks up to MMAP_THRESHOLD come from the heap, and
up to TRIM_THRESHOLD of free space stays there, as a GPU's caching allocator keeps its memory
(blocks above 32 MiB, glibc's ceiling, are still mapped and unmapped each time). A process may
then hold that much more memory than it uses at the moment. The command line calls it before any
work, and `bench perf` before measuring. The environment's own settings win: with MALLOC_*_
variables or threshold tunables in GLIBC_TUNABLES, a preloaded allocator (jemalloc, tcmalloc,
mimalloc), or another C library (musl, macOS, Windows), nothing is changed.
"""

from __future__ import annotations

import ctypes
import os

TRIM_THRESHOLD = 1 << 30  # bytes of free space at the top of a heap kept before any goes back
MMAP_THRESHOLD = 32 << 20  # the largest block served from the heap: glibc's own ceiling on 64-bit

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_USER_TUNABLES = (
    "glibc.malloc.trim_threshold",
    "glibc.malloc.mmap_threshold",
    "glibc.malloc.top_pad",
    "glibc.malloc.mmap_max",
)


def glibc_version() -> str | None:
    """The C library's version when it is glibc, else None."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    return name.split()[-1] if name and name.startswith("glibc") else None


def user_settings() -> list[str]:
    """The environment's own settings of the thresholds, which this module leaves in charge."""
    found = [v for v in _USER_SETTINGS if v in os.environ]
    if any(t in os.environ.get("GLIBC_TUNABLES", "") for t in _USER_TUNABLES):
        found.append("GLIBC_TUNABLES")
    return found


def preloaded_allocator() -> str | None:
    """The malloc library preloaded in place of glibc's (LD_PRELOAD=.../libjemalloc.so.2), if any."""
    for lib in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        name = os.path.basename(lib)
        if "malloc" in name:
            return name
    return None


def keep_freed_memory() -> str:
    """Fix glibc's malloc thresholds where nothing else has set them; says what the allocator is."""
    version = glibc_version()
    if version is None:
        return "the C library's default"
    if preloaded_allocator():
        return f"{preloaded_allocator()}, preloaded"
    if user_settings():
        return f"glibc {version}, as set by {', '.join(user_settings())}"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: setting either one ends glibc's own adjustment of both.
    if not mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return f"glibc {version}, default (mallopt refused a {MMAP_THRESHOLD >> 20} MiB mmap threshold)"
    if not mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        return f"glibc {version}, mmap {MMAP_THRESHOLD >> 20} MiB (mallopt refused the trim threshold)"
    return f"glibc {version}, freed memory kept (trim {TRIM_THRESHOLD >> 20} MiB, mmap {MMAP_THRESHOLD >> 20} MiB)"
