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

QUIET_LEVELS = {"mlflow": logging.WARNING, "alembic": logging.WARNING, "optuna": logging.ERROR}
QUIET_ENV = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_LOGGING_LEVEL": "WARNING"}
_debug = False


def quiet(name: str) -> None:
    """The library's logger at its quiet level, unless the running command has --debug. Optuna
    logs each failed trial with its traceback: bench prints its own line for it."""
    if not _debug:
        logging.getLogger(name).setLevel(QUIET_LEVELS[name])


@contextlib.contextmanager
def terminal(debug: bool):
    """The console of one command; the levels, variables and warning filters before it come back after."""
    global _debug
    names = [*QUIET_LEVELS, "bench"]
    levels = {name: logging.getLogger(name).level for name in names}
    env = {key: os.environ.get(key) for key in QUIET_ENV}
    _debug = debug
    try:
        with warnings.catch_warnings():
            if debug:
                logging.getLogger("bench").setLevel(logging.DEBUG)
                for name in QUIET_LEVELS:
                    logging.getLogger(name).setLevel(logging.INFO)  # the libraries' own default
            else:
                os.environ.update(QUIET_ENV)
                for name in QUIET_LEVELS:
                    quiet(name)
                warnings.simplefilter("ignore")  # bench warns through logging: these are the libraries'
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
