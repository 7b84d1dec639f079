"""bench.engine."""

from bench.engine import callbacks, checkpoint, loop, stops  # noqa: F401
from bench.engine.loop import (  # noqa: F401
    BEST,
    LAST,
    Clock,
    FitResult,
    Step,
    autocast_dtype,
    build_optimizer,
    build_scheduler,
    compile_and_warm_up,
    device_name,
    evaluate,
    evaluation_passes,
    evaluation_plan,
    fit,
    laps,
    peak_memory_mb,
    reset_peak_memory,
    resolve_device,
    seed_everything,
    step_for,
    synchronize,
    train_one_epoch,
)
