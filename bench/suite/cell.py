"""Suites and profiles: which (experiment, seed) cells to run; skip finished ones, resume the rest.

Everything that can be wrong (configs, data, weights, the tracking store) is checked for every
cell before the first one trains.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from tqdm import tqdm

from bench import ablation, config, data, engine
from bench.data import cifar
from bench.engine import stops
from bench.engine.callbacks import ConsoleProgress
from bench.errors import UserError, failure_tags, reason
from bench.models import create_model
from bench.servers import retry as outage
from bench.suite import claims as lease
from bench.tracking import NOTE, MlflowRun, Tracker, drop_pinned, environment_tags
from bench.tracking import model as logged_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    profile: str
    cfg: config.RunConfig
    # The ablation variant the cell trains (`bench run --ablate`): shown and tagged, not part of
    # its identity, so a config trained before, or both as a variant and by --set, is one cell.
    ablation: str | None = None

    @property
    def experiment(self) -> str:
        return self.cfg.experiment

    @property
    def name(self) -> str:
        return f"{self.experiment}/{self.profile}/seed{self.cfg.seed}"

    @property
    def variant(self) -> str | None:
        """The ablation variant it trains, where that is not the recipe."""
        return self.ablation if self.ablation not in (None, ablation.RECIPE) else None

    @property
    def display(self) -> str:
        return self.name + (f" ({self.variant})" if self.variant else "")

    @property
    def run_name(self) -> str:
        """Two configs of one experiment and profile differ in the UI by their hash's first digits;
        the seeds of one config share everything before `-seed`."""
        return f"{self.experiment}-{self.profile}-{self.cfg.config_hash()[:8]}-seed{self.cfg.seed}"

    @property
    def description(self) -> str:
        """The run's description in the MLflow UI (markdown): the experiment's, then the cell's."""
        about = config.read_profile(self.profile).get("description")
        profile = f"profile `{self.profile}`" + (f" ({about})" if about else "")
        variant = f", ablation `{self.ablation}`" if self.ablation else ""
        return f"{config.about_markdown(self.experiment)}\n**This run:** {profile}, seed {self.cfg.seed}, config `{self.cfg.config_hash()}`{variant}\n"

    @property
    def key(self) -> str:
        """Names the cell in its lease: what its tags say, in one string."""
        return f"{self.name}/{self.cfg.config_hash()}"

    @property
    def tags(self) -> dict[str, str]:
        return {
            "bench.experiment": self.experiment,
            "bench.profile": self.profile,
            "bench.seed": str(self.cfg.seed),
            "bench.config_hash": self.cfg.config_hash(),
        }

    @property
    def run_tags(self) -> dict[str, str]:
        """The tags a run of the cell carries: its identity and the ablation variant it trains."""
        return {**self.tags, **({ABLATION_TAG: self.ablation} if self.ablation else {})}

    def checkpoint_dir(self, root: Path) -> Path:
        return Path(root) / self.experiment / f"{self.profile}-seed{self.cfg.seed}-{self.cfg.config_hash()}"


ABLATION_TAG = "bench.ablation"


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # finished, skipped (finished before), stopped, nonfinite, failed, unreachable, not run; busy (another process has it) until waited for
    epochs: int
    final_test_acc: float | None
    best_test_acc: float | None
    seconds: float
    run_id: str | None


def plan(
    experiments: list[str],
    *,
    profile: str,
    seeds: int,
    sets: list[str] = (),
    epochs: int | None = None,
    ablate: bool = False,
) -> list[Cell]:
    """Every cell's config, loaded and validated before anything runs. With `ablate`, each
    experiment's trained ablation variants too (the recipe first), seeds within each variant; a
    variant that trains the same config as one before it is that cell."""
    if not ablate:
        return [
            Cell(profile, config.load(name, profile=profile, seed=seed, sets=sets, epochs=epochs))
            for name in experiments
            for seed in range(seeds)
        ]
    cells = []
    for name in experiments:
        for v in ablation.variants(name, profile):
            if v.kind == ablation.TRAINED and v.same_as is None:
                cells += [
                    Cell(profile, config.load(name, profile=profile, seed=seed, sets=list(v.sets)), v.name)
                    for seed in range(seeds)
                ]
    return cells


def shard(cells: list[Cell], spec: str | None) -> list[Cell]:
    """The cells of shard I of N ("I/N", 1 <= I <= N): every N-th cell from the I-th, so N
    processes or machines given 1/N .. N/N cover every cell exactly once."""
    if spec is None:
        return cells
    index, count = parse_shard(spec)
    return cells[index - 1 :: count]


