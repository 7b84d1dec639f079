"""bench.suite: which cells (planning), who trains each (claims, dispatch, workers), how (cell,
through bench.job), the tables that show them, and `bench run` (command)."""

from bench.suite import cell, claims, command, dispatch, planning, tables, workers  # noqa: F401
from bench.suite.cell import JOURNAL, CellOutcome, attempt, create_experiments, run_cell  # noqa: F401
from bench.suite.dispatch import NOT_RUN, UNREACHABLE, WAIT_S, Dispatch, run_cells  # noqa: F401
from bench.suite.planning import (  # noqa: F401
    ABLATION_TAG,
    Cell,
    data_root,
    files_for,
    parse_shard,
    plan,
    preflight,
    shard,
)
from bench.suite.tables import ablation_table, dry_run_table, summary_table  # noqa: F401
