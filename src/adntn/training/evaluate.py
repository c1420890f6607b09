"""Classification accuracy of a model (or a head on cached features)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from adntn.training.features import input_size_errors


@dataclass(frozen=True)
class Accuracy:
    """Fractions in [0, 1] of ``images`` samples; top5 uses k = min(5, classes)."""

    top1: float
    top5: float
    images: int

    def describe(self) -> dict:
        return asdict(self)


def _correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(top-1 hits, top-k hits) of logits (n, classes) against labels (n,), k = min(5, classes)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top == labels.to(top.device).unsqueeze(1)
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def accuracy_of_logits(logits: torch.Tensor, labels: torch.Tensor) -> Accuracy:
    """Accuracy of logits (n, classes) against integer labels (n,)."""
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"need logits (n, classes) and labels (n,) with n > 0, got {tuple(logits.shape)}, "
                         f"{tuple(labels.shape)}")
    top1, top5 = _correct(logits, labels)
    n = logits.shape[0]
    return Accuracy(top1=top1 / n, top5=top5 / n, images=n)


@torch.no_grad()
def count_hits(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, int, int]:
    """(top-1 hits, top-k hits, samples) of ``model`` in eval mode over ``batches`` (possibly none).

    Inputs go to the model's device; the model's train/eval mode is restored afterwards.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    top1 = top5 = images = 0
    try:
        for inputs, labels in batches:
            if len(labels) == 0:
                continue
            with input_size_errors(inputs):
                logits = model(inputs.to(device))
            hits1, hits5 = _correct(logits, labels)
            top1, top5, images = top1 + hits1, top5 + hits5, images + len(labels)
    finally:
        model.train(was_training)
    return top1, top5, images


def accuracy_of_counts(top1: int, top5: int, images: int) -> Accuracy:
    if images == 0:
        raise ValueError("no samples to evaluate")
    return Accuracy(top1=top1 / images, top5=top5 / images, images=images)


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Accuracy:
    """Accuracy of ``model`` in eval mode over ``batches`` of (inputs, labels (b,)).

    Inputs go to the model's device; the model's train/eval mode is restored afterwards.
    """
    return accuracy_of_counts(*count_hits(model, batches))


def tensor_batches(inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) in order, ``batch_size`` rows at a time (e.g. cached trunk features)."""
    return zip(inputs.split(batch_size), labels.split(batch_size))
