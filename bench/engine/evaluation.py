"""Evaluation after each epoch: the modes, the alternative evaluations of the same weights, and
the random streams of their own each pass draws from."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from bench.engine.step import Step, random_streams_apart

if TYPE_CHECKING:
    from bench.config import EvalConfig


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
def evaluate(
    model: nn.Module,
    batches,
    mode: str = "eval",
    step: Step = Step(),  # noqa: B008 (a frozen dataclass: one shared default is safe)
) -> tuple[float, float]:
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


def _evaluate_apart(model: nn.Module, batches, mode: str, step: Step, seed: int) -> tuple[float, float]:
    """`evaluate` on random streams of its own, seeded with `seed`: train mode's dropout masks and
    the train split's shuffling and augmentation leave the training's draws untouched, so a run
    learns the same weights whatever its evaluation."""
    device = batches.labels.device
    with random_streams_apart(device, seed):
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
