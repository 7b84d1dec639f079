"""fit / train_one_epoch / evaluate and checkpoint resume.

The engine knows nothing of MLflow, Optuna or reports: it reports through callbacks, and a
stop (requested by a callback, or a non-finite loss) is a returned status, not an exception.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.engine import checkpoint, stops

try:
    import resource
except ImportError:  # Windows: psutil reads the peak working set there
    resource = None
from bench.engine.callbacks import Callback
from bench.errors import UserError

if TYPE_CHECKING:
    from bench.config import EvalConfig

LAST, BEST = "last.pt", "best.pt"


@dataclass
class FitResult:
    status: str  # "finished", "stopped" (a callback asked) or "nonfinite" (loss NaN or Inf)
    epochs_done: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    best_epoch: int | None = None
    best_val_acc: float | None = None
    best_test_acc: float | None = None
    checkpoint_dir: Path | None = None
    nonfinite_epoch: int | None = None  # the epoch whose loss was NaN or Inf


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:I or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name!r} is not supported; use auto, cpu, cuda, cuda:I or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device cpu or auto")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({os.cpu_count()} cores)"
    return device.type


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def build_optimizer(params: Iterable[nn.Parameter], cfg) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
        )
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch; "none" is a constant schedule so every run has one to checkpoint.

    With `cfg.step_before_epoch` it starts one step ahead, so epoch k trains at the rate of k
    steps rather than k - 1: the order of a loop that steps the scheduler before each epoch (R4's
    source), whose step decay comes one epoch early. A resumed run loads the step count saved."""
    sched = torch.optim.lr_scheduler
    if cfg.name == "step":
        scheduler = sched.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    elif cfg.name == "exponential":
        scheduler = sched.ExponentialLR(optimizer, gamma=cfg.gamma)
    elif cfg.name == "cosine":
        scheduler = sched.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=cfg.eta_min)
    else:
        scheduler = sched.LambdaLR(optimizer, lambda _: 1.0)
    if cfg.step_before_epoch:
        with warnings.catch_warnings():
            # PyTorch warns that a step before optimizer.step() skips the first rate: here it is meant to.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            scheduler.step()
    return scheduler


@dataclass(frozen=True)
class Step:
    """How a batch goes through the model: memory format and autocast dtype (None: float32)."""

    memory_format: torch.memory_format = torch.contiguous_format
    autocast_dtype: torch.dtype | None = None

    def forward(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the cross-entropy loss, both computed under autocast as PyTorch's AMP
        recipe has it: autocast runs cross_entropy in float32, so neither the loss nor its
        gradient comes from bfloat16 log-probabilities."""
        x = x.contiguous(memory_format=self.memory_format)
        autocast = (
            torch.autocast(x.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype
            else contextlib.nullcontext()
        )
        with autocast:
            logits = model(x)
            return logits, F.cross_entropy(logits, y, reduction=reduction)


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bfloat16 where the device runs it fast (CUDA with bf16 support); None (float32) elsewhere:
    the CPU's bfloat16 is emulated on most machines, slower than float32."""
    if amp and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def step_for(train_cfg, device: torch.device) -> Step:
    """The step a run's `train` section asks for on this device."""
    fmt = torch.channels_last if train_cfg.channels_last else torch.contiguous_format
    return Step(fmt, autocast_dtype(device, train_cfg.amp))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer reads the work's end, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


_PROC_SELF = Path("/proc/self")


def reset_peak_memory(device: torch.device) -> None:
    """Start `peak_memory_mb`'s count afresh: this fit's peak, not one of an earlier fit (or trial)
    in the same process. On Linux, writing 5 to clear_refs resets the resident-set peak (VmHWM);
    where that cannot be done, the peak off CUDA stays the process's since it started."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        (_PROC_SELF / "clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """The peak memory of training since `reset_peak_memory`, in MiB: on CUDA the caching
    allocator's peak of tensor memory; elsewhere the process's peak resident set (VmHWM on Linux,
    else getrusage: the MPS and CPU allocators keep no peak of their own)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in (_PROC_SELF / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError, IndexError):
        pass
    if resource is None:
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
        2**20 if sys.platform == "darwin" else 2**10
    )  # bytes on macOS, KiB on Linux


