"""Callback base (no-op hooks) and console progress output.

The engine talks to the world only through these hooks: tracking, pruning and progress are
callbacks, so the engine knows nothing of MLflow, Optuna or terminals.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class Callback:
    def on_fit_start(self, *, start_epoch: int, epochs: int) -> None:
        """Called once; start_epoch > 0 when resuming from a checkpoint."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> bool | None:
        """Called after each epoch (1-based) with its metrics; return True to stop the run."""

    def on_train_steps(self, step: int, metrics: dict[str, float]) -> None:
        """Called every `train.log_every_steps` training steps (global step, 1-based) when set."""

    def on_checkpoint(self, kind: str, path: Path, epoch: int) -> None:
        """Called after a checkpoint of `kind` ("last" or "best") was written."""

    def on_fit_end(self, result: Any) -> None:
        """Called once with the engine's FitResult."""


class ConsoleProgress(Callback):
    """A tqdm bar with ETA on a terminal; one plain line per epoch otherwise, or always with
    `bars=False` (processes that share one terminal: their bars would overwrite each other)."""

    def __init__(self, label: str, stream=None, bars: bool = True) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.bars = bars
        self.bar: tqdm | None = None
        self.started = 0.0

    def on_fit_start(self, *, start_epoch: int, epochs: int) -> None:
        self.epochs = epochs
        self.started = time.perf_counter()
        if self.bars and self.stream.isatty():
            self.bar = tqdm(
                total=epochs, initial=start_epoch, desc=self.label, unit="epoch", file=self.stream, leave=False
            )
        elif start_epoch:
            print(f"{self.label}: resuming after epoch {start_epoch}/{epochs}", file=self.stream, flush=True)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        shown = f"loss {metrics['train_loss']:.3f}" + "".join(
            f" {k} {metrics[k]:.3f}" for k in ("val_acc", "test_acc") if k in metrics
        )
        if self.bar is not None:
            self.bar.set_postfix_str(shown)
            self.bar.update(1)
        else:
            print(
                f"{self.label}: epoch {epoch}/{self.epochs} {shown} ({metrics['epoch_time_s']:.1f} s)",
                file=self.stream,
                flush=True,
            )

    def on_fit_end(self, result: Any) -> None:
        if self.bar is not None:
            self.bar.close()
