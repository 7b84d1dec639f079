"""bench.servers: the tracking server and the databases as bench meets them, without their
clients (no mlflow, no optuna here): URLs shown without their passwords (urls), checked before
anything runs (checks), and waited out through an outage (retry: the one retry policy)."""

from bench.servers import checks, retry, urls  # noqa: F401
