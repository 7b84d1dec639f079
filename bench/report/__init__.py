"""DataFrames -> the report: which runs answer each reported run, the summary, markdown.

`bench report` reads MLflow through `results.load`; everything here works on the frames it
returns, so the same runs always give the same bytes (sorted rows, fixed number formats, no
clock, no paths of the machine that wrote it).
"""

from __future__ import annotations

from pathlib import Path

from bench.report.markdown import markdown, pct, summary_table, table
from bench.report.summary import (
    BOTTLENECK_PAIR,
    Recipe,
    Row,
    Summary,
    choose_profile,
    differing,
    recipe,
    select,
    summarize,
    variant_label,
)
from bench.results import Studies

__all__ = [
    "BOTTLENECK_PAIR",
    "Recipe",
    "Row",
    "Summary",
    "choose_profile",
    "differing",
    "markdown",
    "pct",
    "recipe",
    "select",
    "summarize",
    "summary_table",
    "table",
    "variant_label",
    "write",
]


def write(summary: Summary, out_dir: Path, studies: Studies | None = None) -> Path:
    """Write README.md, the figures and the CSV files behind them into `out_dir`; image links
    are relative to the markdown. `studies` (from `results.load_studies`) adds the tuning section."""
    from bench.report import ablations, exports, figures

    out_dir.mkdir(parents=True, exist_ok=True)
    found = ablations.tables(summary, studies)
    shown = [t for t in found if t.shown]
    written = figures.draw_all(summary, out_dir, shown)
    data = exports.write(summary, out_dir, studies, shown)
    tuning = ""
    if studies is not None and studies.handles:
        from bench.report import studies as study_section  # imports optuna: only when there are studies

        tuning = study_section.markdown(studies, study_section.draw(studies, out_dir), ablations.study_links(found))
    section = ablations.markdown(
        shown, {t.experiment: written[f"ablation-{t.experiment}"] for t in shown if t.error is None}
    )
    path = out_dir / "README.md"
    path.write_text(markdown(summary, written, tuning, data, section), encoding="utf-8")
    return path
