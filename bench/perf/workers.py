"""`bench perf --workers K [K ...]`: the throughput of K trainers sharing one device, and the K
that trains one seed of the paper suite fastest.

For each K, K processes (spawned: CUDA cannot be forked) train each model in turn, all on the same
device (cuda: cuda:0), each with its share of the CPU threads, as `bench run --workers K` runs
cells: the suite's engine with MLflow tracking to a temporary SQLite store of the process's own,
the recipe under the profile (`perf.perf_config`) on the embedded images. A model's first epoch
warms up (kernels, allocator, the store's first writes); then the trainers wait for one another
and time the remaining epochs together, and wait again before the next model, so that no trainer's
set-up falls into another's timed epochs.

The estimate: each cell of `bench run --suite all --profile paper --seeds 1` takes its FLOPs
(`perf.paper_flops`) at the FLOP/s one of K trainers of its model achieved (train FLOPs per image
at the measured profile times the images/s per trainer); the cells go in suite order to the first
free of K workers, as the suite's dispatcher hands them out; the last to finish sets the wall time.
"""

from __future__ import annotations

import heapq
import os
import queue
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench import config, engine, process
from bench.engine.callbacks import Callback
from bench.models import cost
from bench.perf.harness import models_and_experiments, paper_flops
from bench.perf.pipeline import embedded_files
from bench.perf.training import perf_config, perf_job
from bench.workers import SPAWN, Pool, thread_share

PAPER_SUITE = "all"
ASSUMPTION = (
    "each cell at the FLOP/s measured with K copies of its own model at once, under --profile {profile}'s "
    "batch and image sizes (--profile paper for the paper suite's own), evaluation passes at the training "
    "FLOP/s; cells in suite order to the first free worker; on a GPU the last cells, running with fewer "
    "beside them, go faster than assumed: an upper bound there"
)


@dataclass(frozen=True)
class Budget:
    """What each trainer trains per model. Read by `perf.perf_config` as perf's budget is."""

    train_images: int  # images per epoch (tiled from the embedded subset)
    epochs: int  # the first warms up, the others are timed


CPU_FULL, CPU_QUICK = Budget(train_images=512, epochs=4), Budget(train_images=256, epochs=3)
# A GPU trains these networks tens of times faster than a CPU: more images, so that the timed
# epochs last seconds, not the milliseconds that an epoch's tracking and sync would dominate.
GPU_FULL, GPU_QUICK = Budget(train_images=8192, epochs=4), Budget(train_images=2048, epochs=3)


def budget_for(device: torch.device, quick: bool) -> Budget:
    if device.type == "cpu":
        return CPU_QUICK if quick else CPU_FULL
    return GPU_QUICK if quick else GPU_FULL


@dataclass(frozen=True)
class TrainerTiming:
    """One trainer's timed epochs of one model. `started` and `ended` are wall-clock times (the
    same clock in every process), to show that the trainers ran at once."""

    pid: int
    threads: int
    started: float
    ended: float
    images: int
    images_per_s: float


def together(timings: Sequence[TrainerTiming]) -> float:
    """Images/s of the trainers together: every timed image over the span from the first start to
    the last end (a trainer that ends later runs its tail alone, so rates taken over each one's own
    window would add up to more than the device did)."""
    return sum(t.images for t in timings) / (max(t.ended for t in timings) - min(t.started for t in timings))


def wall_time(seconds: Sequence[float], workers: int) -> float:
    """The wall time of cells taking `seconds`, handed out in order, each to the first free of
    `workers` workers: when the last worker finishes."""
    free = [0.0] * workers  # a heap of the times the workers become free
    for s in seconds:
        heapq.heapreplace(free, free[0] + s)
    return max(free)


class _Together(Callback):
    """Starts the clock when every trainer has finished its warm-up epoch, and reads it at the end
    of each epoch after that (after the tracking callback's own work: it comes later in the list)."""

    def __init__(self, barrier) -> None:
        self.barrier = barrier
        self.started = self.ended = 0.0
        self.started_at = self.ended_at = 0.0

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 1:
            self.barrier.wait()
            self.started, self.started_at = time.perf_counter(), time.time()
        self.ended, self.ended_at = time.perf_counter(), time.time()


def _train(
    experiment: str, *, profile: str, budget: Budget, device: torch.device, tracker, workdir: Path, barrier
) -> TrainerTiming:
    cfg = perf_config(experiment, profile, budget)
    files = embedded_files(cfg.data.dataset, budget.train_images)
    clock = _Together(barrier)
    trained = perf_job(cfg, files, device, tracker, workdir / experiment, callbacks=[clock])
    result, bundle = trained.result, trained.bundle
    barrier.wait()  # every trainer done with this model before any starts the next
    images = (result.epochs_done - 1) * bundle.train.num_images
    return TrainerTiming(
        os.getpid(),
        torch.get_num_threads(),
        clock.started_at,
        clock.ended_at,
        images,
        images / (clock.ended - clock.started),
    )


