"""The one error type a user sees (exit code 2, one line), how a failed store becomes one, and
storage and tracking URLs as they may be shown: passwords never leave the process."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data or weights): exit code 2, one line."""


def unusable(what: str, url: str, exc: BaseException, hint: str = "") -> UserError:
    """`<what> <url> is not usable: <why>` with the password hidden (in the reason too, should a
    driver quote it) and the innermost cause's first line as the reason (the driver's own words,
    not a wrapper's)."""
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


# libpq and SQLAlchemy's drivers also take the password as a query parameter (?password=...)
_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:password|passwd|pwd)=)([^&#]*)")


def redact(url: str) -> str:
    """The URL with its password, if any, replaced by *** (postgresql://user:***@host/db,
    http://user:***@host:5000, postgresql://user@host/db?password=***)."""
    url = _QUERY_PASSWORD.sub(lambda m: m.group(1) + "***" if m.group(2) else m.group(0), url)
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
    except ValueError:  # not a URL we can parse: show nothing of what might follow a user name
        return url.split("@")[-1] if "@" in url else url
    if not has_password:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{host}"))


def password(url: str) -> str | None:
    """The URL's password, if it has one (as typed, percent-encoding and all): in its user
    information, else in its query string."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:  # unparsable: take what lies between the first ':' after '//' and the last '@'
        netloc = url.partition("//")[2].rpartition("@")[0] + "@"
    userinfo, at, _ = netloc.rpartition("@")
    if at and ":" in userinfo and userinfo.split(":", 1)[1]:
        return userinfo.split(":", 1)[1]
    found = [m.group(2) for m in _QUERY_PASSWORD.finditer(url) if m.group(2)]
    return found[0] if found else None


def scrub(text: str, urls) -> str:
    """`text` with the password of each of `urls` replaced by ***, as typed and percent-decoded:
    for messages that may quote a URL or a driver's error about it."""
    for url in urls:
        secret = password(url) if url else None
        if secret:
            for form in {secret, unquote(secret)}:
                text = text.replace(form, "***")
    return text
