"""One cell of a suite: skip it when finished, resume it when not, else train it through job.py.

Whatever fails on the way fails that cell alone; an interruption ends its run KILLED (resumable) and
goes on up; an outage of the tracking store goes on up too, as it stops the suite.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import ablation, config, engine, job
from bench.engine import stops
from bench.engine.callbacks import ConsoleProgress
from bench.errors import failure_tags, reason
from bench.servers import retry as outage
from bench.suite import claims as lease
from bench.suite.planning import ABLATION_TAG, Cell, files_for
from bench.tracking import NOTE, Tracker, drop_pinned

log = logging.getLogger(__name__)

JOURNAL = "metrics-journal.jsonl"  # beside the checkpoints: the metric batches the store may lack (delivery.Journal)
INTERRUPTED = {"bench.status": "interrupted"}  # how a stopped cell's run is tagged, with bench.interrupted_by


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # finished, skipped (finished before), stopped, nonfinite, failed, unreachable, not run; busy (another process has it) until waited for
    epochs: int
    final_test_acc: float | None
    best_test_acc: float | None
    seconds: float
    run_id: str | None


def _skipped(cell: Cell, run, tracker: Tracker) -> CellOutcome:
    """A finished run of the cell; it gets the cell's ablation tag when it lacks it (a config run
    by --set before --ablate ran it as a variant)."""
    if cell.ablation and run.data.tags.get(ABLATION_TAG) != cell.ablation:
        try:
            tracker.set_tags(run.info.run_id, {ABLATION_TAG: cell.ablation})
        except Exception as exc:  # a label for the UI: the store's error must not fail a finished cell
            log.warning("could not tag run %s as ablation %s: %s", run.info.run_id, cell.ablation, reason(exc))
    metrics = run.data.metrics
    return CellOutcome(
        cell,
        "skipped",
        int(run.data.tags.get("bench.epochs_done", 0)),
        metrics.get("test_acc"),
        metrics.get("best_test_acc"),
        0.0,
        run.info.run_id,
    )


def run_cell(
    cell: Cell,
    *,
    tracker: Tracker,
    device: torch.device,
    data_dir: Path | None,
    checkpoint_root: Path,
    label: str,
    bars: bool = True,
) -> CellOutcome:
    """Train the cell, resume it, or skip it when finished; "busy" when another process (here or
    on another machine) holds its lease. `bars`: a progress bar on a terminal (see ConsoleProgress)."""
    exp_id = tracker.experiment_id(cell.experiment)
    existing = tracker.find_cell_run(exp_id, cell.tags)
    if existing is not None and existing.info.status == "FINISHED":
        return _skipped(cell, existing, tracker)
    with lease.hold(cell.checkpoint_dir(checkpoint_root), tracker, cell.key) as held:
        if not held:
            return CellOutcome(cell, "busy", 0, None, None, 0.0, None)
        existing = tracker.find_cell_run(exp_id, cell.tags)  # the holder before us may have finished it
        if existing is None:
            existing = _carry_over(cell, tracker, exp_id)
        if existing is not None and existing.info.status == "FINISHED":
            return _skipped(cell, existing, tracker)
        return _train(
            cell,
            existing,
            exp_id,
            tracker=tracker,
            device=device,
            data_dir=data_dir,
            checkpoint_root=checkpoint_root,
            label=label,
            bars=bars,
        )


def _carry_over(cell: Cell, tracker: Tracker, exp_id: str):
    """The cell's finished run from before `bench.config_hash` counted only the result keys, if
    any: it gets the cell's hash (the old one kept in `bench.config_hash_before`), so the cell is
    skipped rather than trained again. An unfinished one is left alone: resuming it would mix the
    epochs of two versions of bench in one run (and an earlier bench may still be training it).
    The caller holds the cell's lease, so one process carries it over."""
    before = cell.cfg.earlier_hash()
    if before is None or before == cell.cfg.config_hash():
        return None
    run = tracker.find_cell_run(exp_id, {**cell.tags, "bench.config_hash": before})
    if run is None or run.info.status != "FINISHED":
        return None
    tracker.set_tags(run.info.run_id, {"bench.config_hash": cell.cfg.config_hash(), "bench.config_hash_before": before})
    log.info("%s: carried over finished run %s (config hash %s before)", cell.name, run.info.run_id, before)
    return tracker.find_cell_run(exp_id, cell.tags)


