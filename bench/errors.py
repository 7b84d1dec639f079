"""The one error type a user sees (exit code 2, one line), and how a failed store becomes one."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data or weights): exit code 2, one line."""


def unusable(what: str, url: str, exc: BaseException, hint: str = "") -> UserError:
    """`<what> <url> is not usable: <why>` with the password hidden (in the reason too, should a
    driver quote it) and the innermost cause's first line as the reason (the driver's own words,
    not a wrapper's)."""
    from bench.servers.urls import redact, scrub

    return UserError(f"{what} {redact(url)} is not usable: {scrub(reason(exc), [url])}{hint}")


def reason(exc: BaseException) -> str:
    """The first line of the innermost cause of `exc`."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def failure_tags(exc: BaseException) -> dict[str, str]:
    """How an exception ended a run or a trial, as tags: `bench.failure` (out_of_memory, or
    error) and `bench.failure_reason` (the exception's type and the first line of its message).
    Out of memory by torch's type (CUDA, MPS: torch.OutOfMemoryError) or the CPU allocator's words."""
    message = str(exc).lower()
    oom = (
        any(t.__name__ == "OutOfMemoryError" for t in type(exc).__mro__)
        or "out of memory" in message
        or "can't allocate memory" in message
    )
    return {
        "bench.status": "failed",
        "bench.failure": "out_of_memory" if oom else "error",
        "bench.failure_reason": f"{type(exc).__name__}: {reason(exc)}"[:5000],
    }
