"""The signals that stop a run (SIGINT, SIGTERM), held back where an interruption would do harm.

Python raises a stop (KeyboardInterrupt, or the command line's Terminated) wherever the main
thread is. Inside a library that catches it, the stop can come out as another error: a
KeyboardInterrupt in the middle of torch.save becomes "RuntimeError: unexpected pos" when its
zip writer closes, and the cell would be marked failed instead of interrupted and resumable."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time

HELD = (signal.SIGINT, signal.SIGTERM)
INSIST_AFTER_S = 1.0  # a second Ctrl-C this long after the first abandons the wait (a slow disk)
_holding = threading.local()  # .token: the hold in force in this thread, if any
_abandoned: list[bool] = []  # a hold was given up at the user's insistence (see `abandoned`)


@contextlib.contextmanager
def held(what: str = "the checkpoint being written"):
    """Inside, a stop signal is noted, not acted on; on leaving, the handlers that were there come
    back and the first noted signal is raised again, as if it arrived then (the command's own
    handlers ignore a second stop). A second SIGINT at least INSIST_AFTER_S after the first (a user
    pressing Ctrl-C again at a write that takes too long) is acted on at once. Nested, only the
    outermost holds; outside the main thread (where Python runs no signal handler) it does nothing."""
    if threading.current_thread() is not threading.main_thread() or getattr(_holding, "token", None) is not None:
        yield
        return
    token = object()  # this hold's: a stand-in left installed by an earlier one must not note for it
    noted: dict[int, float] = {}
    previous: dict[int, object] = {}

    def give_back(signum: int) -> None:
        if signum in previous:
            signal.signal(signum, previous[signum])  # may run a pending handler first, and raise
            del previous[signum]

    def note(signum, frame) -> None:
        # Left installed if the restore below was cut short by another stop: it acts as the
        # handler it stands for, and puts that one back.
        insisted = signum == signal.SIGINT and time.monotonic() - noted.get(signum, float("inf")) >= INSIST_AFTER_S
        if getattr(_holding, "token", None) is token and not insisted:
            if not noted:
                again = " (Ctrl-C again to abandon it)" if signum == signal.SIGINT else ""
                print(f"bench: stopping once {what} is whole{again}", file=sys.stderr, flush=True)
            noted.setdefault(signum, time.monotonic())
            return
        if insisted:
            _abandoned[:] = [True]
        noted.pop(signum, None)
        give_back(signum)
        signal.raise_signal(signum)

    _abandoned.clear()
    try:
        for signum in HELD:
            if signal.getsignal(signum) is not None:  # None: a handler set from C, which cannot be put back
                previous[signum] = signal.signal(signum, note)
        _holding.token = token
        yield
    finally:
        _holding.token = None
        for signum in HELD:
            give_back(signum)
        for signum in list(noted)[:1]:
            signal.raise_signal(signum)


def abandoned() -> bool:
    """Whether the last hold was given up at a second Ctrl-C: what it guarded is not on disk, and
    the stop should not try it again."""
    return bool(_abandoned)


def within(exc: BaseException) -> KeyboardInterrupt | None:
    """The stop that `exc` was raised while handling (in its causes or contexts, at any depth), if
    any: an error in the clean-up of an interruption is that interruption, not a failure."""
    seen: set[int] = set()
    waiting: list[BaseException] = [exc]
    while waiting:
        current = waiting.pop()
        if id(current) in seen:
            continue
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        waiting += [e for e in (current.__cause__, current.__context__) if e is not None]
    return None
