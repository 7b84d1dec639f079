"""bench.perf: `bench perf`, what the harness costs beside the model's own compute (`harness`,
`pipeline`, `training`), and K trainers at once on one device (`workers`). FLOPs are counted by
`bench.models.cost`, whose counts are named here too."""

from bench.models.cost import CIFAR_TEST, CIFAR_TRAIN, run_flops, step_flops  # noqa: F401
from bench.perf import harness, pipeline, tables, training, workers  # noqa: F401
from bench.perf.command import main  # noqa: F401
from bench.perf.harness import (  # noqa: F401
    FULL,
    QUICK,
    Budget,
    matmul_probe,
    measure_model,
    models_and_experiments,
    paper_flops,
    run,
)
from bench.perf.pipeline import (  # noqa: F401
    PIPELINE_PASSES,
    embedded_files,
    reference_pipeline_rate,
    reference_transform,
    suite_pipeline_rate,
)
from bench.perf.tables import breakdown_table, table, workers_table  # noqa: F401
from bench.perf.training import (  # noqa: F401
    TRACKING_THREADS,
    SuiteTiming,
    bare_training,
    perf_config,
    suite_training,
)
