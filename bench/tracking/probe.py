"""A tracking store answers, and lets this process in: a server asked as MLflow's client would ask it."""

from __future__ import annotations

from urllib.parse import urlsplit

from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from bench.errors import UserError, redact
from bench.servers import checks
from bench.servers.checks import TIMEOUT_S


def login(what: str, url: str) -> None:
    """A UserError unless the server lets this process read its experiments: /health answers
    everyone, also where the server requires a login (`mlflow server --app-name basic-auth`).
    The request carries what MLflow's client would send (MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN, ~/.mlflow/credentials, or a user in the URL)."""
    creds = get_default_host_creds(url.rstrip("/"))
    try:
        # The server is up (/health answered): its first API call may wait a while for its database.
        answer = http_request(
            creds,
            "/api/2.0/mlflow/experiments/search",
            "GET",
            params={"max_results": 1},
            max_retries=0,
            timeout=(TIMEOUT_S, 60),
            raise_on_status=False,
        )
    except Exception:  # MLflow wraps what requests raises; its message would quote the URL as given
        raise UserError(
            f"{what} {redact(url)} does not answer a search of its experiments; is it an MLflow server?"
        ) from None
    given = creds.username or creds.token or urlsplit(url).username
    if answer.status_code == 401 and given:
        raise UserError(
            f"{what} {redact(url)} refuses the login (HTTP 401): check the user and password "
            "in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    if answer.status_code == 401:
        raise UserError(
            f"{what} {redact(url)} requires a login (HTTP 401): set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD to a user of the server"
        )
    if answer.status_code >= 400:
        raise UserError(f"{what} {redact(url)} answers with HTTP {answer.status_code} to a search of its experiments")


def tracking_store(uri: str) -> None:
    """A UserError unless the tracking store at a checked `uri` answers within seconds and, on a
    server, lets this process read it (what a command asks before it trains)."""
    checks.probe("tracking store", uri)
    if urlsplit(uri).scheme in ("http", "https"):
        login("tracking store", uri)
