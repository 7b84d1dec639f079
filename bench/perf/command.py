"""`bench perf`, the command: its input checked before hours of measuring, the measurement, its
tables on stdout, progress on stderr and the figures as JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bench import config, job
from bench.errors import UserError
from bench.models import list_models
from bench.perf import harness, tables
from bench.perf import workers as perf_workers


def main(args) -> int:
    """Runs `bench perf` for its parsed `args`."""
    if args.workers is not None and min(args.workers) < 1:
        raise UserError(f"--workers must be at least 1, got {min(args.workers)}")
    models = args.models or list_models()
    unknown = sorted(set(models) - set(list_models()))
    if unknown:
        raise UserError(f"--model {unknown[0]}: no such model; choose from {', '.join(list_models())}")
    config.read_profile(args.profile)
    if args.json is not None:
        _check_writable(args.json)
    device = job.resolve_device(args.device)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.workers is not None:
        results = perf_workers.run(
            models, sorted(set(args.workers)), profile=args.profile, device=device, quick=args.quick, say=say
        )
        print(tables.workers_table(results))
    else:
        results = harness.run(models, profile=args.profile, device=device, quick=args.quick, say=say)
        print(tables.table(results))
        print(f"\nWhere a training step's time goes:\n{tables.breakdown_table(results)}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


def _check_writable(path: Path) -> None:
    """Fail before hours of measuring, not after: the file's directory must exist and take files."""
    folder = path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UserError(f"--json {path}: {folder} is not a writable directory")
