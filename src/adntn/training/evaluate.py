"""Classification accuracy of a model (or a head on cached features), and a compressed model
against the dense one on the same images."""

from __future__ import annotations

import math
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


def accuracy_of_logits(logits: torch.Tensor, labels: torch.Tensor) -> Accuracy:
    """Accuracy of logits (n, classes) against integer labels (n,)."""
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"need logits (n, classes) and labels (n,) with n > 0, got {tuple(logits.shape)}, "
                         f"{tuple(labels.shape)}")
    return accuracy_of_counts(*_predictions_of(logits, labels).counts())


@dataclass(frozen=True)
class Predictions:
    """What a model says about n samples, in order: its top-1 class (n,), the label (n,), and
    whether the label is among its top k = min(5, classes) (n,)."""

    top1: torch.Tensor
    labels: torch.Tensor
    in_top5: torch.Tensor

    def counts(self) -> tuple[int, int, int]:
        """(top-1 hits, top-k hits, samples)."""
        return int((self.top1 == self.labels).sum()), int(self.in_top5.sum()), len(self.labels)


def _predictions_of(logits: torch.Tensor, labels: torch.Tensor) -> Predictions:
    """:class:`Predictions` of logits (n, classes) against integer labels (n,), on the CPU."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
    labels = labels.cpu().long()
    return Predictions(top[:, 0], labels, (top == labels.unsqueeze(1)).any(dim=1))


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Predictions:
    """:class:`Predictions` of ``model`` in eval mode over ``batches`` of (inputs, labels (b,))
    (possibly none). Inputs go to the model's device; its train/eval mode is restored afterwards."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts = []
    try:
        for inputs, labels in batches:
            if len(labels) == 0:
                continue
            with input_size_errors(inputs):
                parts.append(_predictions_of(model(inputs.to(device)), labels))
    finally:
        model.train(was_training)
    if not parts:
        return Predictions(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                           torch.zeros(0, dtype=torch.bool))
    return Predictions(*(torch.cat([getattr(part, field) for part in parts]) for field in ("top1", "labels", "in_top5")))


def mcnemar_p(lost: int, gained: int) -> float:
    """McNemar's exact two-sided p-value for two models on the same images being equally accurate:
    of the n = lost + gained images that exactly one of them gets right, the chance that a fair
    coin splits them at least this unevenly, min(1, 2 P[Binomial(n, 1/2) <= min(lost, gained)])
    (1 when n = 0). Summed in log space: exact for any n a test split holds."""
    n, k = lost + gained, min(lost, gained)
    if n == 0:
        return 1.0
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
                 for i in range(k + 1)]
    top = max(log_terms)
    return min(1.0, 2 * math.exp(top) * math.fsum(math.exp(t - top) for t in log_terms))


@dataclass(frozen=True)
class Paired:
    """A compressed model against the dense one on the same ``images``: how many get the same
    top-1 class (``agree``), how many the dense model gets right and the compressed one wrong
    (``lost``) and the reverse (``gained``). The top-1 difference is (gained - lost) / images."""

    agree: int
    lost: int
    gained: int
    images: int

    def describe(self) -> dict:
        return {"top1_agreement": self.agree / self.images if self.images else None, "lost": self.lost,
                "gained": self.gained, "images": self.images, "mcnemar_p": mcnemar_p(self.lost, self.gained)}


def paired_counts(compressed: Predictions, dense: Predictions) -> tuple[int, int, int, int]:
    """(agree, lost, gained, images) of ``compressed`` against ``dense`` (:class:`Paired`): the
    same samples in the same order."""
    if not torch.equal(compressed.labels, dense.labels):
        raise ValueError("the two predictions are not of the same samples")
    right, dense_right = compressed.top1 == compressed.labels, dense.top1 == dense.labels
    return (int((compressed.top1 == dense.top1).sum()), int((dense_right & ~right).sum()),
            int((right & ~dense_right).sum()), len(compressed.labels))


def accuracy_of_counts(top1: int, top5: int, images: int) -> Accuracy:
    if images == 0:
        raise ValueError("no samples to evaluate")
    return Accuracy(top1=top1 / images, top5=top5 / images, images=images)


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Accuracy:
    """Accuracy of ``model`` in eval mode over ``batches`` of (inputs, labels (b,)).

    Inputs go to the model's device; the model's train/eval mode is restored afterwards.
    """
    return accuracy_of_counts(*predict(model, batches).counts())


def tensor_batches(inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) in order, ``batch_size`` rows at a time (e.g. cached trunk features)."""
    return zip(inputs.split(batch_size), labels.split(batch_size))
