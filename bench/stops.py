"""The signals that stop a run (SIGINT, SIGTERM), held back where an interruption would do harm.

Python raises a stop (KeyboardInterrupt, or the command line's Terminated) wherever the main
thread is. Inside a library that catches it, the stop can come out as another error: a
KeyboardInterrupt in the middle of torch.save becomes "RuntimeError: unexpected pos" when its
zip writer closes, and the cell would be marked failed instead of interrupted and resumable."""

from __future__ import annotations

import contextlib
import signal
import threading

HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def held():
    """Inside, a stop signal is noted, not acted on; on leaving, the handlers that were there come
    back and each noted signal is raised again, in the order it came, as if it arrived then.
    Outside the main thread (where Python runs no signal handler) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []

    def note(signum, frame) -> None:
        if signum not in noted:
            noted.append(signum)

    previous = {signum: signal.signal(signum, note) for signum in HELD}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in noted:
            signal.raise_signal(signum)


def within(exc: BaseException) -> KeyboardInterrupt | None:
    """The stop that `exc` was raised while handling (its context or cause, at any depth), if any:
    an error in the clean-up of an interruption is that interruption, not a failure."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
