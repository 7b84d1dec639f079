"""The one way to start, stop and collect K worker processes on this machine: `bench run --workers`
(spawned processes that take cells through a pipe each), `bench tune --workers` (K copies of
`python -m bench tune` sharing one study through its storage) and `bench perf --workers` (spawned
trainers that report through a queue) all use a `Pool`.

Each worker has its device (GPUs in turn, several workers on one GPU allowed) and its share of the
CPU threads. A stop reaches each worker once (SIGINT or SIGTERM, or no more work); the workers get
GRACE_S to end what they run, and those still running then are killed. Workers on other
machines run the same command against the same storage.

A worker process of its own (`stop_once`) stops once, whichever and however many of the stop
signals come (the terminal's Ctrl-C reaches every process of the command, and the parent forwards
what it gets in case they did not get it too), and stops as on SIGTERM when its parent is killed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from bench.process import Terminated

GRACE_S = 30.0  # how long stopped workers get to end their work before they are killed: more than
# the 10 s a stopped job gives the tracking store to hear of it (job.STOP_WAIT_S)
ORPHAN_CHECK_S = 1.0
SPAWN = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked process


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


class _Command:
    """A `python -m bench` subprocess with the face of multiprocessing's processes (pid,
    exitcode, join, kill), so that a pool handles both alike."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.popen = subprocess.Popen([sys.executable, "-m", "bench", *argv], env=env)
        self.pid = self.popen.pid

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)

    def kill(self) -> None:
        self.popen.kill()


class Pool:
    """K worker processes: started together, stopped once, collected (their exit codes)."""

    def __init__(self) -> None:
        self.processes: list = []  # multiprocessing's processes or _Commands, in the workers' order

    def spawn(
        self,
        target: Callable,
        args: Sequence[tuple],
        *,
        env: dict[str, str] | None = None,
        held: bool = False,
        names: Sequence[str] | None = None,
        daemon: bool | None = None,
    ) -> list:
        """One spawned process of `target` for each tuple of `args`, with `env` in its environment.
        `held`: it starts with SIGINT ignored, until it puts its own handler in place (a Ctrl-C while
        it imports torch would end it with a traceback); one that keeps Python's handler must not."""
        started = []
        with _environment(env or {}), ignoring(signal.SIGINT) if held else contextlib.nullcontext():
            for i, a in enumerate(args):
                process = SPAWN.Process(target=target, args=a, name=names[i] if names else None, daemon=daemon)
                process.start()
                # In the pool as soon as it runs: a failure or a stop before the last one starts
                # still stops the ones that did.
                self.processes.append(process)
                started.append(process)
        return started

    def commands(self, commands: Sequence[list[str]], env: dict[str, str]) -> None:
        """One `python -m bench` subprocess for each argument list, with `env` as its environment
        (it keeps Python's SIGINT handler: started with SIGINT ignored, it would keep that)."""
        self.processes += [_Command(argv, env) for argv in commands]

    def wait(self) -> list[int]:
        """Waits for every worker to end of itself; their exit codes."""
        for p in self.processes:
            p.join()
        return self.exit_codes()

    def exit_codes(self) -> list[int | None]:
        """Each worker's exit code, None while it runs (a negative one: the signal that ended it)."""
        return [p.exitcode for p in self.processes]

    def stop(
        self,
        signum: int | None,
        *,
        tell: Callable[[int], None] | None = None,
        on_kill: Callable[[int], None] | None = None,
    ) -> list[int | None]:
        """Ends the workers: `signum` to each still running (they stop what they run), or, with no
        signum, `tell(i)` to each (no more work: they end of themselves); waits GRACE_S in all
        and kills those still running then, `on_kill(i)` first. Returns the exit codes."""
        with ignoring(signal.SIGINT):  # a second Ctrl-C must not cut the wait short and leave workers behind
            for i, p in enumerate(self.processes):
                if p.exitcode is not None:
                    continue
                if signum is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signum)
                elif tell is not None:
                    tell(i)
            deadline = time.monotonic() + GRACE_S
            for i, p in enumerate(self.processes):
                p.join(max(0.1, deadline - time.monotonic()))
                if p.exitcode is None:
                    if on_kill is not None:
                        on_kill(i)
                    p.kill()
                    p.join()
        return self.exit_codes()


def run_all(commands: list[list[str]], env: dict[str, str]) -> list[int]:
    """Start every command, wait for all; Ctrl-C or SIGTERM stops them all. Returns exit codes."""
    pool = Pool()
    pool.commands(commands, env)
    # Each worker is a whole `bench tune`: SIGINT stops its trial as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, lambda *_: (pool.stop(signal.SIGINT), sys.exit(143)))
    try:
        return pool.wait()
    except KeyboardInterrupt:
        pool.stop(signal.SIGINT)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def ignoring(signum: int):
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signum, previous)


# --- in a worker process ---------------------------------------------------------------------------

_stopping: list[int] = []  # the signal that stops this worker, once one has come


def stop_once() -> None:
    """In a worker process: SIGINT and SIGTERM stop it once (KeyboardInterrupt, Terminated), a stop
    that Python drops in a finalizer comes again, and a killed parent stops it as SIGTERM does."""
    signal.signal(signal.SIGINT, _stop_once)
    signal.signal(signal.SIGTERM, _stop_once)
    sys.unraisablehook = _stop_again_if_lost
    _stop_when_orphaned(os.getppid())


def stopped_by() -> int | None:
    """The signal that stopped this worker, once one has come (a library may have swallowed the
    stop it raised)."""
    return _stopping[0] if _stopping else None


def _stop_when_orphaned(parent: int) -> None:
    """A parent killed (SIGKILL) cannot pass a stop on: the worker stops its work as on SIGTERM
    (a cell's run KILLED, its checkpoint kept) instead of training on with the GPU and the cell's lease held."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_CHECK_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _stop_once(signum, frame) -> None:
    # The terminal's Ctrl-C and the parent's forwarded signal both arrive: the first stops the
    # work, a later one must not cut that stop short.
    if _stopping:
        return
    _stopping.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _stop_again_if_lost(unraisable) -> None:
    """sys.unraisablehook: a stop raised while a finalizer or weakref callback ran is dropped by
    Python, and the work would go on with the later signals ignored: the signal comes again a
    moment later, once this hook and that finalizer are done."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _stopping:
        threading.Timer(0.05, os.kill, (os.getpid(), _stopping.pop())).start()
    else:
        sys.__unraisablehook__(unraisable)
