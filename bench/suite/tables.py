"""The suite's tables on the console: the outcome of each cell, the cells a dry run would train, and
what `--ablate` costs."""

from __future__ import annotations

from pathlib import Path

import torch

from bench import ablation, config
from bench.suite.cell import CellOutcome
from bench.suite.planning import Cell, files_for


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
    from bench.models import cost

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
                (cost.CIFAR_TRAIN, cost.CIFAR_TEST)
                if cfg.data.source == "official"
                else tuple(len(getattr(files_for(cfg, data_dir), part)) for part in ("train", "test"))
            )
            flops = seeds * cost.run_flops(cfg, meta, *counts, alternatives=ablation.alternatives(name, cfg))
            epochs = seeds * cfg.train.epochs
            total_epochs, total_flops = total_epochs + epochs, total_flops + flops
            rows.append((f"  {v.name}", v.label, kind, str(seeds), str(epochs), f"{flops / 1e15:.3g}"))
    rows.append(("total", "", "", "", str(total_epochs), f"{total_flops / 1e15:.3g}"))
    return _table(rows, rule=True)
