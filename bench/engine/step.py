"""One training step and what it runs on: the device, seeding, AMP, memory format, the optimizer
and its schedule, an epoch of steps, compilation and the peak memory."""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:
    import resource
except ImportError:  # Windows: psutil reads the peak working set there
    resource = None
from bench.engine.clock import Clock, laps, synchronize
from bench.errors import UserError


def resolve_device(name: str) -> torch.device:
    """The torch device `name` stands for ("auto": the best this machine has), or a UserError that
    calls it "device NAME" (the command line names its flag: `job.resolve_device`)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a device; use auto, cpu, cuda, cuda:I or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {name!r} is not supported; use auto, cpu, cuda, cuda:I or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name}: CUDA is not available on this machine; use device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name}: MPS is not available on this machine; use device cpu or auto")
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


@contextlib.contextmanager
def random_streams_apart(device: torch.device, seed: int):
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
    with random_streams_apart(device, 0):
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
