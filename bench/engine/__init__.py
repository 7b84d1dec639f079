"""bench.engine: train a model on a data bundle and evaluate it, epoch by epoch, with checkpoint
resume. It knows nothing of MLflow, Optuna or the command line: it reports through callbacks
(`engine.callbacks`), and a stop is a returned status (`engine.stops`).

loop: fit (the epoch loop, resume, checkpoint cadence); evaluation: modes and alternative
evaluations on random streams of their own; step: device, seeding, AMP, memory format,
optimizer, schedule, an epoch of steps; clock: where the time goes; checkpoint: writing and
reading them.
"""

from bench.engine import callbacks, checkpoint, clock, evaluation, loop, step, stops  # noqa: F401
from bench.engine.clock import Clock, laps, synchronize  # noqa: F401
from bench.engine.evaluation import evaluate, evaluation_passes, evaluation_plan  # noqa: F401
from bench.engine.loop import BEST, LAST, FitResult, fit  # noqa: F401
from bench.engine.step import (  # noqa: F401
    Step,
    autocast_dtype,
    build_optimizer,
    build_scheduler,
    compile_and_warm_up,
    device_name,
    peak_memory_mb,
    reset_peak_memory,
    resolve_device,
    seed_everything,
    step_for,
    train_one_epoch,
)
