"""The names bench writes into MLflow (and Optuna): every metric and every tag, with what it means.

A catalogue, not a mechanism: plain data, no imports from bench. `scripts/reference_docs.py` makes
the reference pages of the manual from it, and `tests/test_docs.py` runs a real cell and checks
that every metric and `bench.*` tag it logs is here, and every metric a plain cell logs is one.
"""

from __future__ import annotations

# Metric name -> (unit or kind, what its step is, description). Accuracies are fractions in [0, 1];
# `/<suffix>` names are an evaluation-only ablation measured again on the run's own weights.
METRICS: dict[str, tuple[str, str, str]] = {
    "train_loss": (
        "cross-entropy",
        "epoch",
        "mean training loss of the epoch's batches",
    ),
    "train_acc": (
        "fraction",
        "epoch",
        (
            "training accuracy: the running accuracy of the epoch's batches, or, with "
            "`eval.remeasure_train_acc = true` (R1), re-measured over the augmented train set after the epoch"
        ),
    ),
    "val_loss": ("cross-entropy", "epoch", "loss on the validation split"),
    "val_acc": (
        "fraction",
        "epoch",
        "accuracy on the validation split; chooses the best checkpoint and is the tuning objective",
    ),
    "test_loss": ("cross-entropy", "epoch", "loss on the test set"),
    "test_acc": (
        "fraction",
        "epoch",
        "accuracy on the test set, logged every epoch as the reported curves show it",
    ),
    "lr": ("learning rate", "epoch", "the learning rate the epoch trained with"),
    "train_time_s": ("seconds", "epoch", "the epoch's training pass"),
    "epoch_time_s": (
        "seconds",
        "epoch",
        "training and the run's own evaluation of the epoch",
    ),
    "images_per_s": ("images/s", "epoch", "training images over `train_time_s`"),
    "peak_memory_mb": (
        "MiB",
        "epoch",
        (
            "peak memory of training so far: on CUDA the allocator's peak since the fit started, "
            "elsewhere the process's peak resident set"
        ),
    ),
    "best_val_acc": (
        "fraction",
        "best epoch (a study's parent run: trial number)",
        (
            "the best validation accuracy, logged once at the end at the best epoch; on a study's parent run, "
            "the study's best value after each finished trial"
        ),
    ),
    "best_test_acc": (
        "fraction",
        "best epoch",
        "test accuracy at the epoch with the best validation accuracy",
    ),
    "compile_time_s": (
        "seconds",
        "first epoch trained",
        "`torch.compile` of every batch shape, before the first epoch and outside its timing",
    ),
    "train_step_loss": (
        "cross-entropy",
        "global optimizer step",
        "mean loss of every N steps, with `train.log_every_steps = N`",
    ),
    "alternatives_time_s": (
        "seconds",
        "epoch",
        "time of the extra evaluation passes of the evaluation-only ablations, kept out of `epoch_time_s`",
    ),
    "test_acc/eval.mode-eval": (
        "fraction",
        "epoch",
        "test accuracy measured again in eval mode (BatchNorm running statistics, dropout off)",
    ),
    "test_loss/eval.mode-eval": (
        "cross-entropy",
        "epoch",
        "test loss measured again in eval mode",
    ),
    "val_acc/eval.mode-eval": (
        "fraction",
        "epoch",
        "validation accuracy measured again in eval mode",
    ),
    "val_loss/eval.mode-eval": (
        "cross-entropy",
        "epoch",
        "validation loss measured again in eval mode",
    ),
    "train_acc/eval.remeasure_train_acc-false": (
        "fraction",
        "epoch",
        "the running accuracy of the epoch's training batches, beside R1's re-measured `train_acc`",
    ),
    "finished_trials": (
        "count",
        "trial number",
        "a study's finished (complete or pruned) trials, on its parent run",
    ),
    "system/*": (
        "various",
        "sample",
        (
            "MLflow's system metrics (CPU, memory, disk, network, each NVIDIA GPU's utilization, memory and power), "
            "every `train.system_metrics_interval_s` seconds while the run trains"
        ),
    ),
}

