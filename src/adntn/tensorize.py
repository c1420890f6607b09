"""Tensorisation: cutting a weight matrix into small physical legs and back.

``weight_to_legs`` maps a weight (out, in[, kh, kw]) to a tensor of shape ``spec.leg_dims``;
``legs_to_weight`` is its inverse (cropping the zero padding). With out = o_1*...*o_K and
in = i_1*...*i_K (row-major digits, o_1 most significant), leg k carries the pair (o_k, i_k).
"""

from __future__ import annotations

import math

import torch

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


def weight_to_legs(weight: torch.Tensor, out_dims: tuple[int, ...], in_dims: tuple[int, ...]) -> torch.Tensor:
    """(out, in[, kh, kw]) -> tensor of shape (o_1*i_1, ..., o_K*i_K), zero-padded."""
    matrix = weight.reshape(weight.shape[0], -1)
    rows, cols = math.prod(out_dims), math.prod(in_dims)
    if matrix.shape != (rows, cols):
        matrix = torch.nn.functional.pad(matrix, (0, cols - matrix.shape[1], 0, rows - matrix.shape[0]))
    k = len(out_dims)
    interleave = [axis for pair in zip(range(k), range(k, 2 * k)) for axis in pair]
    legs = matrix.reshape(*out_dims, *in_dims).permute(*interleave)
    return legs.reshape([o * i for o, i in zip(out_dims, in_dims)])


def legs_to_weight(legs: torch.Tensor, out_dims: tuple[int, ...], in_dims: tuple[int, ...],
                   shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`weight_to_legs`: (o_1*i_1, ..., o_K*i_K) -> weight of ``shape``."""
    k = len(out_dims)
    digits = [d for pair in zip(out_dims, in_dims) for d in pair]
    split = legs.reshape(digits).permute(*range(0, 2 * k, 2), *range(1, 2 * k, 2))
    matrix = split.reshape(math.prod(out_dims), math.prod(in_dims))
    out, cols = shape[0], math.prod(shape[1:])
    if matrix.shape != (out, cols):
        matrix = matrix[:out, :cols]
    return matrix.reshape(shape).contiguous()
