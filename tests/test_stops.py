"""What counts as a stop: an error raised while a stop was being handled is that stop."""

from __future__ import annotations

import pytest

from bench import process
from bench.engine import stops


def raised(make):
    try:
        make()
    except BaseException as exc:
        return exc
    pytest.fail("nothing raised")


def test_an_error_raised_while_a_stop_is_handled_is_that_stop_at_any_depth():
    def nested():
        try:
            raise process.Terminated()
        except KeyboardInterrupt:
            try:
                raise OSError("disk full")
            except OSError:
                raise RuntimeError("unexpected pos")  # noqa: B904 (the context is the point)

    stop = stops.within(raised(nested))
    assert isinstance(stop, process.Terminated)


def test_a_stop_in_the_context_counts_when_the_error_names_another_cause():
    def caused_elsewhere():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("write failed") from ValueError("bad header")

    assert isinstance(stops.within(raised(caused_elsewhere)), KeyboardInterrupt)


def test_an_error_that_no_stop_led_to_is_a_failure():
    def plain():
        try:
            raise ValueError("first")
        except ValueError:
            raise RuntimeError("second")  # noqa: B904 (the context is the point)

    assert stops.within(raised(plain)) is None