# The metrics a plain smoke cell of resnetb-cifar10 does not log, and where they come from. Every
# other metric above is logged by every such cell (`tests/test_docs.py` checks both ways).
ONLY_IN: dict[str, str] = {
    "compile_time_s": "runs with `train.compile = true`",
    "train_step_loss": "runs with `train.log_every_steps = N` (N > 0)",
    "alternatives_time_s": "experiments with evaluation-only ablations (hw4-resnet-cifar100)",
    "test_acc/eval.mode-eval": "hw4-resnet-cifar100 (the `eval-mode` ablation), runs in train-mode evaluation",
    "test_loss/eval.mode-eval": "hw4-resnet-cifar100 (the `eval-mode` ablation), runs in train-mode evaluation",
    "val_acc/eval.mode-eval": "hw4-resnet-cifar100 with a validation split, runs in train-mode evaluation",
    "val_loss/eval.mode-eval": "hw4-resnet-cifar100 with a validation split, runs in train-mode evaluation",
    "train_acc/eval.remeasure_train_acc-false": "hw4-resnet-cifar100 (the `running-train-acc` ablation), runs that re-measure",
    "finished_trials": "a study's parent run (`bench tune`)",
}

# Where a tag is set: a cell's run, a tuning trial's run, a study's parent run, a lease run (the
# experiment `bench-leases`), an MLflow experiment, or a registered model version.
CELL, TRIAL, STUDY, LEASE, EXPERIMENT, VERSION = (
    "cell run",
    "trial run",
    "study run",
    "lease run",
    "experiment",
    "model version",
)

# Tag name -> description.
TAGS: dict[str, str] = {
    "bench.experiment": "the bench experiment (a cell's identity, with profile, seed and config hash)",
    "bench.profile": "the profile the cell ran under (`paper`, `smoke`, ...)",
    "bench.seed": "the run's seed (0, 1, 2, ...); on a model version, the chosen run's",
    "bench.config_hash": "hash of the config keys that change what is learned, seed excluded: the seeds of one config share it",
    "bench.config_hash_before": "the hash an earlier bench gave a carried-over finished run",
    "bench.ablation": "the variant a `bench run --ablate` cell trains (`recipe`, `post-add-relu`, ...)",
    "bench.resumed_with": "the non-result settings a resumed cell changed (its params keep the values it started with)",
    "bench.git_commit": "the commit of bench's checkout (also `mlflow.source.git.commit`)",
    "bench.git_dirty": "`true` when the checkout had uncommitted changes, `unknown` when git could not say",
    "bench.python": "Python version",
    "bench.torch": "torch version",
    "bench.torchvision": "torchvision version",
    "bench.numpy": "numpy version",
    "bench.mlflow": "MLflow version",
    "bench.optuna": "Optuna version",
    "bench.cuda": "the CUDA version torch was built with, or `none`",
    "bench.cudnn": "the cuDNN version, or `none`",
    "bench.device": "the device trained on (`cpu (N cores)` or the GPU's name)",
    "bench.threads": "torch's CPU threads: a CPU run's numbers depend on them",
    "bench.data_source": "where the images came from (the data folder, or the embedded subset)",
    "bench.data_complete": "`true` when the data is the complete official dataset",
    "bench.data_train": "training images",
    "bench.data_val": "validation images (0 without a validation split)",
    "bench.data_test": "test images",
    "bench.status": "how the fit ended: `finished`, `stopped`, `nonfinite`, `failed` or `interrupted`",
    "bench.epochs_done": "epochs trained",
    "bench.best_epoch": "the epoch with the best validation accuracy (absent without a validation split)",
    "bench.best_split": "the split that chose the best epoch (`val`)",
    "bench.failure": (
        "why a run or trial failed: `out_of_memory`, `error`, `nonfinite_loss`, `interrupted` (trials), "
        "`tracking_unavailable` or `storage_unavailable` (trials)"
    ),
    "bench.failure_reason": "the exception's type and message",
    "bench.failure_epoch": "the epoch whose training loss was NaN or Inf",
    "bench.interrupted_by": "`SIGINT` or `SIGTERM`: the signal that stopped the run",
    "bench.model_error": "why a finished run's model could not be logged (`bench register` logs it later)",
    "bench.kind": "`trial`, `study` (a study's parent run) or `lease`",
    "bench.tuned_profile": "the profile a study tunes",
    "bench.lease.cell": "the cell a lease run claims",
    "bench.lease.owner": "the process holding the claim (host:pid)",
    "bench.lease.number": "the claim's number in the bakery algorithm: the smallest (number, run id) holds the cell",
    "bench.lease.choosing": "`1` while the claim is being made",
    "bench.lease.heartbeat": "the holder's last heartbeat (seconds since the epoch), every 30 s",
    "bench.lease.outage_limit": "the holder's outage limit: how long it may go on without the store",
    "bench.note_sha256": "digest of the description bench wrote, so one edited in the UI is kept",
    "bench.chosen_on": "the metric the registered seed was chosen on (`best_val_acc`, else `test_acc`)",
    "mlflow.note.content": "the description: the experiment file's title and `[about]` (a cell adds profile, seed, config hash)",
    "mlflow.source.git.commit": "the commit of bench's checkout",
    "mlflow.parentRunId": "a trial run's study parent run",
    "optuna.study": "the study's name",
    "optuna.trial": "the trial's number",
    "optuna.state": "the trial's end: `COMPLETE`, `PRUNED` or `FAIL`",
    "optuna.storage": "the study's storage URL, password hidden",
    "optuna.best_trial": "the study's best trial so far",
    "best.<key>": "the best trial's value of each searched config key",
}

