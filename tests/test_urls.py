"""Passwords in storage and tracking URLs are replaced before a URL is shown or stored."""

import pytest

from bench.errors import redact


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://bench:s3cret@db:5432/optuna", "postgresql://bench:***@db:5432/optuna"),
        ("postgresql+psycopg://bench:p%40ss%3Aword@10.0.0.2/optuna", "postgresql+psycopg://bench:***@10.0.0.2/optuna"),
        ("http://alice:pw@tracking.example:5000", "http://alice:***@tracking.example:5000"),
        ("postgresql://bench:a@b@db/optuna", "postgresql://bench:***@db/optuna"),
        ("postgresql://bench@db/optuna", "postgresql://bench@db/optuna"),
        ("sqlite:///optuna.db", "sqlite:///optuna.db"),
        ("sqlite:////abs/path/optuna.db", "sqlite:////abs/path/optuna.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("postgresql+psycopg://bench@db/optuna?password=s3cret", "postgresql+psycopg://bench@db/optuna?password=***"),
        (
            "postgresql://bench@db/optuna?sslmode=require&PWD=s3cret&x=1",
            "postgresql://bench@db/optuna?sslmode=require&PWD=***&x=1",
        ),
    ],
)
def test_passwords_are_replaced_and_everything_else_kept(url, shown):
    assert redact(url) == shown
    assert "s3cret" not in redact(url) and "pw@" not in redact(url)


@pytest.mark.parametrize(
    "url, secret",
    [
        ("postgresql://bench:s3cret@db/optuna", "s3cret"),
        ("postgresql://bench@db/optuna?password=s3cret", "s3cret"),
        ("postgresql://bench@db/optuna?passwd=s3cret&sslmode=require", "s3cret"),
        ("postgresql://bench@db/optuna", None),
    ],
)
def test_the_password_is_found_in_the_user_information_or_the_query(url, secret):
    from bench.errors import password, scrub

    assert password(url) == secret
    if secret:
        assert "s3cret" not in scrub(f"could not connect to {url}", [url])
