"""bench.suite."""

from bench.suite import cell, claims, workers  # noqa: F401
from bench.suite.cell import (  # noqa: F401
    ABLATION_TAG,
    JOURNAL,
    NOT_RUN,
    STOP_WAIT_S,
    UNREACHABLE,
    WAIT_S,
    Cell,
    CellOutcome,
    Dispatch,
    ablation_table,
    attempt,
    create_experiments,
    data_root,
    dry_run_table,
    files_for,
    parse_shard,
    plan,
    preflight,
    run_cell,
    run_cells,
    shard,
    summary_table,
)
