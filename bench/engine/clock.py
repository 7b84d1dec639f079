"""Where training's time goes: the device's queued work waited for, and the parts of a step timed."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer reads the work's end, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Clock:
    """Where training's time goes, part by part: `lap(part)` adds the seconds since the previous
    lap to `part`. Given a device, it first waits for the device's queued work, so that a part
    is charged for its work rather than its launch: for measurements only (`bench perf`), since
    the waits keep an accelerator idle. On the CPU the work is done when the call returns: a lap
    is a clock read, and needs no device."""

    # A step's parts; then "closing": after the last epoch's callbacks, its checkpoint written and
    # announced, once a run, not a step's.
    PARTS = ("data", "forward and backward", "optimizer", "metrics", "evaluation", "tracking", "checkpoints", "other")
    CLOSING = "closing"

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds = dict.fromkeys((*self.PARTS, self.CLOSING), 0.0)
        self.steps = 0
        self._last = time.perf_counter()

    def start(self) -> None:
        """Count from now: what came before is nobody's."""
        if self.device is not None:
            synchronize(self.device)
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        if self.device is not None:
            synchronize(self.device)
        now = time.perf_counter()
        self.seconds[part] += now - self._last
        self._last = now


def _no_lap(part: str) -> None:
    pass


def laps(clock: Clock | None) -> Callable[[str], None]:
    """The clock's `lap`, or one that does nothing when there is no clock."""
    return clock.lap if clock is not None else _no_lap
