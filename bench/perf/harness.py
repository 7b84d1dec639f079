"""`bench perf`: what the suite's harness costs beside the model's own compute, per model.

For each model, on the current device, in one process:
- data pipeline: the suite's batched on-device augmentation against torchvision's per-sample PIL
  transforms (same augmentations) in a DataLoader on every core, at 32 px and, for the
  fine-tune, at 224 px;
- training: the engine with full MLflow tracking (a temporary SQLite store: params, per-epoch
  metrics, checkpoints) against a bare PyTorch loop over pre-made batches in memory, with the same
  model, optimizer, batch, memory format and autocast;
- tracking: the time spent in the MLflow callback and the CPU time of MLflow's system-metrics
  sampling thread, per epoch and as a share of the epoch;
- FLOP/s achieved in training against a matrix-multiply probe of the device.

The images are the embedded CIFAR subset (throughput does not depend on which images they are).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms as T

from bench import config, data, engine, hostmem
from bench.data import cifar
from bench.engine.callbacks import Callback
from bench.models import create_model

# CIFAR's official split sizes, for the FLOPs of a full paper run.
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000


@dataclass(frozen=True)
class Budget:
    """How much to measure: the full run by default, a quick look with --quick."""

    pipeline_images: int  # images per pipeline measurement
    train_images: int  # images per training epoch (at most the embedded subset's 1000)
    epochs: int  # epochs per training measurement
    repeats: int  # pairs of training measurements (bare loop, suite); the pair of median ratio counts


FULL = Budget(pipeline_images=8192, train_images=1000, epochs=3, repeats=5)
QUICK = Budget(pipeline_images=2048, train_images=512, epochs=2, repeats=1)


def models_and_experiments() -> dict[str, str]:
    """Model name -> the experiment that trains it (one reported run per model)."""
    return {config.load(e, profile="paper").model.name: e for e in config.list_experiments()}


# --- data pipeline -------------------------------------------------------------------------------


# Timed passes over the images per pipeline; the median counts (a pass of the suite's pipeline
# takes a tenth of a second on a CPU: one alone is at the mercy of a moment's load).
PIPELINE_PASSES = 3


def embedded_files(dataset: str, train_images: int) -> cifar.CifarFiles:
    """The embedded subset of `dataset` with its training images repeated to `train_images`:
    throughput does not depend on which images they are."""
    embedded = cifar.load_cifar(dataset, None)
    return cifar.CifarFiles(
        _tiled(embedded.train, train_images), embedded.test, embedded.classes, False, embedded.location, embedded.digest
    )


def _tiled(split: cifar.Split, n: int) -> cifar.Split:
    reps = -(-n // len(split))
    return cifar.Split(split.images.repeat(reps, 1, 1, 1)[:n], split.labels.repeat(reps)[:n])


def suite_pipeline_rate(split: cifar.Split, cfg_data, device: torch.device) -> float:
    """Images/s of the suite's training batches (augmented, normalized, on the device)."""
    on_device = cifar.Split(split.images.to(device), split.labels.to(device))
    gen = torch.Generator(device=device).manual_seed(0)
    mean = torch.tensor(cfg_data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg_data.std, device=device).view(1, 3, 1, 1)
    batches = data.Batches(
        on_device,
        batch_size=cfg_data.batch_size,
        mean=mean,
        std=std,
        image_size=cfg_data.image_size,
        augment=cfg_data.augment,
        padding=cfg_data.crop_padding,
        shuffle=True,
        gen=gen,
    )
    next(iter(batches))  # kernels and allocator warm
    seconds = []
    for _ in range(PIPELINE_PASSES):
        engine.synchronize(device)
        started = time.perf_counter()
        for _batch in batches:
            pass
        engine.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return batches.num_images / statistics.median(seconds)


