"""How an exception that ended a run or a trial is told: out of memory apart from other errors."""

from __future__ import annotations

import pytest
import torch

from bench.errors import failure_tags


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),  # CUDA and MPS raise this type
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"
        ),
    ],
)
def test_running_out_of_memory_is_told_apart(exc):
    tags = failure_tags(exc)
    assert tags["bench.failure"] == "out_of_memory"
    assert tags["bench.failure_reason"].startswith(f"{type(exc).__name__}: ")


def test_another_error_gives_its_type_and_first_line():
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise ValueError("Expected more than 1 value per channel\nsecond line") from inner
    except ValueError as exc:
        tags = failure_tags(exc)
    # The innermost cause's first line, behind the type of the exception that ended the run.
    assert tags == {"bench.status": "failed", "bench.failure": "error", "bench.failure_reason": "ValueError: 'inner'"}
