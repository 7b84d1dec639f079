"""bench.perf."""

from bench.perf import harness, workers  # noqa: F401
from bench.perf.harness import CIFAR_TRAIN, CIFAR_TEST, Budget, FULL, QUICK, models_and_experiments, PIPELINE_PASSES, embedded_files, suite_pipeline_rate, reference_transform, reference_pipeline_rate, TRACKING_THREADS, perf_config, SuiteTiming, suite_training, bare_training, step_flops, matmul_probe, run_flops, paper_flops, measure_model, run, table, breakdown_table  # noqa: F401
