"""The one error type a user sees (exit code 2, one line), and how a failed store becomes one."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data or weights): exit code 2, one line."""


def unusable(what: str, url: str, exc: BaseException, hint: str = "") -> UserError:
    """`<what> <url> is not usable: <why>` with the password hidden (in the reason too, should a
    driver quote it) and the innermost cause's first line as the reason (the driver's own words,
    not a wrapper's)."""
    from bench.urls import redact, scrub

    return UserError(f"{what} {redact(url)} is not usable: {scrub(reason(exc), [url])}{hint}")


def reason(exc: BaseException) -> str:
    """The first line of the innermost cause of `exc`."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
