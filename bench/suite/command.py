"""`bench run`: plan the cells, check what they need, train them here or in K workers, and sum up."""

from __future__ import annotations

import sys

from bench import config, job, process, tracking
from bench.errors import UserError, redact
from bench.paths import check_writable
from bench.servers import checks as stores
from bench.servers import retry as outage
from bench.suite import workers as run_workers
from bench.suite.cell import CellOutcome, create_experiments
from bench.suite.dispatch import UNREACHABLE, run_cells
from bench.suite.planning import Cell, plan, preflight, shard
from bench.suite.tables import ablation_table, dry_run_table, summary_table


def run(args) -> int:
    """The command `args`; its exit code (outage.EXIT_CODE when a store stayed away past the
    outage limit)."""
    names = _experiments(args)
    seeds = args.seeds or config.profile_seeds(args.profile)
    cells = plan(names, profile=args.profile, seeds=seeds, sets=args.sets, epochs=args.epochs, ablate=args.ablate)
    total = len(cells)
    cells = shard(cells, args.shard)
    count = min(args.workers, len(cells))  # more workers than cells would have nothing to do
    uri = tracking.resolve_uri(args.tracking_uri)
    stores.check("tracking store", uri)
    check_writable(args.checkpoint_dir, "--checkpoint-dir")
    if args.dry_run:
        _dry_run(args, names, cells, total, seeds, count)
        return 0
    device = job.resolve_device(args.device)
    tracking.probe.tracking_store(uri)
    preflight(cells, args.data_dir)
    if count > 1:
        run_workers.devices(args.device, count)  # a worker's device that is not there stops here, before any starts
        create_experiments(cells, tracking.Tracker(uri))
        outcomes = run_workers.run(cells, args=args, count=count)
    else:
        outcomes = run_cells(
            cells,
            tracker=tracking.Tracker(uri),
            device=device,
            data_dir=args.data_dir,
            checkpoint_root=args.checkpoint_dir,
        )
    return _sum_up(outcomes, uri)


def _experiments(args) -> list[str]:
    """The experiments the command names (its suite's included), each once; its numbers checked."""
    names = list(args.experiments)
    if args.suite:
        names += config.suite_experiments(args.suite)
    if not names:
        raise UserError("name experiments to run or give --suite NAME (see `bench list`)")
    for value, flag in ((args.seeds, "--seeds"), (args.epochs, "--epochs"), (args.workers, "--workers")):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.ablate and (args.sets or args.epochs is not None):
        flag = "--set" if args.sets else "--epochs"
        raise UserError(
            f"--ablate flips the switches of the profile's recipe; {flag} would change the recipe itself: "
            "put the change in a profile (experiments/profiles/) and run --ablate with --profile NAME"
        )
    return list(dict.fromkeys(names))


def _dry_run(args, names: list[str], cells: list[Cell], total: int, seeds: int, count: int) -> None:
    """What the command would train (and, with --ablate, what that costs), and where."""
    print(dry_run_table(cells))
    which = f", shard {args.shard}: {len(cells)} of {total} cells" if args.shard else ""
    if args.ablate:
        every = ", every shard together" if args.shard else ""
        print(f"\nWhat --ablate trains ({process.plural(seeds, 'seed')}{every}):")
        print(ablation_table(names, profile=args.profile, seeds=seeds, data_dir=args.data_dir))
        print(
            f"{total} cells (the recipe and each trained variant x {process.plural(seeds, 'seed')}), profile {args.profile}{which}"
        )
    else:
        print(
            f"{total} cells ({len(set(c.experiment for c in cells))} experiments x {process.plural(seeds, 'seed')}), profile {args.profile}{which}"
        )
    if args.workers > 1 and cells:
        on = ", ".join(f"worker {i + 1} on {d}" for i, d in enumerate(run_workers.devices(args.device, count)))
        print(f"{process.plural(count, 'worker')} would start: {on}")


def _sum_up(outcomes: list[CellOutcome], uri: str) -> int:
    """The summary table, where to see the runs, and the exit code: 1 when a cell did not finish,
    `outage.EXIT_CODE` when the store stayed away."""
    print(summary_table(outcomes))
    print(f"\nSee the runs: {tracking.ui_command(redact(uri))}")
    failed = [o for o in outcomes if o.status not in ("finished", "skipped")]
    if failed:
        print(
            f"{len(failed)} of {len(outcomes)} cells did not finish: {', '.join(o.cell.name for o in failed)}",
            file=sys.stderr,
        )
        return outage.EXIT_CODE if any(o.status == UNREACHABLE for o in outcomes) else 1
    return 0