class Clock:
    """Where training's time goes, part by part: `lap(part)` adds the seconds since the previous
    lap to `part`. Given a device, it first waits for the device's queued work, so that a part
    is charged for its work rather than its launch: for measurements only (`bench perf`), since
    the waits keep an accelerator idle. On the CPU the work is done when the call returns: a lap
    is a clock read, and needs no device."""

    # A step's parts; then "closing": after the last epoch's callbacks, its checkpoint written and
    # announced, once a run, not a step's.
    PARTS = ("data", "forward and backward", "optimizer", "metrics", "evaluation", "tracking", "checkpoints", "other")
    CLOSING = "closing"

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds = dict.fromkeys((*self.PARTS, self.CLOSING), 0.0)
        self.steps = 0
        self._last = time.perf_counter()

    def start(self) -> None:
        """Count from now: what came before is nobody's."""
        if self.device is not None:
            synchronize(self.device)
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        if self.device is not None:
            synchronize(self.device)
        now = time.perf_counter()
        self.seconds[part] += now - self._last
        self._last = now


def _no_lap(part: str) -> None:
    pass


def laps(clock: Clock | None) -> Callable[[str], None]:
    """The clock's `lap`, or one that does nothing when there is no clock."""
    return clock.lap if clock is not None else _no_lap


def train_one_epoch(
    model: nn.Module,
    batches,
    optimizer: torch.optim.Optimizer,
    step: Step = Step(),
    log_every: int = 0,
    on_log: Callable[[int, float], None] | None = None,
    clock: Clock | None = None,
) -> tuple[float, float, int]:
    """Mean loss and accuracy over the epoch's training batches, and the image count.

    Sums stay on the device: one host sync per epoch, and one per `log_every` steps when
    `on_log(step_in_epoch, mean_loss_since_last_log)` is given. A `clock` is told where each
    step's time went.
    """
    model.train()
    device = batches.labels.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    window = torch.zeros((), device=device)
    seen = 0
    lap = laps(clock)
    lap("metrics")
    for i, (x, y) in enumerate(batches, 1):
        lap("data")
        optimizer.zero_grad(set_to_none=True)
        logits, loss = step.forward(model, x, y)
        loss.backward()
        lap("forward and backward")
        optimizer.step()
        lap("optimizer")
        loss = loss.detach().float()
        loss_sum += loss * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if on_log is not None and log_every:
            window += loss
            if i % log_every == 0:
                mean = window.item() / log_every
                window.zero_()
                lap("metrics")
                on_log(i, mean)
                lap("tracking")
        lap("metrics")
    if clock is not None:
        clock.steps += len(batches)
    mean_loss, accuracy = loss_sum.item() / seen, correct.item() / seen
    lap("metrics")
    return mean_loss, accuracy, seen


