"""`bench run --workers K`: K processes on this machine work through the suite's cells.

Each worker has its device (GPUs in turn, several workers on one GPU allowed) and its share of the
CPU threads. The cells differ in length tenfold, so they are handed out one at a time, to whichever
worker is free; `suite.Dispatch` decides which cell comes next and what each outcome means, as in one
process. The workers are started with multiprocessing's "spawn" (CUDA cannot be used after fork);
each talks to the parent through a pipe of its own: the parent sends a cell's index and label, the
worker sends back "ready" once, then the plain fields of each cell's outcome.

Ctrl-C in a terminal reaches every process of the command: each worker stops its cell as one
process does (the run KILLED, the checkpoint kept) and the parent forwards what it gets (SIGINT, or
SIGTERM from a scheduler) to the workers, in case they did not get it too. A worker stops once,
whichever and however many of these signals come.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from bench import workers

STOP_WAIT_S = 30.0  # how long stopped workers get to end their runs before they are killed


@dataclass
class Worker:
    number: int  # 1-based, as printed
    device: str
    process: multiprocessing.process.BaseProcess
    conn: Connection
    ready: bool = False
    cell: int | None = None  # the index of the cell it runs
    label: str = ""
    started: float = 0.0

    @property
    def where(self) -> str:
        return f"worker {self.number}, {self.device}"


def devices(device: str, count: int) -> list[str]:
    """Each worker's device, resolved (`auto` becomes what it is on this machine)."""
    from bench import engine

    return [str(engine.resolve_device(workers.device_for(device, i))) for i in range(count)]


def run(cells, *, args, count: int) -> list:
    """Train `cells` in `count` worker processes; the outcomes in the cells' order. `args` are the
    command's (its device, data, checkpoints, tracking store and --debug reach the workers)."""
    from bench import suite

    dispatch = suite.Dispatch(cells, bar=False)
    pool: list[Worker] = []
    try:
        _start(pool, cells, args, count)
        while not dispatch.over:
            live = [w for w in pool if w.conn is not None]
            if not live:  # every worker died: nobody is left to run the rest
                dispatch.stop()
                break
            for w in live:
                if w.ready and w.cell is None:
                    taken = dispatch.take(w.where)
                    if taken is None:
                        break
                    w.cell, w.label = taken
                    w.started = time.monotonic()
                    with contextlib.suppress(OSError):  # it has just died: its pipe's end says so below
                        w.conn.send(taken)
            # A cell put off comes due for an idle worker; with every worker busy, only a message
            # can change anything (a timeout of a due cell's 0 s would spin).
            idle = any(w.ready and w.cell is None for w in live)
            for conn in wait([w.conn for w in live], timeout=dispatch.wait_s() if dispatch.put_off and idle else None):
                _receive(next(w for w in live if w.conn is conn), dispatch, args.checkpoint_dir)
        _stop(pool, None)
    except BaseException as exc:  # Ctrl-C or SIGTERM, passed on; an error here stops the workers as Ctrl-C does
        _stop(pool, signal.SIGTERM if getattr(exc, "signal_name", None) == "SIGTERM" else signal.SIGINT)
        raise
    return dispatch.results()


def _start(pool: list[Worker], cells, args, count: int) -> None:
    context = multiprocessing.get_context("spawn")
    env = {k: v for k, v in workers.thread_env(count).items() if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    threads = workers.thread_share(count)
    # A worker starts with SIGINT ignored, until its own handler is in place: a Ctrl-C while it
    # imports torch would end it with a traceback. The thread variables are in its environment
    # before torch reads them.
    with _environment(env), _ignoring(signal.SIGINT):
        for i, device in enumerate(devices(args.device, count)):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=work, args=(threads, device, cells, args, theirs), name=f"bench-worker-{i + 1}"
            )
            process.start()
            theirs.close()
            pool.append(Worker(i + 1, device, process, ours))


def _receive(w: Worker, dispatch, checkpoint_root) -> None:
    from bench.suite import CellOutcome

    try:
        message = w.conn.recv()
    except (EOFError, OSError):  # the worker died: SIGKILL, out of memory
        w.conn.close()
        w.conn = None
        w.process.join(STOP_WAIT_S)
        if w.cell is not None:
            outcome = CellOutcome(dispatch.cells[w.cell], "failed", 0, None, None, time.monotonic() - w.started, None)
            dispatch.record(w.cell, w.label, outcome, why=f"worker {w.number} exited with code {w.process.exitcode}")
        else:
            print(
                f"bench: worker {w.number} ({w.device}) exited with code {w.process.exitcode}",
                file=sys.stderr,
                flush=True,
            )
        return
    kind, *rest = message
    if kind == "ready":
        w.ready = True
        return
    index, w.cell = w.cell, None
    if kind == "unreachable":
        dispatch.unreachable(index, w.label, rest[0], checkpoint_root)
    else:
        dispatch.record(index, w.label, CellOutcome(dispatch.cells[index], **rest[0]))


