"""One trainer per suite cell: a file lock for processes on one machine, a lease in MLflow for
processes on machines that share only the tracking store.

The leases are runs of an experiment of their own, `bench-leases`, so the experiments that users
browse and report on hold results only. Each lease run records one holding: which cell, which
process (host:pid), from when to when. It ends FINISHED when its holder releases the cell, KILLED
when another process finds its heartbeat stale (a dead holder) and frees the cell.

Waiting costs the store nothing: a process that finds a live claim on the cell reads it and gives
up (the suite looks again later); it writes a claim of its own only once no live one is left.
Processes that find the cell free at the same moment are told apart by Lamport's bakery algorithm,
which needs no compare-and-swap (MLflow has none): every contender writes a claim (a run tagged
with the cell's key) while "choosing", reads the others' numbers, takes one more than the largest
and stops choosing; then it waits for each other claim to finish choosing and loses to any with a
smaller (number, run id). A contender that starts later reads the numbers of those before it, so
it draws a larger one: two claims that both pass the check cannot exist. Here a loser gives up at
once instead of queueing, and its claim, which never held the cell, is deleted rather than kept in
the record. Holders refresh a heartbeat tag; a claim whose heartbeat is older than `stale_s`
belongs to a dead process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from bench.errors import reason
from bench.servers import retry as outage

log = logging.getLogger(__name__)

LEASES_EXPERIMENT = "bench-leases"
KIND, CELL, OWNER = "bench.kind", "bench.lease.cell", "bench.lease.owner"
CHOOSING, NUMBER, HEARTBEAT = "bench.lease.choosing", "bench.lease.number", "bench.lease.heartbeat"
LIMIT = "bench.lease.outage_limit"  # the holder's: how long it may go on without the store
LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 180.0  # six missed heartbeats; generous, since the clocks of two machines may differ


def stale_after(outage_limit: float, heartbeat_s: float = HEARTBEAT_S) -> float:
    """How old a heartbeat must be for its claim to be taken over: STALE_S, or longer than a
    holder cut off from the store keeps training (the outage limit, then its last heartbeat's
    wait and a backoff): a holder is never taken over while it may still write to the run."""
    return max(STALE_S, outage_limit + heartbeat_s + outage.MAX_DELAY_S)


# Each claim's heartbeat as this process first saw it, and when: a heartbeat is stale only once it
# has also stayed the same for a while here.
_SEEN: dict[str, tuple[str, float]] = {}


class Lease:
    """A claim on one cell in the tracking store; `acquire` says whether this process holds it."""

    def __init__(
        self,
        tracker,
        key: str,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        stale_s: float | None = None,
        confirm_s: float | None = None,
    ) -> None:
        self.tracker, self.key = tracker, key
        self.experiment_id = tracker.experiment_id(LEASES_EXPERIMENT)
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_after(tracker.limit, heartbeat_s) if stale_s is None else stale_s
        # How long an old heartbeat must stay unchanged under this process's eyes: a holder the
        # store could not hear from (an outage within one long epoch) beats again once it is back.
        self.confirm_s = heartbeat_s + outage.MAX_DELAY_S if confirm_s is None else confirm_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.run_id: str | None = None
        self.holder: str | None = None  # the owner that has the cell, once acquire returned False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _others(self) -> list[dict]:
        """The other live claims on the cell. A stale one (its process is dead) is ended as
        KILLED: the only write before this process claims the cell itself."""
        live = []
        # Ended claims stay as records, one per holding of the cell: few beside the 1000 runs one
        # search returns, newest (and so the live ones) first.
        for claim in self.tracker.tagged_runs(self.experiment_id, {KIND: "lease", CELL: self.key}):
            if claim["status"] != "RUNNING" or claim["run_id"] == self.run_id:
                continue
            owner = claim["tags"].get(OWNER, "")
            beat = claim["tags"].get(HEARTBEAT, "0")
            seen = _SEEN.get(claim["run_id"])
            if seen is None or seen[0] != beat:
                _SEEN[claim["run_id"]] = seen = (beat, time.monotonic())
            stale_s = max(self.stale_s, stale_after(float(claim["tags"].get(LIMIT, 0)), self.heartbeat_s))
            old = time.time() - float(beat) > stale_s and time.monotonic() - seen[1] >= self.confirm_s
            if old or _dead_here(owner):
                log.warning("lease on %s: the claim of %s is stale; taking the cell over", self.key, owner)
                self.tracker.end_run(claim["run_id"], "KILLED")
                continue
            live.append(claim)
        return live

    def acquire(self) -> bool:
        held = self._others()
        if held:
            self.holder = held[0]["tags"].get(OWNER)
            return False
        self.run_id = self.tracker.start_run(
            self.experiment_id,
            f"lease {self.key}",
            {
                KIND: "lease",
                CELL: self.key,
                OWNER: self.owner,
                CHOOSING: "1",
                HEARTBEAT: str(time.time()),
                LIMIT: f"{self.tracker.limit:g}",
            },
        )
        try:
            return self._choose()
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM) or the store failed while choosing: a claim left
            # "choosing" would hold up every contender until it went stale.
            self._stop.set()
            with contextlib.suppress(Exception), self.tracker.limited(10):
                self.tracker.delete_run(self.run_id)
            self.run_id = None
            raise

    def _choose(self) -> bool:
        numbers = [int(c["tags"][NUMBER]) for c in self._others() if c["tags"].get(NUMBER)]
        number = 1 + max(numbers, default=0)
        self.tracker.set_tags(self.run_id, {NUMBER: str(number), CHOOSING: "0", HEARTBEAT: str(time.time())})
        mine = (number, self.run_id)
        while True:
            others = self._others()
            if any(c["tags"].get(CHOOSING) == "1" for c in others):
                time.sleep(0.2)  # choosing takes one read and one write
                continue
            ahead = [c for c in others if c["tags"].get(NUMBER) and (int(c["tags"][NUMBER]), c["run_id"]) < mine]
            break
        if ahead:
            self.holder = ahead[0]["tags"].get(OWNER)
            self.tracker.delete_run(self.run_id)
            self.run_id = None
            return False
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease {self.key}", daemon=True)
        self._beat.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.tracker.set_tags(self.run_id, {HEARTBEAT: str(time.time())})
            except Exception as exc:  # a blip of the store: the next beat may get through
                log.warning(
                    "lease on %s: heartbeat failed: %s",
                    self.key,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )

    def abandon(self) -> None:
        """Stop the heartbeat without a call to the store (it is away): the claim lapses."""
        self._stop.set()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)  # a beat waiting out an outage: the release below tells the store
        if self.run_id is not None:
            self.tracker.end_run(self.run_id, "FINISHED")
            self.run_id = None


def _dead_here(owner: str) -> bool:
    """The owner ran on this machine and its process is gone (killed, crashed): its claim is
    stale at once, so a run killed here resumes without waiting out the heartbeat."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


@contextlib.contextmanager
def hold(folder: Path, tracker, key: str, **timing):
    """Yields whether this process may train the cell: it holds the file lock on `folder` (the
    cell's checkpoint directory) and the lease in the tracking store; both are released after."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as f:
        if not _try_lock(f):
            yield False
            return
        lease = Lease(tracker, key, **timing)
        if not lease.acquire():
            log.info("%s is being trained by %s", key, lease.holder)
            yield False
            return
        try:
            yield True
        except outage.Unavailable:
            lease.abandon()  # the same command on this machine takes it over at once: its process is gone
            raise
        finally:
            try:
                if not lease._stop.is_set():
                    with tracker.limited(10):  # a stop is not held up by an outage: the claim lapses
                        lease.release()  # the lock file is unlocked when it is closed
            except Exception as exc:
                # The store is unreachable (a cluster going down): the claim goes stale by itself,
                # and what ended the cell (its result, an interruption) must not be replaced.
                log.warning(
                    "lease on %s: could not release it (%s); it lapses once its heartbeat is stale", key, reason(exc)
                )


def _try_lock(f) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows: the lease in the tracking store still holds
        return True
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