# Where each tag is set (every key of TAGS, and only those).
TAG_PLACES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("bench.experiment", "bench.profile", "bench.config_hash"), (CELL,)),
    "bench.seed": (CELL, VERSION),
    "bench.config_hash_before": (CELL,),
    "bench.ablation": (CELL,),
    "bench.resumed_with": (CELL,),
    **dict.fromkeys(
        (
            "bench.git_commit",
            "bench.git_dirty",
            "bench.python",
            "bench.torch",
            "bench.torchvision",
            "bench.numpy",
            "bench.mlflow",
            "bench.optuna",
            "bench.cuda",
            "bench.cudnn",
            "bench.device",
            "bench.threads",
            "bench.data_source",
        ),
        (CELL, TRIAL),
    ),
    **dict.fromkeys(
        (
            "bench.data_complete",
            "bench.data_train",
            "bench.data_val",
            "bench.data_test",
        ),
        (CELL,),
    ),
    **dict.fromkeys(
        ("bench.status", "bench.epochs_done", "bench.best_epoch", "bench.best_split"),
        (CELL, TRIAL),
    ),
    **dict.fromkeys(("bench.failure", "bench.failure_reason", "bench.interrupted_by"), (CELL, TRIAL)),
    "bench.failure_epoch": (CELL, TRIAL),
    "bench.model_error": (CELL,),
    "bench.kind": (TRIAL, STUDY, LEASE),
    "bench.tuned_profile": (STUDY,),
    **dict.fromkeys(
        (
            "bench.lease.cell",
            "bench.lease.owner",
            "bench.lease.number",
            "bench.lease.choosing",
            "bench.lease.heartbeat",
            "bench.lease.outage_limit",
        ),
        (LEASE,),
    ),
    "bench.note_sha256": (EXPERIMENT,),
    "bench.chosen_on": (VERSION,),
    "mlflow.note.content": (EXPERIMENT, CELL, TRIAL),
    "mlflow.source.git.commit": (CELL, TRIAL),
    "mlflow.parentRunId": (TRIAL,),
    "optuna.study": (TRIAL, STUDY),
    "optuna.trial": (TRIAL,),
    "optuna.state": (TRIAL,),
    "optuna.storage": (STUDY,),
    "optuna.best_trial": (STUDY,),
    "best.<key>": (STUDY,),
}

# Optuna user attributes bench sets on a study or a trial (optuna-dashboard shows them).
OPTUNA_ATTRS: dict[str, tuple[str, str]] = {
    "bench.experiment": ("study", "the experiment tuned"),
    "bench.profile": ("study", "the profile tuned"),
    "bench.base_config_hash": (
        "study",
        "the config hash of the config the study starts from (an ablation's, with `--set`)",
    ),
    "bench.recipe_enqueued": (
        "study",
        "the recipe's values were queued as the first trial",
    ),
    "mlflow_run_id": (
        "study, trial",
        "the MLflow run: the study's parent run, or the trial's run",
    ),
    "mlflow_run_url": ("study, trial", "where the MLflow UI shows that run"),
    "bench.recipe": ("trial", "the trial trains the recipe's own values"),
    "bench.retry_of": (
        "trial",
        "the number of the failed or interrupted trial it runs again, with the same values",
    ),
    "bench.failure": (
        "trial",
        "as the run tag; also `repeat` (values another trial holds)",
    ),
    "bench.failure_reason": ("trial", "as the run tag"),
    "bench.interrupted_by": ("trial", "as the run tag"),
    "bench.surplus": (
        "trial",
        "asked for after the study's last slot was taken: ended before it trained",
    ),
    "data.val_size": ("trial", "the validation split the objective was measured on"),
}
