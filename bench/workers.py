"""Worker processes on one machine: K copies of `bench tune` sharing one study through its storage.

Each worker is a plain `python -m bench tune ...` process with its own device and its share of
the CPU threads; Optuna's storage hands out the trials, so there is no queue here. Workers on other
machines run the same command against the same storage.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_count(device: str) -> int:
    """One worker per visible GPU when the device is auto or cuda, else one."""
    return max(1, visible_gpus()) if device in ("auto", "cuda") else 1


def device_for(device: str, index: int) -> str:
    """Worker `index`'s device: GPUs round-robin for auto/cuda when there are GPUs, else as asked."""
    gpus = visible_gpus() if device in ("auto", "cuda") else 0
    return f"cuda:{index % gpus}" if gpus else device


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or a batch job's CPU set),
    not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def thread_share(workers: int) -> int:
    """Each of `workers` processes' share of the usable cores, at least one."""
    return max(1, usable_cores() // workers)


def thread_env(workers: int) -> dict[str, str]:
    """Each worker's share of the CPU cores, so K workers do not fight over them."""
    threads = str(thread_share(workers))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def run_all(commands: list[list[str]], env: dict[str, str]) -> list[int]:
    """Start every command, wait for all; Ctrl-C or SIGTERM stops them all. Returns exit codes."""
    procs = [subprocess.Popen([sys.executable, "-m", "bench", *cmd], env=env) for cmd in commands]

    def stop(*_):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()

    previous = signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(143)))
    try:
        return [p.wait() for p in procs]
    except KeyboardInterrupt:
        stop()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
