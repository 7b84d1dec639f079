"""Storage and tracking URLs as they may be shown: passwords never leave the process."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact(url: str) -> str:
    """The URL with its password, if any, replaced by ***
    (postgresql://user:***@host/db, http://user:***@host:5000)."""
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
    except ValueError:  # not a URL we can parse: show nothing of what might follow a user name
        return url.split("@")[-1] if "@" in url else url
    if not has_password:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{host}"))
