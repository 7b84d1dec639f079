"""bench.perf."""

from bench.perf import harness, workers  # noqa: F401
from bench.perf.harness import (  # noqa: F401
    CIFAR_TEST,
    CIFAR_TRAIN,
    FULL,
    PIPELINE_PASSES,
    QUICK,
    TRACKING_THREADS,
    Budget,
    SuiteTiming,
    bare_training,
    breakdown_table,
    embedded_files,
    matmul_probe,
    measure_model,
    models_and_experiments,
    paper_flops,
    perf_config,
    reference_pipeline_rate,
    reference_transform,
    run,
    run_flops,
    step_flops,
    suite_pipeline_rate,
    suite_training,
    table,
)