def _trainer(workers: int, experiments: list[str], profile: str, device: str, budget: Budget, barrier, reports) -> None:
    """One of `workers` processes: each experiment's model in turn; puts (experiment, timing) on
    `reports`, or (None, the error) when it fails, after releasing the others from the barrier."""
    try:
        # Each trainer's share of the cores, as `bench run --workers` gives each worker.
        torch.set_num_threads(thread_share(workers))
        process.keep_freed_memory()  # as the command line sets it for every run
        from bench.tracking import Tracker

        with tempfile.TemporaryDirectory() as tmp:
            tracker = Tracker(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
            for experiment in experiments:
                timing = _train(
                    experiment,
                    profile=profile,
                    budget=budget,
                    device=torch.device(device),
                    tracker=tracker,
                    workdir=Path(tmp),
                    barrier=barrier,
                )
                reports.put((experiment, timing))
    except BaseException as exc:
        barrier.abort()
        reports.put((None, f"{type(exc).__name__}: {exc}"))
        raise


def measure(
    workers: int,
    experiments: dict[str, str],
    *,
    profile: str,
    device: torch.device,
    budget: Budget,
    on_model: Callable[[str, list[TrainerTiming]], None],
) -> dict[str, list[TrainerTiming]]:
    """Model name -> the timings of `workers` trainers of `experiments` (model name -> experiment)
    at once on `device`; `on_model` hears of each model once all its trainers have reported."""
    barrier, reports = SPAWN.Barrier(workers), SPAWN.Queue()
    model_of = {e: m for m, e in experiments.items()}
    trainers = Pool()
    trainers.spawn(
        _trainer,
        [(workers, list(experiments.values()), profile, str(device), budget, barrier, reports)] * workers,
        daemon=True,
    )
    timings: dict[str, list[TrainerTiming]] = {m: [] for m in experiments}
    try:
        while any(len(t) < workers for t in timings.values()):
            try:
                experiment, timing = reports.get(timeout=1)
            except queue.Empty:
                _check_alive(trainers, reports, workers)
                continue
            if experiment is None:
                raise RuntimeError(f"a trainer of {workers} failed: {timing}")
            timings[model_of[experiment]].append(timing)
            if len(timings[model_of[experiment]]) == workers:
                on_model(model_of[experiment], timings[model_of[experiment]])
    finally:
        barrier.abort()  # releases any trainer still waiting, after a failure or Ctrl-C
        # Unfinished, SIGINT stops each one's training (its temporary store is removed); else they end of themselves.
        trainers.stop(signal.SIGINT if any(len(t) < workers for t in timings.values()) else None)
    return timings


def _check_alive(trainers: Pool, reports, workers: int) -> None:
    """A process that ended cleanly has put all its reports; one that did not, or all ended with
    reports missing, is a failure."""
    codes = trainers.exit_codes()
    failed = [code for code in codes if code]
    if failed or (all(code is not None for code in codes) and reports.empty()):
        raise RuntimeError(
            f"a trainer of {workers} ended (exit code {failed[0] if failed else 0}) before "
            "reporting every model; its error is above"
        ) from None


def run(
    models: list[str],
    workers: list[int],
    *,
    profile: str,
    device: torch.device,
    quick: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    budget = budget_for(device, quick)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)  # every trainer on the same GPU
    experiments = {m: e for m, e in models_and_experiments().items() if m in models}
    meta = torch.device("meta")  # FLOPs are counted on shapes alone
    flops_per_image = {m: cost.step_flops(perf_config(e, profile, budget), meta)[0] for m, e in experiments.items()}
    results: dict[str, Any] = {
        "device": {
            "name": engine.device_name(device),
            "type": device.type,
            "index": device.index,
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "profile": profile,
            "quick": quick,
            "budget": asdict(budget),
            "tracking": "MLflow, a temporary SQLite store per trainer",
        },
        "workers": {},
    }
    base: dict[str, float] = {}  # each model's total at the smallest K
    for k in workers:

        def heard(model: str, timings: list[TrainerTiming], k: int = k) -> None:
            total = together(timings)
            base.setdefault(model, total)
            say(
                f"{model}, K={k}: {', '.join(f'{t.images_per_s:,.1f}' for t in timings)} images/s, together {total:,.1f} "
                f"(x{total / base[model]:.2f} of K={workers[0]}, {timings[0].threads} thread{'s' * (timings[0].threads > 1)} each)"
            )

        timings = measure(k, experiments, profile=profile, device=device, budget=budget, on_model=heard)
        results["workers"][str(k)] = {
            m: {
                "images_per_s": together(ts),
                "per_trainer_images_per_s": [t.images_per_s for t in ts],
                "relative_to_smallest_k": together(ts) / base[m],
                "train_flops_per_image": flops_per_image[m],
                "trainers": [asdict(t) for t in ts],
            }
            for m, ts in timings.items()
        }
    results["estimate"] = estimate(results["workers"], experiments, profile)
    return results


def estimate(measured: dict[str, dict[str, Any]], experiments: dict[str, str], profile: str) -> dict[str, Any]:
    """One seed of the paper suite's cells whose models were measured, for each K measured."""
    meta = torch.device("meta")
    cells = [e for e in config.suite_experiments(PAPER_SUITE) if e in experiments.values()]
    model_of = {e: m for m, e in experiments.items()}
    flops = {e: paper_flops(e, meta) for e in cells}
    cell_s: dict[str, dict[str, float]] = {}
    minutes: dict[str, float | None] = {}
    for k, models in measured.items():
        if int(k) > len(cells):
            # `bench run` starts one worker per cell, with that many workers' threads: this K is not
            # one it runs.
            minutes[k] = None
            continue
        cell_s[k] = {
            e: flops[e] / (models[model_of[e]]["train_flops_per_image"] * models[model_of[e]]["images_per_s"] / int(k))
            for e in cells
        }
        minutes[k] = wall_time([cell_s[k][e] for e in cells], int(k)) / 60
    runnable = {k: m for k, m in minutes.items() if m is not None}
    fastest = int(min(runnable, key=runnable.get)) if runnable else None
    return {
        "suite": PAPER_SUITE,
        "profile": "paper",
        "seeds": 1,
        "cells": cells,
        "complete": len(cells) == len(config.suite_experiments(PAPER_SUITE)),
        "paper_flops": flops,
        "cell_s": cell_s,
        "minutes": minutes,
        "fastest_workers": fastest,
        "assumption": ASSUMPTION.format(profile=profile),
    }