class _PilImages(Dataset):
    def __init__(self, split: cifar.Split, transform: Callable) -> None:
        self.images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in split.images]
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def reference_transform(cfg_data) -> Callable:
    """torchvision's per-sample reference transforms for the recipe's augmentation."""
    if cfg_data.augment == "resized_crop_flip":
        crop = T.RandomResizedCrop(cfg_data.image_size)
    else:
        crop = T.RandomCrop(32, padding=cfg_data.crop_padding)
    return T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(cfg_data.mean, cfg_data.std)])


def reference_pipeline_rate(split: cifar.Split, cfg_data, device: torch.device) -> float:
    """Images/s of torchvision's PIL pipeline in a DataLoader with a worker per core, delivered
    to the device as the training loop would get them."""
    loader = DataLoader(
        _PilImages(split, reference_transform(cfg_data)),
        batch_size=cfg_data.batch_size,
        shuffle=True,
        num_workers=os.cpu_count() or 1,
        pin_memory=device.type == "cuda",
        persistent_workers=True,
    )
    for _ in loader:  # workers started and warm: the first epoch is not timed
        pass
    seconds = []
    for _ in range(PIPELINE_PASSES):
        started = time.perf_counter()
        for x, _ in loader:
            x.to(device, non_blocking=True)
        engine.synchronize(device)
        seconds.append(time.perf_counter() - started)
    del loader
    return len(split) / statistics.median(seconds)


# --- training -----------------------------------------------------------------------------------


TRACKING_THREADS = ("mlflow-writer", "SystemMetricsMonitor")  # delivery.Writer's, MLflow's sampler's


def _background_cpu() -> dict[int, float]:
    """CPU seconds so far of each of tracking's background threads (the ordered writer, MLflow's
    system-metrics sampler). Empty where psutil cannot read a process's threads."""
    import threading

    import psutil

    ids = {t.native_id for t in threading.enumerate() if t.name in TRACKING_THREADS}
    try:
        return {t.id: t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids}
    except (psutil.Error, NotImplementedError):
        return {}


class _Timed(Callback):
    """Forwards every hook to `inner` and adds up the seconds spent in it: in `seconds` during
    the epochs, in `closing` at the end of the run (the last epoch's checkpoint announced and
    uploaded, `on_fit_end`'s final flush).
    The epochs run from `first_epoch_start` (the start hooks returned) to `last_epoch_end` (the
    last epoch's hooks returned); `background_cpu_s` is what tracking's background threads spent
    of the CPU between the two."""

    def __init__(self, inner: Callback) -> None:
        self.inner, self.seconds, self.closing = inner, 0.0, 0.0
        self.first_epoch_start = self.last_epoch_end = 0.0
        self._cpu_start: dict[int, float] = {}
        self.epochs = 0
        self.background_cpu_s = 0.0

    def _time(self, hook: str, *args, **kwargs):
        started = time.perf_counter()
        try:
            return getattr(self.inner, hook)(*args, **kwargs)
        finally:
            if hook == "on_epoch_end":
                now = _background_cpu()
                self.background_cpu_s = sum(cpu - self._cpu_start.get(tid, 0.0) for tid, cpu in now.items())
            ended = time.perf_counter()
            if hook == "on_fit_start":
                self.epochs = kwargs["epochs"]
            if hook == "on_fit_end" or (hook == "on_checkpoint" and args[2] == self.epochs):
                self.closing += ended - started  # the last epoch's checkpoint: once a run, after its epochs
            elif hook != "on_fit_start":  # before the epochs: in the whole run's figure, not theirs
                self.seconds += ended - started
            if hook == "on_fit_start":
                self._cpu_start = _background_cpu()
                self.first_epoch_start = time.perf_counter()
            if hook == "on_epoch_end":
                self.last_epoch_end = ended

    def on_fit_start(self, **kwargs) -> None:
        self._time("on_fit_start", **kwargs)

    def on_epoch_end(self, epoch, metrics):
        return self._time("on_epoch_end", epoch, metrics)

    def on_train_steps(self, step, metrics) -> None:
        self._time("on_train_steps", step, metrics)

    def on_checkpoint(self, kind, path, epoch) -> None:
        self._time("on_checkpoint", kind, path, epoch)

    def on_fit_end(self, result) -> None:
        self._time("on_fit_end", result)


