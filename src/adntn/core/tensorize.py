"""Tensorisation: cutting a weight matrix into small physical legs and back.

``weight_to_legs`` maps a weight (out, in[, kh, kw]) to a tensor of shape ``spec.leg_dims``;
``legs_to_weight`` is its inverse (cropping the zero padding). With out = o_1*...*o_K and
in = i_1*...*i_K (row-major digits, o_1 most significant), leg k carries the pair (o_k, i_k).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

from adntn.memory import current_policy

SMOOTH_PRIME = 7  # dims whose prime factors are all <= this are used as they are


def prime_factors(n: int) -> list[int]:
    """Prime factors of n in ascending order (empty for n = 1)."""
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def smooth_ceiling(n: int, max_prime: int = SMOOTH_PRIME) -> int:
    """Smallest m >= n whose prime factors are all <= max_prime (n itself when it already is)."""
    m = n
    while max(prime_factors(m), default=1) > max_prime:
        m += 1
    return m


def max_legs(rows: int, cols: int) -> int:
    """The largest power-of-two leg count whose legs can all have dimension >= 2."""
    count = len(prime_factors(smooth_ceiling(rows))) + len(prime_factors(smooth_ceiling(cols)))
    return 1 << max(0, int(math.log2(max(count, 1))))


def choose_leg_factors(rows: int, cols: int, n_legs: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Split padded rows and cols into ``n_legs`` factors each, balancing the leg dims o_k*i_k.

    Prime factors are placed largest first on the leg whose dimension is currently smallest, rows
    before cols; legs are then ordered coarse to fine (largest leg first), which keeps the result
    deterministic.
    """
    out_f, in_f = [1] * n_legs, [1] * n_legs
    for primes, target in ((prime_factors(smooth_ceiling(rows)), out_f),
                           (prime_factors(smooth_ceiling(cols)), in_f)):
        for p in sorted(primes, reverse=True):
            k = min(range(n_legs), key=lambda j: (out_f[j] * in_f[j], j))
            target[k] *= p
    order = sorted(range(n_legs), key=lambda j: (-out_f[j] * in_f[j], -out_f[j], j))
    return tuple(out_f[j] for j in order), tuple(in_f[j] for j in order)


def weight_to_legs(weight: torch.Tensor, out_dims: tuple[int, ...], in_dims: tuple[int, ...], *,
                   dtype: torch.dtype | None = None,
                   after_block: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """(out, in[, kh, kw]) -> tensor of shape (o_1*i_1, ..., o_K*i_K), zero-padded, in ``dtype``
    (default: the weight's).

    Copied in blocks of whole rows (one value of the leading row digits each), so the result is
    the only large allocation; ``after_block(rows)`` is called with each block of ``weight``'s rows
    once it is copied (e.g. to drop a mapped checkpoint's pages as the copy goes).
    """
    matrix = weight.reshape(weight.shape[0], -1)
    rows, cols = math.prod(out_dims), math.prod(in_dims)
    k = len(out_dims)
    padded = matrix.shape != (rows, cols)
    legs_shape = [o * i for o, i in zip(out_dims, in_dims)]
    legs = (torch.zeros if padded else torch.empty)(legs_shape, dtype=dtype or matrix.dtype, device=matrix.device)
    digits = [d for pair in zip(out_dims, in_dims) for d in pair]
    grid = legs.view(digits).permute(*range(0, 2 * k, 2), *range(1, 2 * k, 2))  # (o_1..o_K, i_1..i_K)
    lead = 0
    block_values = current_policy().block_values()  # source entries copied per block
    while lead < k and math.prod(out_dims[lead:]) * cols > block_values:
        lead += 1
    block_rows = math.prod(out_dims[lead:])
    for index in itertools.product(*(range(o) for o in out_dims[:lead])):
        start = sum(i * math.prod(out_dims[j + 1:lead]) for j, i in enumerate(index)) * block_rows
        block = matrix[start:start + block_rows]
        if block.shape[0]:
            if padded:
                block = torch.nn.functional.pad(block, (0, cols - block.shape[1], 0, block_rows - block.shape[0]))
            copy_in_runs(grid[index], block.reshape(*out_dims[lead:], *in_dims))
            if after_block is not None:
                after_block(matrix[start:start + block_rows])
    return legs


def copy_in_runs(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` (same shape and dtype), moving each run of trailing values that is
    contiguous in both as one element of a wider type (``run_view``): a permuted copy costs per
    run, and between the leg and weight orders the runs are i_K values, often 2 or 4. Bit-exact
    (bytes are moved, not values). Returns ``dst``."""
    view = run_view(dst, src)
    if view is None:
        return dst.copy_(src)
    wide, trailing = view
    start = dst.dim() - trailing
    dst.flatten(start).view(wide).copy_(src.flatten(start).view(wide))
    return dst


def run_view(dst: torch.Tensor, src: torch.Tensor) -> tuple[torch.dtype, int] | None:
    """(the widest type of 16 or 8 bytes, the number of trailing axes) such that those axes of
    ``dst`` and ``src`` merge into runs that split evenly into that type's elements, every other
    stride and both addresses being multiples of it; None when there is no such type, the
    tensors differ in shape or dtype, both are contiguous (a plain copy is then one run), or under
    tracing (torch.export, torch.compile: a traced tensor has no address)."""
    if torch.compiler.is_compiling():
        return None
    run, trailing = 1, 0
    for size, dst_stride, src_stride in zip(reversed(dst.shape), reversed(dst.stride()), reversed(src.stride())):
        if size != 1 and (dst_stride != run or src_stride != run):
            break
        run, trailing = run * size, trailing + 1
    if dst.shape != src.shape or dst.dtype != src.dtype or trailing in (0, dst.dim()):
        return None
    item = dst.element_size()
    for wide, width in ((torch.complex128, 16), (torch.int64, 8)):
        ratio = width // item
        if width <= item or run % ratio:
            continue
        aligned = all(t.storage_offset() % ratio == 0 and t.data_ptr() % width == 0 for t in (dst, src))
        if aligned and all(stride % ratio == 0 for t in (dst, src) for stride in t.stride()[:dst.dim() - trailing]):
            return wide, trailing
    return None


def weight_order(legs: torch.Tensor, out_dims: tuple[int, ...], in_dims: tuple[int, ...]) -> torch.Tensor:
    """The legs (o_1*i_1, ..., o_K*i_K) as a view of shape (o_1, ..., o_K, i_1, ..., i_K): the
    (padded) weight's digits, permuted, not copied."""
    k = len(out_dims)
    digits = [d for pair in zip(out_dims, in_dims) for d in pair]
    return legs.reshape(digits).permute(*range(0, 2 * k, 2), *range(1, 2 * k, 2))


def legs_to_weight(legs: torch.Tensor, out_dims: tuple[int, ...], in_dims: tuple[int, ...],
                   shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`weight_to_legs`: (o_1*i_1, ..., o_K*i_K) -> weight of ``shape``."""
    matrix = weight_order(legs, out_dims, in_dims).reshape(math.prod(out_dims), math.prod(in_dims))
    out, cols = shape[0], math.prod(shape[1:])
    if matrix.shape != (out, cols):
        matrix = matrix[:out, :cols]
    return matrix.reshape(shape).contiguous()
