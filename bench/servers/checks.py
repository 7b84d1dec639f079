"""Tracking and storage URLs checked at the edge: their form before anything runs, then whether
the server or database answers, within seconds, before any training.

MLflow retries an unreachable HTTP server or database for many minutes (its defaults suit a
store that blips during a long run); a wrong URL should fail at once, in one line. Nothing here
creates a database or a file.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from bench.errors import UserError, reason, redact, unusable
from bench.paths import check_writable

TIMEOUT_S = 5
DATABASES = ("sqlite", "postgresql", "mysql", "mssql", "oracle")
TRACKING = ("", "file", "http", "https", "databricks", *DATABASES)
# What to pass instead, by store.
EXAMPLES = {
    "tracking store": "sqlite:///mlflow.db, postgresql://USER:PASSWORD@HOST/DB or http://HOST:PORT",
    "Optuna storage": "sqlite:///optuna.db or postgresql://USER:PASSWORD@HOST/DB",
}


def _scheme(url: str) -> str:
    """The scheme without its driver (postgresql+psycopg -> postgresql); "" for a plain path."""
    scheme = urlsplit(url).scheme
    return "" if len(scheme) == 1 else scheme.split("+")[0]  # C:\path is a path, not a scheme


def check(what: str, url: str) -> None:
    """A UserError unless `url` is a well-formed URL of a kind the store supports, and a local
    file or directory it names could be created.

    `what` is "tracking store" (MLflow) or "Optuna storage"."""
    if url != url.strip() or not url or not url.isprintable():
        raise UserError(f"{what} {redact(url)!r} is not a URL; use {EXAMPLES[what]}")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises for a port that is not a number in 0-65535
    except ValueError as exc:
        raise UserError(f"{what} {redact(url)} is not a well-formed URL ({exc}); use {EXAMPLES[what]}") from None
    scheme = _scheme(url)
    known = TRACKING if what == "tracking store" else DATABASES
    if scheme not in known:
        raise UserError(f"{what} {redact(url)}: unknown scheme {parts.scheme!r}; use {EXAMPLES[what]}")
    if scheme in ("http", "https") and not parts.hostname:
        raise UserError(f"{what} {redact(url)} names no host; use {EXAMPLES[what]}")
    if scheme in DATABASES:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
            parsed.get_dialect()  # an unknown driver (postgresql+nope) fails here, without connecting
            database = parsed.database
        except (ArgumentError, ValueError) as exc:
            raise unusable(what, url, exc, f"; use {EXAMPLES[what]}") from None
        # A local file need not exist yet, but its place must be able to hold it.
        if scheme == "sqlite" and database and database != ":memory:":
            check_writable(Path(database), f"{what} {redact(url)}: the file", want_dir=False)
    elif scheme in ("", "file"):
        check_writable(Path(parts.path if scheme else url), f"{what} {redact(url)}: the directory")


def probe(what: str, url: str) -> None:
    """A UserError unless the server or database behind a checked `url` answers within seconds
    (local files were checked with the URL)."""
    scheme = _scheme(url)
    if scheme in ("http", "https"):
        _probe_http(what, url)
    elif scheme in DATABASES and scheme != "sqlite":
        _probe_database(what, url)


def _probe_http(what: str, url: str) -> None:
    import requests  # what MLflow uses: the same proxies and certificates

    parts = urlsplit(url)
    # Credentials stay out of the probe (and so out of any error text); /health needs none.
    host = parts.netloc.rsplit("@", 1)[-1]
    health = f"{parts.scheme}://{host}{parts.path.rstrip('/')}/health"
    try:
        answer = requests.get(health, timeout=TIMEOUT_S)
    except requests.RequestException as exc:
        raise UserError(
            f"{what} {redact(url)} does not answer ({type(exc).__name__}); is the MLflow server running there?"
        ) from None
    if answer.status_code >= 500:
        raise UserError(f"{what} {redact(url)} answers with HTTP {answer.status_code} at /health")


def _probe_database(what: str, url: str) -> None:
    import sqlalchemy

    scheme = _scheme(url)
    # Drivers wait for an unreachable host for minutes by default.
    args = {"connect_timeout": TIMEOUT_S} if scheme in ("postgresql", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=args)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except ModuleNotFoundError as exc:
        raise unusable(what, url, exc, " (for PostgreSQL: pip install -e '.[postgres]')") from None
    except Exception as exc:  # SQLAlchemy and the drivers raise many types for a bad or unreachable URL
        # libpq's words for a missing or wrong password ("no password supplied", "password authentication failed")
        hint = " (give the password in the URL, in ~/.pgpass or in PGPASSWORD)" if "password" in reason(exc) else ""
        raise unusable(what, url, exc, hint) from None
