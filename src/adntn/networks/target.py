"""Products with a fitting target held in a narrower dtype than the cores (``--target-dtype``).

A weight-space fit keeps one copy of the weight, its target (``Generator.fit_target``). In
bfloat16 that copy is half the size; every product that reads it then takes float32 blocks of at
most ``current_policy().cache_values()`` entries (1 MiB: they stay in cache), so the math stays float32 and no float32 copy of the whole
target exists. A float32 target is used as it is, in one piece (the same operations as without
this module). Wider targets (float64 in tests) are also used as they are.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from adntn.memory import current_policy

NARROW = (torch.bfloat16, torch.float16)


def is_narrow(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is read in float32 blocks (a bfloat16 or float16 target)."""
    return tensor.dtype in NARROW


def float_blocks(view: torch.Tensor) -> Iterator[tuple[tuple[slice, slice], torch.Tensor]]:
    """Float32 blocks of a narrow ``view`` (before, dim, after) with their (before, after) index
    slices, blocks along before, then along after; any other view whole, as it is. The blocks
    share one buffer: each is valid until the next is asked for (never save one for autograd)."""
    if not is_narrow(view):
        yield (slice(None), slice(None)), view
        return
    before, dim, after = view.shape
    values = current_policy().cache_values()
    along_after = after if dim * after <= values else max(1, values // max(1, dim))
    along_before = max(1, values // max(1, dim * along_after))
    buffer = torch.empty(min(before, along_before) * dim * min(after, along_after), device=view.device)
    for first in range(0, before, along_before):
        for start in range(0, after, along_after):
            rows, cols = slice(first, first + along_before), slice(start, start + along_after)
            source = view[rows, :, cols]
            yield (rows, cols), buffer[:source.numel()].view(source.shape).copy_(source)


def float_rows(target: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """Float32 blocks of whole rows of a narrow 2-D ``target`` with their row slices (any other
    target whole, as it is); one shared buffer, as in ``float_blocks``."""
    for (rows, _), block in float_blocks(target.unsqueeze(2) if is_narrow(target) else target[None]):
        yield rows, (block[:, :, 0] if is_narrow(target) else block[0])


def target_matmul(target: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``target @ matrix`` in float32: target (P, Q), matrix (Q, k) -> (P, k)."""
    if not is_narrow(target):
        return target @ matrix
    return torch.cat([block @ matrix for _, block in float_rows(target)])


def target_tmatmul(matrix: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``matrix.T @ target`` in float32: matrix (P, k), target (P, Q) -> (k, Q)."""
    if not is_narrow(target):
        return matrix.T @ target
    return sum(matrix[rows].T @ block for rows, block in float_rows(target))


class BatchedTargetProduct(torch.autograd.Function):
    """Z = sum_x Y_x C_x^T for a large constant Y (x, D, y) and C (x, r, y) -> (D, r).

    dC_x = (Y_x^T dZ)^T: Y is read in float32 blocks both ways, never saved whole in float32.
    """

    @staticmethod
    def forward(ctx, target: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(target, coeff)
        product = coeff.new_zeros(target.shape[1], coeff.shape[1])
        for (rows, cols), block in float_blocks(target):
            product += torch.bmm(block, coeff[rows, :, cols].transpose(1, 2)).sum(0)
        return product

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        target, coeff = ctx.saved_tensors
        grad_coeff = torch.empty_like(coeff)
        for (rows, cols), block in float_blocks(target):
            grad_coeff[rows, :, cols] = torch.matmul(grad.T, block)
        return None, grad_coeff
