"""bench.engine."""

from bench.engine import callbacks, checkpoint, loop, stops  # noqa: F401
from bench.engine.loop import LAST, BEST, FitResult, resolve_device, device_name, seed_everything, build_optimizer, build_scheduler, Step, autocast_dtype, step_for, synchronize, reset_peak_memory, peak_memory_mb, Clock, laps, train_one_epoch, evaluate, evaluation_plan, evaluation_passes, compile_and_warm_up, fit  # noqa: F401
