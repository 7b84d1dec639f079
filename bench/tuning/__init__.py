"""bench.tuning: the search space (space), the study and its parent run (study), one trial through
bench.job (trial), a worker's trial loop (loop), `bench tune` (command); the sampler (sampling) and
the storage's database (database)."""

from bench.tuning import command, database, loop, sampling, space, study, trial  # noqa: F401
from bench.tuning.loop import MAX_FAILURES_IN_A_ROW, optimize  # noqa: F401
from bench.tuning.space import Param, as_sets, recipe_values, search_space, tuning_val_size  # noqa: F401
from bench.tuning.study import (  # noqa: F401
    FINISHED,
    OBJECTIVE,
    STORAGE,
    ParentRun,
    best_command,
    finished,
    note_run,
    open_study,
    print_trial,
    pruner,
    storage,
    trial_line,
)
from bench.tuning.trial import Pruning, Repeat, Surplus, TrialContext, TrialFailed, objective  # noqa: F401