def perf_config(experiment: str, profile: str, budget: Budget) -> config.RunConfig:
    """The recipe under the profile, trained on every embedded image for `budget.epochs`, with no
    evaluation passes: what is timed is training and the harness around it."""
    sets = ["data.source=embedded", "data.val_size=0", "eval.remeasure_train_acc=false"]
    if "weights" in config.load(experiment, profile=profile).model.options:
        sets.append("model.weights=none")  # the same compute without fetching pretrained weights
    return config.load(experiment, profile=profile, sets=sets, epochs=budget.epochs)


@dataclass(frozen=True)
class SuiteTiming:
    images_per_s: float  # from the start of the first epoch to the end of the last
    whole_run_images_per_s: float  # the same images over the whole fit, its start and closing included
    tracking_s: float  # in MLflow hooks during the epochs, and the CPU time of tracking's background threads
    closing_s: float  # after the last epoch: the last checkpoint written and uploaded, the final flush
    closing_tracking_s: float  # the MLflow part of closing_s
    clock: engine.Clock | None  # where the epochs' time went, when a clock was given


def suite_training(
    cfg: config.RunConfig,
    files: cifar.CifarFiles,
    device: torch.device,
    workdir: Path,
    clock: engine.Clock | None = None,
) -> SuiteTiming:
    """engine.fit with MLflow tracking to a fresh SQLite store, timed (part by part by `clock`)."""
    from bench.tracking import MlflowRun, Tracker

    engine.seed_everything(cfg.seed, cfg.train.deterministic)
    bundle = data.build(cfg.data, seed=cfg.seed, device=device, files=files)
    model = create_model(cfg.model.name, num_classes=bundle.num_classes, **cfg.model.options).to(device)
    tracker = Tracker(f"sqlite:///{workdir / 'mlflow.db'}")
    # The artifacts (checkpoints) in the temporary directory too, not in ./mlruns.
    experiment_id = tracker.client.create_experiment(cfg.experiment, artifact_location=(workdir / "artifacts").as_uri())
    run_id = tracker.start_run(experiment_id, "perf", {})
    mlflow_run = MlflowRun(tracker, run_id, cfg)
    timed = _Timed(mlflow_run)
    engine.synchronize(device)
    started = time.perf_counter()
    result = engine.fit(
        model,
        bundle,
        cfg,
        checkpoint_dir=workdir / "checkpoints",
        callbacks=[timed],
        resume=False,
        evaluate_test=False,
        clock=clock,
    )
    tracker.end_run(run_id, "FINISHED")
    ended = time.perf_counter()
    assert result.status == "finished", result.status
    images = result.epochs_done * bundle.train.num_images
    return SuiteTiming(
        images / (timed.last_epoch_end - timed.first_epoch_start),
        images / (ended - started),
        timed.seconds + timed.background_cpu_s,
        ended - timed.last_epoch_end,
        timed.closing,
        clock,
    )


