"""bench.suite."""

from bench.suite import cell, claims, workers  # noqa: F401
from bench.suite.cell import Cell, ABLATION_TAG, CellOutcome, plan, shard, parse_shard, data_root, files_for, preflight, run_cell, STOP_WAIT_S, WAIT_S, JOURNAL, UNREACHABLE, NOT_RUN, run_cells, create_experiments, attempt, Dispatch, summary_table, dry_run_table, ablation_table  # noqa: F401
