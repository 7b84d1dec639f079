"""Storage and tracking URLs as they may be shown: passwords never leave the process."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

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
