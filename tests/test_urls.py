"""Passwords in storage and tracking URLs are replaced before a URL is shown or stored."""

import pytest

from bench.urls import redact


@pytest.mark.parametrize("url, shown", [
    ("postgresql://bench:s3cret@db:5432/optuna", "postgresql://bench:***@db:5432/optuna"),
    ("postgresql+psycopg://bench:p%40ss%3Aword@10.0.0.2/optuna", "postgresql+psycopg://bench:***@10.0.0.2/optuna"),
    ("http://alice:pw@tracking.example:5000", "http://alice:***@tracking.example:5000"),
    ("postgresql://bench:a@b@db/optuna", "postgresql://bench:***@db/optuna"),
    ("postgresql://bench@db/optuna", "postgresql://bench@db/optuna"),
    ("sqlite:///optuna.db", "sqlite:///optuna.db"),
    ("sqlite:////abs/path/optuna.db", "sqlite:////abs/path/optuna.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_passwords_are_replaced_and_everything_else_kept(url, shown):
    assert redact(url) == shown
    assert "s3cret" not in redact(url) and "pw@" not in redact(url)