def parse_shard(spec: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UserError(f"--shard must be I/N, e.g. 1/4, got {spec!r}") from None
    if not 1 <= index <= count:
        raise UserError(f"--shard I/N needs 1 <= I <= N, got {spec!r}")
    return index, count


def data_root(cfg: config.RunConfig, data_dir: Path | None) -> Path | None:
    return None if cfg.data.source == "embedded" else Path(data_dir or "data")


@cache
def _files(dataset: str, root: Path | None) -> cifar.CifarFiles:
    return cifar.load_cifar(dataset, root)


def files_for(cfg: config.RunConfig, data_dir: Path | None) -> cifar.CifarFiles:
    return _files(cfg.data.dataset, data_root(cfg, data_dir))


def preflight(cells: list[Cell], data_dir: Path | None) -> None:
    """Load each dataset and build each model once: missing data or weights stop before training."""
    for c in cells:
        try:
            data.check_val_size(c.cfg.data.val_size, len(_files(c.cfg.data.dataset, data_root(c.cfg, data_dir)).train))
        except UserError as exc:
            variant = f" (ablation {c.variant})" if c.variant else ""
            raise UserError(f"{c.experiment}{variant}: {exc}") from None
    for cfg in {repr(c.cfg.model) + str(c.cfg.data.image_size): c.cfg for c in cells}.values():
        try:
            model = create_model(
                cfg.model.name, num_classes=cifar.NUM_CLASSES[cfg.data.dataset], **cfg.model.options
            ).eval()
            with torch.no_grad():  # options that build but do not fit together fail on the first batch
                model(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size))
        except UserError:
            raise
        except Exception as exc:  # a builder given options that do not fit together (list lengths, ...)
            options = ", ".join(f"model.{k}={v}" for k, v in cfg.model.options.items())
            raise UserError(
                f"{cfg.experiment}: model {cfg.model.name} does not work with {options} at {cfg.data.image_size} px: {reason(exc)}"
            ) from None


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
    try:
        if run_id is not None:
            tracker.reopen_run(run_id, existing.data.tags)
            ckdir = cell.checkpoint_dir(checkpoint_root)
            if not (ckdir / engine.LAST).is_file() and tracker.fetch_checkpoints(run_id, ckdir):
                log.info("%s: resuming from the checkpoint in MLflow run %s", cell.name, run_id)
        else:
            # The description is written once, with the run: a resume keeps what a user wrote in the UI.
            run_id = tracker.start_run(exp_id, cell.run_name, {**cell.run_tags, NOTE: cell.description})
        engine.seed_everything(cfg.seed, cfg.train.deterministic)
        bundle = data.build(
            cfg.data, seed=cfg.seed, device=device, files=_files(cfg.data.dataset, data_root(cfg, data_dir))
        )
        model = create_model(cfg.model.name, num_classes=bundle.num_classes, **cfg.model.options).to(device)
        tags = {
            **cell.run_tags,
            **environment_tags(engine.device_name(device)),
            "bench.data_source": bundle.source,
            "bench.data_complete": str(bundle.complete).lower(),
        }
        tags.update({f"bench.data_{k}": str(v) for k, v in bundle.counts.items()})
        example = bundle.test.images[: logged_model.EXAMPLE_IMAGES].permute(0, 2, 3, 1).cpu().numpy()
        tracker.log_environment(run_id)
        ckdir = cell.checkpoint_dir(checkpoint_root)
        drop_pinned(ckdir)  # left by a process killed before its uploads
        callbacks = [
            MlflowRun(
                tracker, run_id, cfg, tags, model_example=example, datasets=bundle.parts, journal=ckdir / JOURNAL
            ),
            ConsoleProgress(label, bars=bars),
        ]
        # The experiment's evaluation-only ablations, measured on this run's weights every epoch.
        alternatives = ablation.alternatives(cell.experiment, cfg)
        result = engine.fit(
            model,
            bundle,
            cfg,
            checkpoint_dir=cell.checkpoint_dir(checkpoint_root),
            callbacks=callbacks,
            alternatives=alternatives,
        )
        tracker.end_run(run_id, "FINISHED" if result.status == "finished" else "FAILED")
    except outage.Unavailable:
        if run_id is not None:
            tracker.abandon(run_id)  # left RUNNING in the store: the same command takes it up again
        drop_pinned(cell.checkpoint_dir(checkpoint_root))
        raise
    except KeyboardInterrupt as exc:
        _end_interrupted(tracker, run_id, exc)
        raise
    except Exception as exc:
        if (stop := stops.within(exc)) is not None:  # an error in the clean-up of a stop is that stop
            log.warning("%s: stopped; the clean-up after the stop failed: %s", cell.name, reason(exc))
            _end_interrupted(tracker, run_id, stop)
            raise stop from None
        log.error("%s failed:\n%s", cell.name, traceback.format_exc())
        if run_id is not None:
            _end_quietly(tracker, run_id, "FAILED", failure_tags(exc))
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