def _median_pair(pairs: list[tuple[float, SuiteTiming]]) -> tuple[float, SuiteTiming]:
    """The (bare images/s, suite timing) pair of median ratio (the upper of the middle two for an
    even count): the figures of one pair stay together."""
    return sorted(pairs, key=lambda pair: pair[1].images_per_s / pair[0])[len(pairs) // 2]


def _suite_in_tmp(
    cfg: config.RunConfig, files: cifar.CifarFiles, device: torch.device, clock: engine.Clock | None = None
) -> SuiteTiming:
    with tempfile.TemporaryDirectory() as tmp:
        return suite_training(cfg, files, device, Path(tmp), clock)


def bare_training(
    cfg: config.RunConfig, files: cifar.CifarFiles, device: torch.device, clock: engine.Clock | None = None
) -> float:
    """Images/s of a minimal loop: the same model, optimizer, memory format and autocast, and the
    same batches (drawn from the same on-device augmentation: work any loop training this recipe
    does, and measured against torchvision's on its own); no metrics, checkpoints or tracking.
    A `clock` is told where each step's time went."""
    engine.seed_everything(cfg.seed, cfg.train.deterministic)
    bundle = data.build(cfg.data, seed=cfg.seed, device=device, files=files)
    model = create_model(cfg.model.name, num_classes=bundle.num_classes, **cfg.model.options).to(device)
    step = engine.step_for(cfg.train, device)
    model.to(memory_format=step.memory_format).train()
    optimizer = engine.build_optimizer(model.parameters(), cfg.optim)
    lap = engine.laps(clock)
    engine.synchronize(device)
    started = time.perf_counter()
    if clock is not None:
        clock.start()
    for _ in range(cfg.train.epochs):
        for x, y in bundle.train:
            lap("data")
            optimizer.zero_grad(set_to_none=True)
            _, loss = step.forward(model, x, y)
            loss.backward()
            lap("forward and backward")
            optimizer.step()
            lap("optimizer")
        if clock is not None:
            clock.steps += len(bundle.train)
    engine.synchronize(device)
    return cfg.train.epochs * bundle.train.num_images / (time.perf_counter() - started)


def _step_ms(clock: engine.Clock) -> dict[str, float]:
    """Milliseconds per training step of each part of a step's time (the run's closing is not a
    step's: it is in `closing_s`)."""
    return {part: 1000 * clock.seconds[part] / clock.steps for part in engine.Clock.PARTS}


# --- FLOPs ------------------------------------------------------------------------------------------


def step_flops(
    cfg: config.RunConfig, device: torch.device, image_size: int | None = None, batch: int = 2
) -> tuple[float, float]:
    """(training FLOPs, forward-only FLOPs) per image of the model at its image size."""
    size = image_size or cfg.data.image_size
    # FLOPs do not depend on the weights: no pretrained ones to fetch.
    options = {**cfg.model.options, **({"weights": "none"} if "weights" in cfg.model.options else {})}
    model = create_model(cfg.model.name, num_classes=cifar.NUM_CLASSES[cfg.data.dataset], **options).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    model.train()
    with FlopCounterMode(display=False) as train:
        F.cross_entropy(model(x), y).backward()
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        model(x)
    return train.get_total_flops() / batch, forward.get_total_flops() / batch


def matmul_probe(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix multiply: what the device can do at best, in practice."""
    n = 4096 if device.type != "cpu" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        engine.synchronize(device)
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        engine.synchronize(device)
        best = min(best, (time.perf_counter() - started) / 4)
    return 2 * n**3 / best


def run_flops(
    cfg: config.RunConfig,
    device: torch.device,
    train_total: int = CIFAR_TRAIN,
    test_total: int = CIFAR_TEST,
    alternatives: Sequence[tuple[str, config.EvalConfig]] = (),
) -> float:
    """FLOPs of one run (one seed) of a config whose dataset holds `train_total` training and
    `test_total` test images: every epoch's training steps and evaluation passes, the passes of
    its evaluation-only alternatives (`engine.fit`'s) included. Counted on the "meta" device
    when `device` is: shapes only, no arithmetic."""
    train_per_image, forward_per_image = step_flops(cfg, device)
    train_images = train_total - cfg.data.val_size
    images = {"train": train_images, "val": cfg.data.val_size, "test": test_total}
    passes = engine.evaluation_passes(engine.evaluation_plan(cfg.eval, alternatives), ["val", "test"])
    eval_images = sum(images[split] for split, _ in passes)
    return cfg.train.epochs * (train_images * train_per_image + eval_images * forward_per_image)


def paper_flops(experiment: str, device: torch.device) -> float:
    """FLOPs of one seed of the reported run: training steps plus its evaluation passes."""
    from bench import ablation

    cfg = config.load(experiment, profile="paper")
    return run_flops(cfg, device, alternatives=ablation.alternatives(experiment, cfg))


# --- the whole measurement ------------------------------------------------------------------------


def measure_model(
    model_name: str,
    experiment: str,
    *,
    profile: str,
    device: torch.device,
    budget: Budget,
    probe_flops: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    cfg = perf_config(experiment, profile, budget)
    files = embedded_files(cfg.data.dataset, budget.train_images)
    embedded = cifar.load_cifar(cfg.data.dataset, None)
    out: dict[str, Any] = {
        "experiment": experiment,
        "batch_size": cfg.data.batch_size,
        "image_size": cfg.data.image_size,
    }

    images = _tiled(embedded.train, budget.pipeline_images)
    # Every model gets the 32-px crop-and-flip path; the fine-tune also its own 224-px path.
    pipelines = {"": cfg.data.model_copy(update={"augment": "crop_flip", "image_size": 32})}
    if cfg.data.augment == "resized_crop_flip":
        pipelines["_224"] = cfg.data.model_copy(update={"image_size": 224})
    for suffix, cfg_data in pipelines.items():
        suite_rate = suite_pipeline_rate(images, cfg_data, device)
        reference_rate = reference_pipeline_rate(images, cfg_data, device)
        out.update(
            {
                f"pipeline_images_per_s{suffix}": suite_rate,
                f"pipeline_reference_images_per_s{suffix}": reference_rate,
                f"pipeline_ratio{suffix}": suite_rate / reference_rate,
            }
        )
        say(
            f"{model_name}: data pipeline at {cfg_data.image_size} px {suite_rate:,.0f} images/s against "
            f"torchvision's {reference_rate:,.0f} (x{suite_rate / reference_rate:.1f})"
        )

    bare_training(cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})}), files, device)  # warm
    # On the CPU a part's work is done when its call returns: the timed runs carry the clocks. An
    # accelerator would have to wait at every lap, so its breakdown comes from runs of its own.
    laps_ride_along = device.type == "cpu"
    pairs: list[tuple[float, SuiteTiming]] = []
    bare_clocks: list[engine.Clock | None] = []
    for i in range(budget.repeats):
        # A pair: the bare loop and the suite back to back, taking turns going first. The
        # machine's speed drifts (a neighbour's load, a warming cache) over minutes, more than
        # the harness costs; both runs of a pair see nearly the same machine, so the ratio is
        # taken within each pair, and the pair of median ratio counts.
        bare_clock, suite_clock = (engine.Clock(), engine.Clock()) if laps_ride_along else (None, None)
        if i % 2 == 0:
            bare = bare_training(cfg, files, device, bare_clock)
            pairs.append((bare, _suite_in_tmp(cfg, files, device, suite_clock)))
        else:
            suite = _suite_in_tmp(cfg, files, device, suite_clock)
            pairs.append((bare_training(cfg, files, device, bare_clock), suite))
        bare_clocks.append(bare_clock)
    bare_rate, suite = _median_pair(pairs)
    if laps_ride_along:
        bare_clock, suite_clock = bare_clocks[pairs.index((bare_rate, suite))], suite.clock
    else:
        bare_clock, suite_clock = engine.Clock(device), engine.Clock(device)
        bare_training(cfg, files, device, bare_clock)
        _suite_in_tmp(cfg, files, device, suite_clock)
    suite_rate = suite.images_per_s
    epoch_s = files.train.labels.numel() / suite_rate
    tracking_epoch_s = suite.tracking_s / cfg.train.epochs
    train_flops, _ = step_flops(cfg, device)
    out.update(
        {
            "engine_images_per_s": suite_rate,
            "bare_images_per_s": bare_rate,
            "engine_ratio": suite_rate / bare_rate,
            "engine_images_per_s_runs": [t.images_per_s for _, t in pairs],
            "bare_images_per_s_runs": [b for b, _ in pairs],
            "engine_ratio_whole_run": suite.whole_run_images_per_s / bare_rate,
            "closing_s": suite.closing_s,
            "closing_tracking_s": suite.closing_tracking_s,
            "epoch_s": epoch_s,
            "tracking_ms_per_epoch": 1000 * tracking_epoch_s,
            "tracking_share": tracking_epoch_s / epoch_s,
            "train_flops_per_image": train_flops,
            "achieved_flops_per_s": train_flops * suite_rate,
            "flops_utilization": train_flops * suite_rate / probe_flops,
            "paper_flops_per_seed": paper_flops(experiment, device),
            "step_ms": _step_ms(suite_clock),
            "bare_step_ms": _step_ms(bare_clock),
        }
    )
    say(
        f"{model_name}: training {suite_rate:,.1f} images/s against a bare loop's {bare_rate:,.1f} "
        f"(x{suite_rate / bare_rate:.3f}), tracking {1000 * tracking_epoch_s:.1f} ms per epoch; "
        f"closing the run {suite.closing_s:.2f} s"
    )
    return out


def run(
    models: list[str], *, profile: str, device: torch.device, quick: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    budget = QUICK if quick else FULL
    allocator = hostmem.keep_freed_memory()  # as the command line sets it for every run
    experiments = models_and_experiments()
    dtype = (
        engine.autocast_dtype(device, config.load(experiments[models[0]], profile=profile).train.amp) or torch.float32
    )
    probe = matmul_probe(device, dtype)
    say(
        f"{engine.device_name(device)}: matrix multiply {probe / 1e9:,.1f} GFLOP/s ({str(dtype).removeprefix('torch.')})"
    )
    results: dict[str, Any] = {
        "device": {
            "name": engine.device_name(device),
            "type": device.type,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "matmul_flops_per_s": probe,
            "matmul_dtype": str(dtype).removeprefix("torch."),
            "host_allocator": allocator,
            "profile": profile,
            "quick": quick,
        },
    }
    for name in models:
        results[name] = measure_model(
            name, experiments[name], profile=profile, device=device, budget=budget, probe_flops=probe, say=say
        )
    # Probed again at the end: a slow spell of the machine during the first, short probe would
    # overstate every utilization. The faster of the two counts.
    again = matmul_probe(device, dtype)
    if again > probe:
        say(f"{engine.device_name(device)}: matrix multiply probed again: {again / 1e9:,.1f} GFLOP/s")
        results["device"]["matmul_flops_per_s"] = again
        for name in models:
            results[name]["flops_utilization"] = results[name]["achieved_flops_per_s"] / again
    return results


def table(results: dict[str, Any]) -> str:
    rows = [
        (
            "model",
            "pipeline x",
            "224 px x",
            "train img/s",
            "bare img/s",
            "engine x",
            "whole run x",
            "closing s",
            "tracking ms/epoch",
            "tracking %",
            "GFLOP/s",
            "util %",
        )
    ]
    for name, r in results.items():
        if name == "device":
            continue
        rows.append(
            (
                name,
                f"{r['pipeline_ratio']:.1f}",
                f"{r['pipeline_ratio_224']:.2f}" if "pipeline_ratio_224" in r else "-",
                f"{r['engine_images_per_s']:,.1f}",
                f"{r['bare_images_per_s']:,.1f}",
                f"{r['engine_ratio']:.3f}",
                f"{r['engine_ratio_whole_run']:.3f}",
                f"{r['closing_s']:.2f}",
                f"{r['tracking_ms_per_epoch']:.1f}",
                f"{100 * r['tracking_share']:.2f}",
                f"{r['achieved_flops_per_s'] / 1e9:,.1f}",
                f"{100 * r['flops_utilization']:.1f}",
            )
        )
    return _aligned(rows)


def _aligned(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def breakdown_table(results: dict[str, Any]) -> str:
    """Where a training step's time goes, in ms per step, the engine's beside the bare loop's
    (the epoch's evaluation, tracking and checkpoints spread over its steps)."""
    rows = [("ms per step (engine / bare)", *engine.Clock.PARTS, "total")]
    for name, r in results.items():
        if name == "device":
            continue
        engine_ms, bare_ms = r["step_ms"], r["bare_step_ms"]
        rows.append(
            (
                name,
                *(f"{engine_ms[p]:.2f} / {bare_ms[p]:.2f}" for p in engine.Clock.PARTS),
                f"{sum(engine_ms.values()):.1f} / {sum(bare_ms.values()):.1f}",
            )
        )
    return _aligned(rows)