def _stop(pool: list[Worker], signum: int | None) -> None:
    """End the workers: a None to each (no more cells), or `signum` (they stop the cell they run);
    those not ended after STOP_WAIT_S, or not started far enough to hold a cell, are killed."""
    with _ignoring(signal.SIGINT):  # a second Ctrl-C must not cut the wait short and leave workers behind
        for w in pool:
            if w.process.exitcode is not None:
                continue
            if w.conn is None or not w.ready:  # dead, or still starting: it holds no cell
                w.process.kill()
            elif signum is None:
                with contextlib.suppress(OSError):  # it has just died: joined below
                    w.conn.send(None)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.process.pid, signum)
        deadline = time.monotonic() + STOP_WAIT_S
        for w in pool:
            w.process.join(max(0.1, deadline - time.monotonic()))
            if w.process.exitcode is None:
                print(
                    f"bench: worker {w.number} did not stop within {STOP_WAIT_S:.0f} s: killed",
                    file=sys.stderr,
                    flush=True,
                )
                w.process.kill()
                w.process.join()
            if w.conn is not None:
                w.conn.close()


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
def _ignoring(signum: int):
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def work(threads: int, device: str, cells, args, conn: Connection) -> None:
    """A worker process: runs the cells the parent sends until it sends None. An outage that stops a
    cell is reported and the worker waits for the next message (the parent sends no more cells)."""
    import torch

    from bench import cli, engine, suite
    from bench.servers import retry as outage
    from bench.tracking import Tracker, resolve_uri

    torch.set_num_threads(threads)
    with cli.process(args):
        signal.signal(signal.SIGINT, _stop_once)
        signal.signal(signal.SIGTERM, _stop_once)
        sys.unraisablehook = _stop_again_if_lost
        _stop_when_orphaned(os.getppid())
        try:
            tracker = Tracker(resolve_uri(args.tracking_uri))
            where = engine.resolve_device(device)
            if where.type == "cuda":
                torch.cuda.set_device(where)  # no context on cuda:0 from code that uses the current device
            conn.send(("ready",))
            while (message := conn.recv()) is not None:
                index, label = message
                try:
                    outcome = suite.attempt(
                        cells[index],
                        tracker=tracker,
                        device=where,
                        data_dir=args.data_dir,
                        checkpoint_root=args.checkpoint_dir,
                        label=label,
                        bars=False,
                    )
                except outage.Unavailable as exc:
                    conn.send(("unreachable", str(exc)))
                    continue
                conn.send(("outcome", {k: v for k, v in vars(outcome).items() if k != "cell"}))
                if _stopping:  # a stop that some library swallowed: the parent sends no more cells
                    sys.exit(143 if _stopping[0] == signal.SIGTERM else 130)
        except KeyboardInterrupt as exc:  # the cell's run is KILLED, its checkpoint kept: the parent says the rest
            sys.exit(143 if getattr(exc, "signal_name", "SIGINT") == "SIGTERM" else 130)
        except (EOFError, BrokenPipeError):  # the parent is gone (killed): nobody is left to take an outcome
            sys.exit(1)


_stopping: list[int] = []  # the signal that stops this worker, once one has come
ORPHAN_CHECK_S = 1.0


def _stop_when_orphaned(parent: int) -> None:
    """A parent killed (SIGKILL) cannot pass a stop on: the worker stops its cell as on SIGTERM
    (run KILLED, checkpoint kept) instead of training on with the GPU and the cell's lease held."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_CHECK_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _stop_once(signum, frame) -> None:
    # The terminal's Ctrl-C and the parent's forwarded signal both arrive: the first stops the
    # cell, a later one must not cut that stop short.
    from bench import cli

    if _stopping:
        return
    _stopping.append(signum)
    raise cli.Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _stop_again_if_lost(unraisable) -> None:
    """sys.unraisablehook: a stop raised while a finalizer or weakref callback ran is dropped by
    Python, and the cell would train on with the later signals ignored: the signal comes again a
    moment later, once this hook and that finalizer are done."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _stopping:
        threading.Timer(0.05, os.kill, (os.getpid(), _stopping.pop())).start()
    else:
        sys.__unraisablehook__(unraisable)
