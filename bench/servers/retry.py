"""What a server that goes away costs a run: how long bench waits for it, how it retries, and what
counts as the server being away rather than refusing the request.

A tracking server or a database that restarts, is overloaded or is unreachable for a while should
not end a run that can wait: calls are retried with backoff, in order, for up to the outage limit
(`--outage-limit`, `$BENCH_OUTAGE_LIMIT_S`, 300 s by default). Past it, the work stops cleanly
(`Unavailable`) and the same command finishes it later. Errors that say the request itself is wrong
(a 4xx, a bad value) are not outages and are raised at once.

No mlflow or optuna here: the errors are told apart by their HTTP status, their type's name and
the driver's words, so the engine's side of bench can import this module too.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

from bench.errors import UserError, redact

log = logging.getLogger(__name__)

LIMIT_ENV = "BENCH_OUTAGE_LIMIT_S"
DEFAULT_LIMIT_S = 300.0
FIRST_DELAY_S, MAX_DELAY_S = 1.0, 30.0

# HTTP answers that mean "not now": overloaded, restarting, a proxy whose backend is away.
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
# The exception types (by name, anywhere in the chain of causes) of a connection that failed or
# was cut: requests', urllib3's, the socket's, SQLAlchemy's and the DB drivers'.
TRANSIENT_TYPES = {
    "ConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "Timeout",
    "ChunkedEncodingError",
    "ProtocolError",
    "MaxRetryError",
    "NewConnectionError",
    "RemoteDisconnected",
    "ConnectionRefusedError",
    "ConnectionResetError",
    "BrokenPipeError",
    "TimeoutError",
    "DisconnectionError",
    "AdminShutdown",
    "CannotConnectNow",
}
# What MLflow's REST client and SQL store say when the server or database was away (it wraps the
# original error in its own exception, by message).
TRANSIENT_WORDS = (
    "Max retries exceeded",
    "Connection refused",
    "Connection reset",
    "Connection aborted",
    "RemoteDisconnected",
    "server closed the connection",
    "terminating connection",
    "the database system is starting up",
    "the database system is shutting down",
    "could not connect to server",
    "connection to server",
    "connection failed",
    "the connection is closed",
    "connection is lost",
    "could not receive data",
    "SSL SYSCALL error",
    "database is locked",
    "timed out",
    "Temporary failure in name resolution",
    "too many connections",
)


def limit_s() -> float:
    """The outage limit in seconds: $BENCH_OUTAGE_LIMIT_S (set by --outage-limit), else 300."""
    raw = os.environ.get(LIMIT_ENV)
    if raw is None or raw == "":
        return DEFAULT_LIMIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise UserError(f"${LIMIT_ENV}={raw!r} is not a number of seconds >= 0; use e.g. {LIMIT_ENV}=600")
    return value


def _status(exc: BaseException) -> int | None:
    """The HTTP status an MLflow error stands for, if it says."""
    getter = getattr(exc, "get_http_status_code", None)
    try:
        return int(getter()) if getter is not None else None
    except Exception:  # noqa: BLE001 - an error code MLflow cannot map
        return None


def transient(exc: BaseException) -> bool:
    """Whether `exc` says the server or database was away (down, restarting, overloaded,
    unreachable, the connection cut), so the same call may succeed later."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, Unavailable):  # a wait that has run out: not to be waited out again
            return False
        # SQLAlchemy marks the errors of a connection the database dropped.
        if type(current).__name__ in TRANSIENT_TYPES or getattr(current, "connection_invalidated", False):
            return True
        # A server error (500 included: what MLflow's server answers while its database is away)
        # may be a lasting fault too; it is retried up to the limit all the same.
        if _status(current) in TRANSIENT_STATUS or any(w in str(current) for w in TRANSIENT_WORDS):
            return True
        current = current.__cause__ or current.__context__
    return False


EXIT_CODE = 75  # EX_TEMPFAIL: what a command whose server stayed away exits with; a scheduler may run it again


class Unavailable(Exception):
    """A server or database stayed away longer than the outage limit: the work stops where it can
    be taken up again, and the same command finishes it once the server is back."""

    def __init__(self, what: str, url: str, down_s: float, limit: float) -> None:
        self.what, self.url, self.down_s, self.limit = what, redact(url), down_s, limit
        super().__init__(
            f"the {what} {self.url} has been unreachable or failing for {down_s:.0f} s (the outage limit "
            f"is {limit:g} s: --outage-limit or ${LIMIT_ENV})"
        )


class Backoff:
    """Waits between attempts: 1 s, doubling to 30 s, each shortened by up to a half at random so
    that many workers do not come back at the same instant. Its own random generator: the
    run's seeded ones are not touched."""

    def __init__(self) -> None:
        self._delay = FIRST_DELAY_S
        self._random = random.Random()

    def next(self) -> float:
        delay = self._delay * self._random.uniform(0.5, 1.0)
        self._delay = min(self._delay * 2, MAX_DELAY_S)
        return delay


def retry(
    call: Callable[[], Any],
    *,
    what: str,
    url: str,
    limit: float | None = None,
    before_again: Callable[[], Any] | None = None,
    watch: Any = None,
) -> Any:
    """`call()`, again after each transient error, with backoff, until it succeeds or the server
    has been away for `limit` seconds (then `Unavailable`). `before_again()`, when given, runs
    before each new attempt and its result, if not None, is returned instead of calling again: a
    call whose reply was lost may have been done, and what it did is read back first."""
    limit = limit_s() if limit is None else limit
    backoff, down_since, warned = Backoff(), None, False
    while True:
        try:
            if down_since is not None and before_again is not None:
                done = before_again()
                if done is not None:
                    result = done
                    break
            result = call()
            break
        except Exception as exc:
            if not transient(exc):
                if watch is not None:
                    watch.since = None  # the server answered
                raise
            now = time.monotonic()
            down_since = now if down_since is None else down_since
            if watch is not None and watch.since is None:
                watch.since = down_since
            if now - down_since >= limit:
                raise Unavailable(what, url, now - down_since, limit) from exc
            if not warned:
                log.warning(
                    "the %s %s does not answer (%s); trying again for up to %g s",
                    what,
                    redact(url),
                    first_line(exc),
                    limit,
                )
                warned = True
            time.sleep(min(backoff.next(), max(0.0, limit - (now - down_since)) + 0.01))
    if watch is not None:
        watch.since = None
    if warned:
        log.warning("the %s %s answers again after %.0f s", what, redact(url), time.monotonic() - down_since)
    return result


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__