def _train(
    cell: Cell,
    existing,
    exp_id: str,
    *,
    tracker: Tracker,
    device: torch.device,
    data_dir: Path | None,
    checkpoint_root: Path,
    label: str,
    bars: bool,
) -> CellOutcome:
    """Train the cell in its run. Whatever fails on the way (the store, the data, the device, a
    checkpoint, the training itself) fails this cell alone: its run ends FAILED with the reason in
    `bench.failure_reason`. An interruption (Ctrl-C, SIGTERM) ends it KILLED and goes on up."""
    cfg = cell.cfg
    started = time.perf_counter()
    run_id = existing.info.run_id if existing is not None else None
    ckdir = cell.checkpoint_dir(checkpoint_root)
    try:
        run_id = _open_run(cell, existing, exp_id, tracker, ckdir)
        result = job.train(
            cfg,
            device=device,
            files=files_for(cfg, data_dir),
            tracker=tracker,
            run_id=run_id,
            checkpoint_dir=ckdir,
            record=job.Record(tags=cell.run_tags, journal=ckdir / JOURNAL),
            callbacks=[ConsoleProgress(label, bars=bars)],
            # The experiment's evaluation-only ablations, measured on this run's weights every epoch.
            alternatives=ablation.alternatives(cell.experiment, cfg),
        ).result
        tracker.end_run(run_id, "FINISHED" if result.status == "finished" else "FAILED")
    except outage.Unavailable:
        if run_id is not None:
            tracker.abandon(run_id)  # left RUNNING in the store: the same command takes it up again
        drop_pinned(ckdir)
        raise
    except KeyboardInterrupt as exc:
        job.end_stopped(tracker, run_id, exc, INTERRUPTED)
        raise
    except Exception as exc:
        if (stop := job.stop_in(exc, cell.name)) is not None:
            job.end_stopped(tracker, run_id, stop, INTERRUPTED)
            raise stop from None
        log.error("%s failed:\n%s", cell.name, traceback.format_exc())
        if run_id is not None:
            job.end_quietly(tracker, run_id, "FAILED", failure_tags(exc))
        return CellOutcome(cell, "failed", 0, None, None, time.perf_counter() - started, run_id)
    return CellOutcome(
        cell,
        result.status,
        result.epochs_done,
        result.last_metrics.get("test_acc"),
        result.best_test_acc,
        time.perf_counter() - started,
        run_id,
    )


def _open_run(cell: Cell, existing, exp_id: str, tracker: Tracker, ckdir: Path) -> str:
    """The cell's run: the one it has, reopened (its checkpoints fetched when this machine lacks
    them), else a new one."""
    if existing is not None:
        run_id = existing.info.run_id
        tracker.reopen_run(run_id, existing.data.tags)
        if not (ckdir / engine.LAST).is_file() and tracker.fetch_checkpoints(run_id, ckdir):
            log.info("%s: resuming from the checkpoint in MLflow run %s", cell.name, run_id)
        return run_id
    # The description is written once, with the run: a resume keeps what a user wrote in the UI.
    return tracker.start_run(exp_id, cell.run_name, {**cell.run_tags, NOTE: cell.description})


def create_experiments(cells: list[Cell], tracker: Tracker) -> None:
    """The store is reachable and every experiment exists before the first cell runs."""
    for name in dict.fromkeys(c.experiment for c in cells):
        tracker.experiment_id(name, config.about_markdown(name))


def attempt(cell: Cell, **kwargs) -> CellOutcome:
    """`run_cell`, with an error in finding the cell's run or its lease (the store, the disk)
    failing this cell alone; an outage goes on up, as it stops the suite."""
    try:
        return run_cell(cell, **kwargs)
    except outage.Unavailable:
        raise
    except Exception as exc:
        if (stop := stops.within(exc)) is not None:
            raise stop from None
        log.error("%s failed: %s", cell.name, reason(exc))
        return CellOutcome(cell, "failed", 0, None, None, 0.0, None)