@contextlib.contextmanager
def _buffers_kept(model: nn.Module):
    """Put the model's buffers back as they were on leaving: values copied in place, so the
    tensors a compiled model holds stay the same objects."""
    saved = [(buffer, buffer.clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@torch.no_grad()
def evaluate(model: nn.Module, batches, mode: str = "eval", step: Step = Step()) -> tuple[float, float]:
    """Mean loss and accuracy. mode "train" keeps BatchNorm batch statistics and dropout on,
    as the R1 author's code did (it never called model.eval()), but not the author's side
    effect: BatchNorm in train mode folds every batch into its running statistics, which would
    put statistics of the validation and test images into the checkpoints. The buffers are
    kept as training left them."""
    model.train(mode == "train")
    loss_sum = torch.zeros((), device=batches.labels.device)
    correct = torch.zeros((), device=batches.labels.device, dtype=torch.long)
    with _buffers_kept(model) if mode == "train" else contextlib.nullcontext():
        for x, y in batches:
            logits, loss = step.forward(model, x, y, reduction="sum")
            loss_sum += loss
            correct += (logits.argmax(1) == y).sum()
    n = batches.num_images
    return loss_sum.item() / n, correct.item() / n


def _pass_seed(run_seed: int, epoch: int, split: str) -> int:
    """The seed of the evaluation pass over `split` after `epoch`. It depends on nothing else, so
    a pass gives the same numbers in a resumed run, and as an alternative evaluation the same as
    in a run that has that evaluation as its own."""
    digest = hashlib.sha256(f"{run_seed}/{epoch}/{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: any generator takes it


@contextlib.contextmanager
def _random_streams_apart(device: torch.device, seed: int):
    """Inside, the CPU's generator and the device's own (dropout on CUDA draws from it) start
    from `seed`; on leaving both are as they were, as if nothing had been drawn."""
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        elif device.type == "mps":
            torch.mps.manual_seed(seed)
        yield


def _evaluate_apart(model: nn.Module, batches, mode: str, step: Step, seed: int) -> tuple[float, float]:
    """`evaluate` on random streams of its own, seeded with `seed`: train mode's dropout masks and
    the train split's shuffling and augmentation leave the training's draws untouched, so a run
    learns the same weights whatever its evaluation."""
    device = batches.labels.device
    with _random_streams_apart(device, seed):
        return evaluate(model, batches.drawing_from(torch.Generator(device=device).manual_seed(seed)), mode, step)


def evaluation_plan(
    own: EvalConfig, alternatives: Sequence[tuple[str, EvalConfig]] = ()
) -> list[tuple[str, EvalConfig, bool, bool]]:
    """The evaluations after each epoch as (metric-name suffix, evaluation, measures train_acc,
    measures val and test): the run's own, then the alternatives, each for what it changes."""
    return [("", own, True, True)] + [
        (f"/{suffix}", alt, alt.remeasure_train_acc != own.remeasure_train_acc, alt.mode != own.mode)
        for suffix, alt in alternatives
    ]


def evaluation_passes(plan: list[tuple[str, EvalConfig, bool, bool]], held_out: Sequence[str]) -> set[tuple[str, str]]:
    """The (split, mode) passes an epoch runs for `plan` ("train" for a re-measure pass); a pass
    two evaluations share runs once. `held_out`: the splits evaluated, "val" and "test"."""
    passes = {("train", ev.mode) for _, ev, measures_train, _ in plan if measures_train and ev.remeasure_train_acc}
    return passes | {
        (split, ev.mode) for _, ev, _, measures_held_out in plan if measures_held_out for split in held_out
    }


def compile_and_warm_up(
    model: nn.Module,
    data,
    optimizer: torch.optim.Optimizer,
    step: Step,
    evaluations: Iterable[tuple[str, str]],
) -> tuple[nn.Module, float]:
    """torch.compile the model and compile every batch shape the run will see, on zeros, so that
    compilation stays out of the epochs' timings: training's, and those of the `evaluations`, the
    (split, mode) pairs of the passes after each epoch ("train" for a re-measure pass, "val",
    "test"; each mode and gradient-free pass is a graph of its own). The model's weights,
    buffers, gradients and the random state are restored afterwards: the run trains exactly as
    if uncompiled."""
    compiled = torch.compile(model)
    started = time.perf_counter()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    device = data.train.labels.device

    def shapes(batches) -> set[int]:
        n, b = batches.num_images, batches.batch_size
        return {min(b, n)} | ({n % b} if n % b else set())

    x_shape = (data.train.images.shape[1], data.train.image_size, data.train.image_size)

    def zeros(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros((n, *x_shape), device=device), torch.zeros(n, dtype=torch.long, device=device)

    # Dropout on the zeros draws from the CPU's and the device's generators: both are put back.
    with _random_streams_apart(device, 0):
        for n in shapes(data.train):
            model.train()
            step.forward(compiled, *zeros(n))[1].backward()
        with torch.no_grad():
            for mode, n in {(mode, n) for split, mode in evaluations for n in shapes(getattr(data, split))}:
                model.train(mode == "train")
                step.forward(compiled, *zeros(n), reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    model.load_state_dict(saved)
    synchronize(device)
    return compiled, time.perf_counter() - started


def _rng_state(data_gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The random state a resume restores: the CPU's, the data generator's and, on CUDA, the
    generator of the device the run trains on (dropout draws from it; a run on cuda:1 never
    touches GPU 0's)."""
    state = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], data_gen: torch.Generator, device: torch.device) -> None:
    """The inverse of `_rng_state`. "cuda" goes to the run's device, whichever it resumes on.
    Checkpoints written before held the current device's (GPU 0's), the run's own when it ran there."""
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def fit(
    model: nn.Module,
    data,
    cfg,
    *,
    checkpoint_dir: Path,
    callbacks: Sequence[Callback] = (),
    resume: bool = True,
    max_epochs: int | None = None,
    evaluate_test: bool = True,
    alternatives: Sequence[tuple[str, EvalConfig]] = (),
    clock: Clock | None = None,
) -> FitResult:
    """Train `model` (already on the data's device) on `data` (a DataBundle) with `cfg` (RunConfig).

    Resumes from `checkpoint_dir/last.pt` when it exists. `max_epochs` stops early after that
    many epochs in total (for tests of interrupted runs); the run's schedule still spans
    cfg.train.epochs. `evaluate_test=False` leaves the test set alone (tuning trials: the search
    must not see it, and it saves an evaluation pass per epoch).

    `alternatives` are other evaluations of the same weights, each with a metric-name suffix:
    after each epoch, what differs from the run's own `cfg.eval` is measured again and logged
    as `<metric>/<suffix>`: val and test loss and accuracy for another mode, train_acc for
    another `remeasure_train_acc` (the re-measure in the alternative's mode, or the running
    accuracy of the epoch's batches). Every evaluation pass runs on random streams of its own,
    seeded from the run seed, the epoch and the split: the weights and training metrics are the
    same whatever the evaluation, and the best checkpoint follows the run's own val_acc.

    A `clock` is told where each epoch's time went, from the start of its first epoch to the end
    of its last epoch's callbacks, and then what the closing took: the last checkpoint written and
    announced (`bench perf`'s breakdown).
    """
    epochs = cfg.train.epochs
    device = data.train.labels.device
    step = step_for(cfg.train, device)
    model.to(memory_format=step.memory_format)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, epochs)
    result = FitResult(status="finished", epochs_done=0, checkpoint_dir=Path(checkpoint_dir))
    last_path, best_path = Path(checkpoint_dir) / LAST, Path(checkpoint_dir) / BEST
    state = checkpoint.load_latest(last_path) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], data.generator, device)
        result.epochs_done = int(state["epoch"])
        result.best_epoch, result.best_val_acc, result.best_test_acc = state["best"]
        result.last_metrics = dict(state["metrics"])

    saver = checkpoint.Saver(background=device.type != "cpu")
    reset_peak_memory(device)  # peak_memory_mb: this fit's, not an earlier one's in the process

    def announce(keep: int | None = None) -> None:
        for kind, path, epoch in saver.done(keep):
            for cb in callbacks:
                cb.on_checkpoint(kind, path, epoch)

    config_hash = cfg.config_hash()

    def current(epoch: int) -> dict:
        """What a checkpoint after `epoch` holds, the tensors as the model and optimizer have them."""
        return {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(data.generator, device),
            "best": (result.best_epoch, result.best_val_acc, result.best_test_acc),
            "metrics": result.last_metrics,
            "config_hash": config_hash,
        }

    def save(path: Path, kind: str, epoch: int, taken: dict | None = None) -> None:
        """Queue the checkpoint (the state now, or one `taken` before); it is announced to the
        callbacks once it is on disk. At most two wait in memory (an epoch's best and last) while
        training goes on."""
        nonlocal last_queued
        announce(keep=1)
        write = checkpoint.save_rotating if kind == "last" else checkpoint.save
        with stops.held():  # a stop during a write on the CPU comes once the write is whole and counted
            saver.submit(write, taken if taken is not None else current(epoch), path, (kind, path, epoch))
            if kind == "last":
                last_queued = epoch

    held_out = ["val"] * (data.val is not None) + ["test"] * evaluate_test
    plan = evaluation_plan(cfg.eval, alternatives)
    passes = evaluation_passes(plan, held_out)

    forward, compile_time = model, None
    stop_after = min(epochs, max_epochs) if max_epochs is not None else epochs
    nothing_to_train = state is not None and result.epochs_done >= stop_after  # a finished run, resumed
    if cfg.train.compile and result.epochs_done < stop_after:
        forward, compile_time = compile_and_warm_up(model, data, optimizer, step, passes)
    for cb in callbacks:
        cb.on_fit_start(start_epoch=result.epochs_done, epochs=epochs)
    last_saved = time.monotonic()  # the start (or the checkpoint resumed from) counts as saved
    # What an interruption (KeyboardInterrupt: Ctrl-C, or SIGTERM turned into one by the command
    # line) keeps: the last finished epoch, unless a "last" checkpoint of it is written or queued.
    # Between two epochs the model itself holds it (`live`); during an epoch, the copy of its
    # state taken on the device after the epoch before (`unsaved`), when no checkpoint holds that.
    last_queued, live, unsaved = result.epochs_done, False, None
    lap = laps(clock)
    if clock is not None:
        clock.start()
    try:
        steps_per_epoch = len(data.train)
        for epoch in range(result.epochs_done + 1, stop_after + 1):

            def on_log(i: int, loss: float, first: int = (epoch - 1) * steps_per_epoch) -> None:
                for cb in callbacks:
                    cb.on_train_steps(first + i, {"train_step_loss": loss})

            synchronize(device)
            started = time.perf_counter()
            lap("other")
            live = False
            lr = optimizer.param_groups[0]["lr"]
            train_loss, train_acc, seen = train_one_epoch(
                forward, data.train, optimizer, step, cfg.train.log_every_steps, on_log, clock
            )
            train_time = time.perf_counter() - started  # train_one_epoch ends on a host sync
            scheduler.step()
            if not math.isfinite(train_loss):
                # Ends here, before any evaluation or checkpoint: NaN weights are never saved.
                result.status, result.nonfinite_epoch = "nonfinite", epoch
                result.last_metrics = {"train_loss": train_loss}
                break

            @functools.cache  # a pass two evaluations share runs once
            def measured(split: str, mode: str) -> tuple[float, float]:
                return _evaluate_apart(forward, getattr(data, split), mode, step, _pass_seed(cfg.seed, epoch, split))  # noqa: B023 (used within this epoch)

            metrics = {"train_loss": train_loss, "lr": lr}
            for suffix, ev, measures_train, measures_held_out in plan:
                if measures_train:
                    metrics[f"train_acc{suffix}"] = (
                        measured("train", ev.mode)[1] if ev.remeasure_train_acc else train_acc
                    )
                for split in held_out if measures_held_out else ():
                    metrics[f"{split}_loss{suffix}"], metrics[f"{split}_acc{suffix}"] = measured(split, ev.mode)
                if not suffix:
                    # Training and the run's own evaluation, what the reported runs timed: the
                    # alternatives' passes, which they never ran, are timed apart.
                    own_done = time.perf_counter()
                    metrics["epoch_time_s"] = own_done - started
            if alternatives:
                metrics["alternatives_time_s"] = time.perf_counter() - own_done
            metrics["train_time_s"] = train_time
            metrics["images_per_s"] = seen / train_time
            metrics["peak_memory_mb"] = peak_memory_mb(device)
            if compile_time is not None:
                metrics["compile_time_s"], compile_time = compile_time, None
            result.epochs_done, result.last_metrics = epoch, metrics
            lap("evaluation")
            # The best checkpoint is chosen on validation accuracy, never on test accuracy.
            if "val_acc" in metrics and (result.best_val_acc is None or metrics["val_acc"] > result.best_val_acc):
                result.best_epoch, result.best_val_acc, result.best_test_acc = (
                    epoch,
                    metrics["val_acc"],
                    metrics.get("test_acc"),
                )
                save(best_path, "best", epoch)
            lap("checkpoints")
            stop = any([cb.on_epoch_end(epoch, metrics) for cb in callbacks])
            lap("tracking")
            # From here the model holds the finished epoch, its best checkpoint is written and the
            # callbacks have its metrics: an interruption may keep it as it is.
            live = True
            due = (
                epoch % cfg.train.checkpoint_every == 0
                and time.monotonic() - last_saved >= cfg.train.checkpoint_min_interval_s
            )
            final = stop or epoch == stop_after
            if due or epoch == epochs or final:
                save(last_path, "last", epoch)
                last_saved, unsaved = time.monotonic(), None
            else:
                unsaved = checkpoint.snapshot(current(epoch), device=None)
            lap(Clock.CLOSING if final else "checkpoints")
            announce()
            lap(Clock.CLOSING if final else "tracking")
            if stop:
                result.status = "stopped"
                break
        if nothing_to_train:
            # A run stopped after writing its final checkpoint, before the callbacks heard of it
            # (the copy in MLflow may be older): they hear of it now.
            for kind, path, epoch in (("best", best_path, result.best_epoch), ("last", last_path, result.epochs_done)):
                if path.is_file():
                    for cb in callbacks:
                        cb.on_checkpoint(kind, path, epoch)
        announce(keep=0)
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt) and stops.within(exc) is None:
            raise  # a failure, not a stop (an error a library made of a stop is that stop)
        # The epoch in progress is lost; the last finished one is kept (not where the checkpoints
        # are thrown away after the fit: resume=False).
        keep = (result.epochs_done, None) if live else (unsaved["epoch"], unsaved) if unsaved is not None else (0, None)
        if resume and keep[0] > last_queued and not stops.abandoned():  # (a write given up at Ctrl-C: not again)
            with stops.held("the last finished epoch's checkpoint"):  # written and handed to the callbacks (uploaded)
                save(last_path, "last", *keep)
                announce(keep=0)
        raise
    finally:
        saver.close()
    if result.status == "finished" and result.epochs_done < epochs:
        result.status = "stopped"
    for cb in callbacks:
        cb.on_fit_end(result)
    return result
