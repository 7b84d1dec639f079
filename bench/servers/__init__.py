"""bench.servers: the tracking server and the databases as bench meets them, without their
clients (no mlflow, no optuna here): URLs checked before
anything runs (checks), and waited out through an outage (retry: the one retry policy)."""

from bench.servers import checks, retry  # noqa: F401
