"""Fitting objectives: pluggable functions ``objective(generator) -> scalar tensor``.

Each returns a relative squared error, so losses of different layers are comparable and 0 means
a perfect fit. ``fit.fit`` minimises any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.nn import functional as F

from adntn.memory import current_policy, release_pages
from adntn.networks import Generator
from adntn.networks.target import is_narrow

Objective = Callable[[Generator], torch.Tensor]


class WeightObjective:
    """||W - G||_F^2 / ||W||_F^2 in weight space, for a target in the generator's fitting form.

    ``target`` is ``Generator.fit_target`` of W: the leg tensor, or the matrix for the SVD. Held
    so, generators that can (TTN, aTTN, TT, SVD) evaluate the distance without materialising G.
    """

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target
        if is_narrow(target):  # in float64 over float32 blocks: the loss cancels against it
            flat = target.reshape(-1)
            self.norm_sq = sum(block.double().square().sum() for block in flat.split(current_policy().cache_values())).float()
        else:
            self.norm_sq = torch.linalg.vector_norm(target).square()  # no N-sized temporary

    def __call__(self, generator: Generator) -> torch.Tensor:
        return generator.squared_distance(self.target, self.norm_sq) / self.norm_sq

    def accumulate(self, generator: Generator) -> float:
        """The value, with its gradient accumulated into the generator's cores (``fit`` uses this
        when an objective has it: the generator may then work in parts)."""
        return generator.accumulate_squared_distance(self.target, self.norm_sq, 1 / self.norm_sq)


class ActivationObjective:
    """||f(X; W) - f(X; G)||^2 / ||f(X; W)||^2 on recorded layer inputs X (data-aware).

    f is the layer without its bias: X W^T for a linear layer (X of shape (n, in)), conv2d for a
    convolution (X of shape (n, C, H, W)). Only the directions the data visits are fitted.

    For a linear layer with ``max_rank``, the loss uses the input covariance instead of X:
    ||X D^T||^2 = tr(D C D^T) with C = X^T X ~ V_k S_k V_k^T (top ``max_rank`` eigenpairs), so a
    step costs out*in*k flops instead of n*out*in; ``energy`` is the share of tr(C) kept.
    """

    def __init__(self, weight: torch.Tensor, inputs: torch.Tensor, stride: tuple[int, int] = (1, 1),
                 padding: tuple[int, int] = (0, 0), max_rank: int | None = None) -> None:
        self.stride, self.padding = stride, padding
        self.energy = 1.0
        inputs = inputs.detach().float()
        weight = weight.detach().float()
        # what the mean output needs (``mean_residual``): the mean input row of a linear layer,
        # the inputs themselves for a convolution (kept whole below)
        self.input_mean = inputs.mean(0, keepdim=True) if weight.dim() == 2 else None
        if weight.dim() == 2 and max_rank is not None and max_rank < min(inputs.shape):
            covariance = (inputs.T @ inputs).double()
            values, vectors = torch.linalg.eigh(covariance)
            values = values.clamp_min(0)
            top_values, top_vectors = values[-max_rank:], vectors[:, -max_rank:]
            self.energy = float(top_values.sum() / values.sum().clamp_min(1e-300))
            # rows of X replaced by the k rows S_k^{1/2} V_k^T: same loss on the kept subspace
            self.inputs = (top_vectors * top_values.sqrt()).T.float().contiguous()
        else:
            self.inputs = inputs
        with torch.no_grad():
            self.target = self._apply(weight)
        self.norm_sq = self.target.pow(2).sum().clamp_min(1e-30)

    def _apply(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.dim() == 2:
            return self.inputs @ weight.T
        return F.conv2d(self.inputs, weight, stride=self.stride, padding=self.padding)

    def __call__(self, generator: Generator) -> torch.Tensor:
        return (self._apply(generator()) - self.target).pow(2).sum() / self.norm_sq

    def _mean_output(self, weight: torch.Tensor) -> torch.Tensor:
        """f(X; weight) averaged over the recorded rows (and a convolution's output positions): (out,)."""
        if weight.dim() == 2:
            return (self.input_mean @ weight.T).reshape(-1)
        return F.conv2d(self.inputs, weight, stride=self.stride, padding=self.padding).mean((0, 2, 3))

    @torch.no_grad()
    def mean_residual(self, weight: torch.Tensor, generator: Generator) -> torch.Tensor:
        """mean f(X; W) - mean f(X; G) over the recorded inputs, shape (out,): added to the dense
        bias, the compressed layer's mean output is the dense one's (the bias correction of
        post-training quantization, Nagel et al. 2019; the least-squares bias for this G)."""
        return self._mean_output(weight.detach().float()) - self._mean_output(generator())


@torch.no_grad()
def relative_error(reference: torch.Tensor, approximation: torch.Tensor | Iterable[torch.Tensor],
                   chunk_rows: int | None = None) -> float:
    """||A - B||_F / ||A||_F, accumulated in float64 over row chunks (no full float64 copies).

    ``approximation`` is a tensor or its blocks of whole rows in order (``Generator.row_blocks``:
    B need never exist whole). Each chunk of ``reference`` read is released (``release_pages``),
    so a mapped checkpoint tensor does not stay resident. Chunks of ``chunk_rows`` rows (default:
    a streamed block of float64 values, ``memory.current_policy``).
    """
    reference = reference.reshape(reference.shape[0], -1)
    chunk_rows = current_policy().block_rows(reference.shape[1], itemsize=8) if chunk_rows is None else chunk_rows
    blocks = [approximation] if isinstance(approximation, torch.Tensor) else approximation
    error_sq = norm_sq = 0.0
    start = 0
    for block in blocks:
        for piece in block.reshape(-1, reference.shape[1]).split(max(1, chunk_rows)):
            rows = reference[start:start + piece.shape[0]]
            if rows.shape != piece.shape:
                raise ValueError(f"the approximation has more rows than the reference ({reference.shape[0]})")
            a, b = rows.double(), piece.double()
            error_sq += float((a - b).pow(2).sum())
            norm_sq += float(a.pow(2).sum())
            release_pages(rows)
            start += piece.shape[0]
    if start != reference.shape[0]:
        raise ValueError(f"the approximation has {start} rows, not {reference.shape[0]}")
    return (error_sq / max(norm_sq, 1e-300)) ** 0.5