STOP_WAIT_S = 10.0  # the longest a stop waits for the store to hear of it


def _end_interrupted(tracker: Tracker, run_id: str | None, stop: KeyboardInterrupt) -> None:
    """The cell's run (if it has one) KILLED by `stop`, resumable."""
    if run_id is not None:
        _end_quietly(
            tracker,
            run_id,
            "KILLED",
            {"bench.status": "interrupted", "bench.interrupted_by": getattr(stop, "signal_name", "SIGINT")},
        )


def _end_quietly(tracker: Tracker, run_id: str, status: str, tags: dict[str, str]) -> None:
    """End the run with `status` and `tags`, as far as the store lets us: the cell has failed or
    been interrupted already, and a second error (the store down too) must not hide the first,
    nor an outage hold the stop up (a run the store did not hear end is taken up again)."""
    with tracker.limited(STOP_WAIT_S):
        _end(tracker, run_id, status, tags)


def _end(tracker: Tracker, run_id: str, status: str, tags: dict[str, str]) -> None:
    try:
        tracker.set_tags(run_id, tags)
    except Exception as exc:
        log.warning("could not tag run %s: %s", run_id, reason(exc))
    try:
        tracker.end_run(run_id, status)
    except Exception as exc:
        log.warning("could not mark run %s %s: %s", run_id, status, reason(exc))


WAIT_S = 5.0  # how often to look again at a cell that another process is training
JOURNAL = "metrics-journal.jsonl"  # beside the checkpoints: the metric batches the store may lack (delivery.Journal)
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


def _table(rows: list[tuple[str, ...]], rule: bool) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_table(outcomes: list[CellOutcome]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    rows = [("cell", "status", "epochs", "final test_acc", "best test_acc (val-chosen)", "time")]
    rows += [
        (o.cell.display, o.status, str(o.epochs), pct(o.final_test_acc), pct(o.best_test_acc), f"{o.seconds:.0f} s")
        for o in outcomes
    ]
    return _table(rows, rule=True)


def dry_run_table(cells: list[Cell]) -> str:
    rows = [("cell", "model", "data", "optim", "schedule", "epochs")]
    for c in cells:
        cfg = c.cfg
        o, s, d = cfg.optim, cfg.schedule, cfg.data
        optim = f"{o.name} lr={o.lr:g} wd={o.weight_decay:g}" + (f" mom={o.momentum:g}" if o.name == "sgd" else "")
        sched = (
            s.name
            if s.name in ("none", "cosine")
            else (f"step {s.step_size} x{s.gamma:g}" if s.name == "step" else f"exp x{s.gamma:g}")
        )
        data_s = f"{d.dataset} {d.source} bs={d.batch_size} val={d.val_size} {d.image_size}px"
        rows.append((c.display, cfg.model.name, data_s, optim, sched, str(cfg.train.epochs)))
    return _table(rows, rule=False)


def ablation_table(experiments: list[str], *, profile: str, seeds: int, data_dir: Path | None) -> str:
    """What `--ablate` costs: per experiment and variant, its training cells, epochs and compute
    (forward and backward passes, evaluation passes included, counted on the model's shapes)."""
    from bench import perf

    meta = torch.device("meta")
    rows = [("variant", "changes", "kind", "cells", "epochs", "PFLOP")]
    total_epochs, total_flops = 0, 0.0
    for name in experiments:
        rows.append((name, "", "", "", "", ""))
        for v in ablation.variants(name, profile):
            kind = v.kind if v.ablation is None else f"{v.kind}, {v.ablation.kind}"
            if v.kind == ablation.EVALUATION_ONLY or v.same_as is not None:
                why = "measured on every run's weights" if v.same_as is None else f"the same as {v.same_as}"
                rows.append((f"  {v.name}", v.label, kind, "0", f"0 ({why})", "0"))
                continue
            cfg = config.load(name, profile=profile, sets=list(v.sets))
            counts = (
                (perf.CIFAR_TRAIN, perf.CIFAR_TEST)
                if cfg.data.source == "official"
                else tuple(len(getattr(files_for(cfg, data_dir), part)) for part in ("train", "test"))
            )
            flops = seeds * perf.run_flops(cfg, meta, *counts, alternatives=ablation.alternatives(name, cfg))
            epochs = seeds * cfg.train.epochs
            total_epochs, total_flops = total_epochs + epochs, total_flops + flops
            rows.append((f"  {v.name}", v.label, kind, str(seeds), str(epochs), f"{flops / 1e15:.3g}"))
    rows.append(("total", "", "", "", str(total_epochs), f"{total_flops / 1e15:.3g}"))
    return _table(rows, rule=True)
