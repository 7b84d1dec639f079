"""Which cell a process (or the workers of `bench run --workers`) runs next, and what each outcome
means for the rest: busy cells put off and tried again, no more cells after an outage."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench import engine
from bench.servers import retry as outage
from bench.suite.cell import CellOutcome, attempt, create_experiments
from bench.suite.planning import Cell
from bench.tracking import Tracker

WAIT_S = 5.0  # how often to look again at a cell that another process is training
UNREACHABLE, NOT_RUN = "unreachable", "not run"  # the tracking store stayed away past the outage limit: the suite stops


def run_cells(
    cells: list[Cell], *, tracker: Tracker, device: torch.device, data_dir: Path | None, checkpoint_root: Path
) -> list[CellOutcome]:
    """Run the cells one after another; a failed cell is recorded and the next one goes on. A cell
    that another process is training is put off until the others are done, then waited for: it
    ends skipped once that process finishes it, or is taken over if that process dies."""
    create_experiments(cells, tracker)
    dispatch = Dispatch(cells, bar=sys.stderr.isatty())
    while not dispatch.over:
        taken = dispatch.take()
        if taken is None:
            time.sleep(dispatch.wait_s())
            continue
        i, label = taken
        try:
            outcome = attempt(
                cells[i],
                tracker=tracker,
                device=device,
                data_dir=data_dir,
                checkpoint_root=checkpoint_root,
                label=label,
            )
        except outage.Unavailable as exc:
            dispatch.unreachable(i, label, str(exc), checkpoint_root)
            continue
        dispatch.record(i, label, outcome)
    return dispatch.results()


class Dispatch:
    """Which cell runs next and what its outcome means, for one process or the workers of
    `bench run --workers`: the cells in order; one that another process is training (busy) put off
    and tried again WAIT_S later, after the cells not tried yet; after an outage, no more cells
    (those not reached, or put off, end "not run"). One line per event when there is no bar."""

    def __init__(self, cells: list[Cell], *, bar: bool) -> None:
        self.cells = cells
        self.outcomes: dict[int, CellOutcome] = {}
        self.fresh = list(range(len(cells)))
        self.put_off: dict[int, float] = {}  # busy cells: when to look again
        self.running: set[int] = set()
        self.stopped = False
        self.bar = tqdm(total=len(cells), desc="cells", unit="cell", file=sys.stderr, position=0) if bar else None

    def label(self, i: int) -> str:
        return f"[{i + 1}/{len(self.cells)}] {self.cells[i].display}"

    @property
    def over(self) -> bool:
        return not (self.fresh or self.put_off or self.running)

    def take(self, where: str = "") -> tuple[int, str] | None:
        """The next cell to run and its label (`where` runs it: a worker), or None while every
        cell left is put off (for `wait_s`) or running."""
        if self.fresh:
            i = self.fresh.pop(0)
        else:
            due = [i for i, t in self.put_off.items() if t <= time.monotonic()]
            if not due:
                return None
            i = min(due, key=self.put_off.get)
            del self.put_off[i]
        self.running.add(i)
        label = self.label(i) + (f" ({where})" if where else "")
        if self.bar is None and i not in self.outcomes:
            print(f"{label}: starting", file=sys.stderr, flush=True)
        return i, label

    def wait_s(self) -> float:
        """Seconds until a cell put off is due again."""
        return max(0.0, min(self.put_off.values(), default=time.monotonic() + WAIT_S) - time.monotonic())

    def record(self, i: int, label: str, outcome: CellOutcome, why: str = "") -> None:
        self.running.discard(i)
        if outcome.status == "busy" and self.stopped:
            outcome = CellOutcome(self.cells[i], NOT_RUN, 0, None, None, 0.0, None)
        if outcome.status == "busy":
            if i not in self.outcomes:
                print(f"{label}: another process is training it; coming back to it", file=sys.stderr, flush=True)
            self.outcomes[i] = outcome
            self.put_off[i] = time.monotonic() + WAIT_S
            return
        self.outcomes[i] = outcome
        if self.bar is None:
            print(
                f"{label}: {outcome.status} in {outcome.seconds:.0f} s" + (f" ({why})" if why else ""),
                file=sys.stderr,
                flush=True,
            )
        else:
            self.bar.update(1)

    def unreachable(self, i: int, label: str, message: str, checkpoint_root: Path) -> None:
        """The store stayed away past the outage limit while cell `i` ran: every cell needs it, so
        no other starts, and the same command goes on later."""
        self.running.discard(i)
        ckdir = self.cells[i].checkpoint_dir(checkpoint_root)
        kept = f"; its checkpoint and unsent metrics are kept in {ckdir}" if (ckdir / engine.LAST).is_file() else ""
        print(f"{label}: stopped: {message}{kept}", file=sys.stderr, flush=True)
        self.outcomes[i] = CellOutcome(self.cells[i], UNREACHABLE, 0, None, None, 0.0, None)
        self.stop()

    def stop(self) -> None:
        """No more cells start: those not reached, or put off, end "not run"."""
        for j in [*self.fresh, *self.put_off]:
            self.outcomes[j] = CellOutcome(self.cells[j], NOT_RUN, 0, None, None, 0.0, None)
        self.fresh, self.put_off = [], {}
        self.stopped = True

    def results(self) -> list[CellOutcome]:
        if self.bar is not None:
            self.bar.close()
        return [self.outcomes[i] for i in range(len(self.cells))]
