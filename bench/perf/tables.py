"""`bench perf`'s tables: the harness's figures per model, where a training step's time goes, and
the throughput of K trainers at once with the paper suite's estimated wall time."""

from __future__ import annotations

from typing import Any

from bench import engine


def table(results: dict[str, Any]) -> str:
    rows = [
        (
            "model",
            "pipeline x",
            "224 px x",
            "train img/s",
            "bare img/s",
            "engine x",
            "whole run x",
            "closing s",
            "tracking ms/epoch",
            "tracking %",
            "GFLOP/s",
            "util %",
        )
    ]
    for name, r in results.items():
        if name == "device":
            continue
        rows.append(
            (
                name,
                f"{r['pipeline_ratio']:.1f}",
                f"{r['pipeline_ratio_224']:.2f}" if "pipeline_ratio_224" in r else "-",
                f"{r['engine_images_per_s']:,.1f}",
                f"{r['bare_images_per_s']:,.1f}",
                f"{r['engine_ratio']:.3f}",
                f"{r['engine_ratio_whole_run']:.3f}",
                f"{r['closing_s']:.2f}",
                f"{r['tracking_ms_per_epoch']:.1f}",
                f"{100 * r['tracking_share']:.2f}",
                f"{r['achieved_flops_per_s'] / 1e9:,.1f}",
                f"{100 * r['flops_utilization']:.1f}",
            )
        )
    return _aligned(rows)


def _aligned(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def breakdown_table(results: dict[str, Any]) -> str:
    """Where a training step's time goes, in ms per step, the engine's beside the bare loop's
    (the epoch's evaluation, tracking and checkpoints spread over its steps)."""
    rows = [("ms per step (engine / bare)", *engine.Clock.PARTS, "total")]
    for name, r in results.items():
        if name == "device":
            continue
        engine_ms, bare_ms = r["step_ms"], r["bare_step_ms"]
        rows.append(
            (
                name,
                *(f"{engine_ms[p]:.2f} / {bare_ms[p]:.2f}" for p in engine.Clock.PARTS),
                f"{sum(engine_ms.values()):.1f} / {sum(bare_ms.values()):.1f}",
            )
        )
    return _aligned(rows)


def workers_table(results: dict[str, Any]) -> str:
    """`bench perf --workers`' table: each K's images/s per model and the paper suite's minutes."""
    measured, est = results["workers"], results["estimate"]
    models = list(next(iter(measured.values())))
    first = next(iter(measured))
    rows = [("K", *(f"{m} img/s" for m in models), "paper suite min")]
    for k, figures in measured.items():
        cells = [
            f"{figures[m]['images_per_s']:,.1f}"
            + (f" x{figures[m]['relative_to_smallest_k']:.2f}" if k != first else "")
            for m in models
        ]
        rows.append((k, *cells, "-" if est["minutes"][k] is None else f"{est['minutes'][k]:,.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    what = (
        "one seed of the paper suite"
        if est["complete"]
        else f"one seed of the paper suite's {', '.join(est['cells'])} (the models measured)"
    )
    if est["fastest_workers"] is None:
        lines.append(
            f"fastest: none estimated: every K measured is more than the {len(est['cells'])} cells (bench run starts one worker a cell)"
        )
    else:
        k = str(est["fastest_workers"])
        lines.append(f"fastest: K={k}, {what} in about {est['minutes'][k]:,.0f} min (estimate)")
    if any(m is None for m in est["minutes"].values()):
        lines.append(f"-: more workers than the {len(est['cells'])} cells; bench run would start one worker a cell")
    lines.append(
        f"img/s: all K trainers together, their images over the span of their timed epochs (x: against K={first}); "
        f"assumed: {est['assumption']}"
    )
    return "\n".join(lines)
