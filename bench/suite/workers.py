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
whichever and however many of these signals come. Starting, stopping and collecting the workers is
`bench.workers.Pool`'s; what goes through the pipes is this module's.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from bench import process, workers


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
    from bench import job

    return [str(job.resolve_device(workers.device_for(device, i))) for i in range(count)]


def run(cells, *, args, count: int) -> list:
    """Train `cells` in `count` worker processes; the outcomes in the cells' order. `args` are the
    command's (its device, data, checkpoints, tracking store and --debug reach the workers)."""
    from bench import suite

    dispatch = suite.Dispatch(cells, bar=False)
    pool = workers.Pool()
    team: list[Worker] = []
    try:
        _start(pool, team, cells, args, count)
        while not dispatch.over:
            live = [w for w in team if w.conn is not None]
            if not live:  # every worker died: nobody is left to run the rest
                dispatch.stop()
                break
            _hand_out(live, dispatch)
            # A cell put off comes due for an idle worker; with every worker busy, only a message
            # can change anything (a timeout of a due cell's 0 s would spin).
            idle = any(w.ready and w.cell is None for w in live)
            for conn in wait([w.conn for w in live], timeout=dispatch.wait_s() if dispatch.put_off and idle else None):
                _receive(next(w for w in live if w.conn is conn), dispatch, args.checkpoint_dir)
        _stop(pool, team, None)
    except BaseException as exc:  # Ctrl-C or SIGTERM, passed on; an error here stops the workers as Ctrl-C does
        _stop(pool, team, signal.SIGTERM if getattr(exc, "signal_name", None) == "SIGTERM" else signal.SIGINT)
        raise
    return dispatch.results()


def _hand_out(live: list[Worker], dispatch) -> None:
    """The next cells to the ready workers without one."""
    for w in live:
        if w.ready and w.cell is None:
            taken = dispatch.take(w.where)
            if taken is None:
                break
            w.cell, w.label = taken
            w.started = time.monotonic()
            with contextlib.suppress(OSError):  # it has just died: its pipe's end says so below
                w.conn.send(taken)


def _start(pool: workers.Pool, team: list[Worker], cells, args, count: int) -> None:
    env = {k: v for k, v in workers.thread_env(count).items() if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    threads = workers.thread_share(count)
    where = devices(args.device, count)
    pipes = [workers.SPAWN.Pipe() for _ in where]
    # The thread variables are in a worker's environment before torch reads them; it starts with
    # SIGINT ignored until its own handler is in place (`held`).
    started = pool.spawn(
        work,
        [(threads, device, cells, args, theirs) for device, (_, theirs) in zip(where, pipes)],
        env=env,
        held=True,
        names=[f"bench-worker-{i + 1}" for i in range(count)],
    )
    for i, (device, p, (ours, theirs)) in enumerate(zip(where, started, pipes)):
        theirs.close()
        team.append(Worker(i + 1, device, p, ours))


def _receive(w: Worker, dispatch, checkpoint_root) -> None:
    from bench.suite import CellOutcome

    try:
        message = w.conn.recv()
    except (EOFError, OSError):  # the worker died: SIGKILL, out of memory
        w.conn.close()
        w.conn = None
        w.process.join(workers.GRACE_S)
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


def _stop(pool: workers.Pool, team: list[Worker], signum: int | None) -> None:
    """End the workers: a None to each (no more cells), or `signum` (they stop the cell they run);
    those not ended after workers.GRACE_S, or not started far enough to hold a cell, are killed.
    A second Ctrl-C meanwhile is ignored: the stop is under way."""
    with workers.ignoring(signal.SIGINT):
        _stop_team(pool, team, signum)


def _stop_team(pool: workers.Pool, team: list[Worker], signum: int | None) -> None:
    for w in team:
        if w.process.exitcode is None and (w.conn is None or not w.ready):  # dead, or still starting: it holds no cell
            w.process.kill()

    def no_more_cells(i: int) -> None:
        if i < len(team) and team[i].conn is not None and team[i].ready:  # a worker not yet in the team holds no cell
            with contextlib.suppress(OSError):  # it has just died: joined below
                team[i].conn.send(None)

    def killed(i: int) -> None:
        print(
            f"bench: worker {i + 1} did not stop within {workers.GRACE_S:.0f} s: killed",
            file=sys.stderr,
            flush=True,
        )

    pool.stop(signum, tell=no_more_cells, on_kill=killed)
    for w in team:
        if w.conn is not None:
            w.conn.close()


def work(threads: int, device: str, cells, args, conn: Connection) -> None:
    """A worker process: runs the cells the parent sends until it sends None. An outage that stops a
    cell is reported and the worker waits for the next message (the parent sends no more cells)."""
    import torch

    from bench import job
    from bench.tracking import Tracker, resolve_uri

    torch.set_num_threads(threads)
    with process.setup(args):
        workers.stop_once()
        try:
            tracker = Tracker(resolve_uri(args.tracking_uri))
            where = job.resolve_device(device)
            if where.type == "cuda":
                torch.cuda.set_device(where)  # no context on cuda:0 from code that uses the current device
            conn.send(("ready",))
            while (message := conn.recv()) is not None:
                # A stop that some library swallowed: the parent sends no more cells.
                if _run_cell(message, cells, args, tracker, where, conn) and workers.stopped_by():
                    sys.exit(143 if workers.stopped_by() == signal.SIGTERM else 130)
        except KeyboardInterrupt as exc:  # the cell's run is KILLED, its checkpoint kept: the parent says the rest
            sys.exit(process.exit_code(exc))
        except (EOFError, BrokenPipeError):  # the parent is gone (killed): nobody is left to take an outcome
            sys.exit(1)


def _run_cell(message: tuple[int, str], cells, args, tracker, device, conn: Connection) -> bool:
    """Runs the cell the parent sent and sends back its outcome's plain fields (True), or the
    outage that stopped it (False)."""
    from bench import suite
    from bench.servers import retry as outage

    index, label = message
    try:
        outcome = suite.attempt(
            cells[index],
            tracker=tracker,
            device=device,
            data_dir=args.data_dir,
            checkpoint_root=args.checkpoint_dir,
            label=label,
            bars=False,
        )
    except outage.Unavailable as exc:
        conn.send(("unreachable", str(exc)))
        return False
    conn.send(("outcome", {k: v for k, v in vars(outcome).items() if k != "cell"}))
    return True
