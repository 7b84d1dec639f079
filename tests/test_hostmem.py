"""The host allocator's settings: freed memory is not handed back and faulted in again each round
of allocations, the environment's own malloc settings win, and the command line applies them.

Each case runs in a fresh interpreter: malloc's thresholds are per process and cannot be unset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import process

# Four rounds of what a training step does to memory: allocate blocks, write them, free them.
# Prints the page faults of each round, in 4-KiB pages (transparent huge pages off for the process,
# where the kernel would otherwise fault in 2 MiB at a time).
ROUNDS = """
import ctypes, json, resource
libc = ctypes.CDLL(None)
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size, faults = 4 << 20, []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(20)]
    for b in blocks:
        libc.memset(b, 1, size)
    for b in reversed(blocks):
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""

needs_glibc = pytest.mark.skipif(process.glibc_version() is None, reason="malloc's thresholds are glibc's")


def faults_per_round(setup: str, **env: str) -> list[int]:
    clean = {k: v for k, v in os.environ.items() if k not in (*process._USER_SETTINGS, "GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run(
        [sys.executable, "-c", setup + ROUNDS], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.splitlines()[-1])


def refaulted(faults: list[int]) -> bool:
    """Whether the later rounds faulted their memory in again (the first must fault it in)."""
    return min(faults[1:]) > faults[0] // 2


@pytest.fixture
def default_refaults():
    """This C library, left alone, hands the freed blocks back: the case the settings are for."""
    if not refaulted(faults_per_round("")):
        pytest.skip("this glibc keeps the freed blocks by itself")


@needs_glibc
def test_kept_memory_is_not_faulted_in_again(default_refaults):
    faults = faults_per_round("from bench import process; print(process.keep_freed_memory())\n")
    assert faults[0] > 20 * (4 << 20) // 4096 // 2  # the first round wrote 80 MiB of new pages
    assert max(faults[1:]) < faults[0] // 20


@pytest.mark.slow
@needs_glibc
def test_the_command_line_keeps_freed_memory(default_refaults):
    faults = faults_per_round("from bench import cli; cli.main(['list'])\n")
    assert max(faults[1:]) < faults[0] // 20


@needs_glibc
def test_the_environments_malloc_settings_win(default_refaults):
    setup = "from bench import process; print(process.keep_freed_memory())\n"
    assert refaulted(faults_per_round(setup, MALLOC_TRIM_THRESHOLD_="131072"))
    assert refaulted(faults_per_round(setup, GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072"))
    # A tunable of something else leaves the thresholds to the suite.
    assert not refaulted(faults_per_round(setup, GLIBC_TUNABLES="glibc.malloc.tcache_count=8"))


def test_what_the_allocator_is_is_said(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for name in (*process._USER_SETTINGS, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    if process.glibc_version() is not None:
        assert process.keep_freed_memory().endswith("as set by MALLOC_TOP_PAD_")
        monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libfoo.so /usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
        assert process.keep_freed_memory() == "libjemalloc.so.2, preloaded"
    monkeypatch.setattr(process, "glibc_version", lambda: None)
    assert process.keep_freed_memory() == "the C library's default"
