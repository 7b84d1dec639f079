"""What a command prints: bench's own lines, one per event. The libraries' output (MLflow's
"View run ... at" lines, MLflow's and Optuna's logs, Python warnings) shows only with --debug,
which also logs bench's DEBUG records.

MLflow reads its two variables when it prints a run's link and when it is imported, so they also
reach the worker processes of `bench tune`; a library imported later is quieted where bench
imports it (`quiet`), as its import resets its logger.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

# urllib3 logs each of MLflow's HTTP retries; while a server is away bench says so once (bench.outage).
QUIET_LEVELS = {
    "mlflow": logging.WARNING,
    "alembic": logging.WARNING,
    "optuna": logging.ERROR,
    "urllib3.connectionpool": logging.ERROR,
}
# Warnings raised in these packages, and Optuna's "... is experimental" wherever it is attributed:
# torch's stay, as one is the only sign of a nondeterministic operation (warn_only).
QUIET_WARNINGS_FROM = r"(mlflow|optuna|optuna_dashboard|alembic|sqlalchemy|pydantic|matplotlib|seaborn)(\.|$)"
QUIET_ENV = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_LOGGING_LEVEL": "WARNING"}
_debug = False


def quiet(name: str) -> None:
    """The library's logger at its quiet level, unless the running command has --debug. Optuna
    logs each failed trial with its traceback: bench prints its own line for it."""
    if not _debug:
        logging.getLogger(name).setLevel(QUIET_LEVELS[name])


@contextlib.contextmanager
def terminal(debug: bool, secret: bool = False):
    """The console of one command; the levels, variables and warning filters before it come back after.
    `secret`: a store URL of the command holds a password, which MLflow's link lines would print
    (they are print() calls, not log records bench can scrub): they stay hidden under --debug too."""
    global _debug
    names = [*QUIET_LEVELS, "bench"]
    levels = {name: logging.getLogger(name).level for name in names}
    env = {key: os.environ.get(key) for key in QUIET_ENV}
    _debug = debug
    try:
        with warnings.catch_warnings():
            if debug:
                if secret:
                    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
                logging.getLogger("bench").setLevel(logging.DEBUG)
                for name in QUIET_LEVELS:
                    logging.getLogger(name).setLevel(logging.INFO)  # the libraries' own default
            else:
                os.environ.update(QUIET_ENV)
                for name in QUIET_LEVELS:
                    quiet(name)
                warnings.filterwarnings("ignore", module=QUIET_WARNINGS_FROM)
                warnings.filterwarnings("ignore", message=r".* is experimental")
            yield
    finally:
        _debug = False
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
