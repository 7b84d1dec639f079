"""bench.tuning."""

from bench.tuning import database, sampling, study  # noqa: F401
from bench.tuning.study import FINISHED, OBJECTIVE, Param, search_space, recipe_values, as_sets, tuning_val_size, storage, pruner, open_study, finished, Pruning, TrialContext, objective, STORAGE, STOP_WAIT_S, note_run, ParentRun, Surplus, Repeat, TrialFailed, MAX_FAILURES_IN_A_ROW, optimize, best_command, trial_line, print_trial  # noqa: F401
