"""Tensor-train (MPO / TT-matrix) baseline over the same physical legs as the trees.

    legs[p_1, ..., p_K] = G_1[0, p_1, :] G_2[:, p_2, :] ... G_K[:, p_K, 0],   G_k (r_k-1, d_k, r_k)

with r_0 = r_K = 1. Linear: the activation is ignored (``tt`` specs carry 'none'). Bond k takes
bond_dims[k-1] capped by what its two sides can carry (``tt_ranks``). ``from_weight`` is the TT-SVD:
left-to-right truncated SVDs of the unfoldings, each from the small Gram matrix of its rows.

The chain is contracted from both ends up to the split bond m that costs least, and the two halves
are joined by one GEMM of N*r_m flops, the only N-sized tensor; the weight, its row blocks and the
distance to a target follow from the two halves (``halves.HalvesGenerator``).
"""

from __future__ import annotations

import math
import torch
from torch import nn

from adntn.errors import AdntnError
from adntn.core.spec import GeneratorSpec
from adntn.networks.halves import HalvesGenerator
from adntn.networks.target import is_narrow
from adntn.networks.ttn import project, top_singular_vectors


def tt_ranks(spec: GeneratorSpec) -> list[int]:
    """r_0 .. r_K: r_k = bond_dims[k-1] capped by the legs on either side of bond k and by the
    neighbouring ranks (r_k <= r_k-1 d_k and r_k <= d_k+1 r_k+1)."""
    dims = spec.leg_dims
    if len(spec.bond_dims) != len(dims) - 1:
        raise AdntnError(f"A TT over {len(dims)} legs needs {len(dims) - 1} bond dimensions, "
                         f"not {len(spec.bond_dims)}.")
    ranks = [1] + [min(chi, math.prod(dims[:k]), math.prod(dims[k:]))
                   for k, chi in enumerate(spec.bond_dims, start=1)] + [1]
    for k in range(1, len(dims)):
        ranks[k] = min(ranks[k], ranks[k - 1] * dims[k - 1])
    for k in range(len(dims) - 1, 0, -1):
        ranks[k] = min(ranks[k], ranks[k + 1] * dims[k])
    return ranks


MOVED_FLOAT_COST = 32  # multiply-adds a CPU core does in the time it moves one float to or from memory


def tt_split(ranks: list[int], dims: tuple[int, ...]) -> int:
    """The bond m at which the chain is cut into halves (d_1..d_m, r_m) and (r_m, d_m+1..d_K).

    Cost model: the join's N r_m multiply-adds plus MOVED_FLOAT_COST per float of the two chains'
    partial products (memory-bound tall-skinny GEMMs), sum_k<=m P_k r_k + sum_k>=m Q_k r_k with
    P_k = d_1...d_k, Q_k = d_k+1...d_K. The least-rank bond is often near one end, where a half is
    nearly N-sized: on VGG-16's fc6 at 2,000x that cut made a weight-space step 9x slower
    (1.9 s against 0.22 s).
    """
    total = math.prod(dims)

    def cost(m: int) -> float:
        moved = sum(math.prod(dims[:k]) * ranks[k] for k in range(1, m + 1))
        moved += sum(math.prod(dims[k:]) * ranks[k] for k in range(m, len(dims)))
        return total * ranks[m] + MOVED_FLOAT_COST * moved

    return min(range(1, len(dims)), key=lambda m: (cost(m), m))


class TT(HalvesGenerator):
    arch = "tt"
    linear_only = True

    @classmethod
    def levels(cls, n_legs: int) -> int:
        """One bond between each pair of neighbouring legs."""
        return n_legs - 1

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        self.ranks = tt_ranks(spec)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.randn(r, d, s) / math.sqrt(r * d))
            for r, d, s in zip(self.ranks, spec.leg_dims, self.ranks[1:])
        )
        self._split = tt_split(self.ranks, spec.leg_dims)

    @classmethod
    def param_count(cls, spec: GeneratorSpec) -> int:
        ranks = tt_ranks(spec)
        return sum(r * d * s for r, d, s in zip(ranks, spec.leg_dims, ranks[1:]))

    @property
    def split(self) -> int:
        return self._split

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Left (d_1...d_m, r_m), rows row-major over legs 1..m, and right (d_m+1...d_K, r_m)."""
        cores = list(self.cores)
        left = cores[0].reshape(-1, self.ranks[1])
        for core in cores[1:self.split]:
            left = (left @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[2])
        right = cores[-1].reshape(self.ranks[-2], -1)
        for core in reversed(cores[self.split:-1]):
            right = (core.reshape(-1, core.shape[2]) @ right).reshape(core.shape[0], -1)
        return left, right.T

    @classmethod
    @torch.no_grad()
    def from_target(cls, spec: GeneratorSpec, target: torch.Tensor) -> TT:
        """TT-SVD: for k = 1..K-1, keep the r_k leading left singular vectors of the unfolding
        (r_k-1 d_k, rest) as G_k and carry their projection of it to the next leg. Where r_k is
        the full r_k-1 d_k, the identity is an exact basis: G_k = I and the unfolding is carried
        as it is (no projected copy; VGG-16's fc6 at 2,000x has r_1 = d_1)."""
        net = cls(spec)
        rest = target
        for core, r, d, s in zip(list(net.cores)[:-1], net.ranks, spec.leg_dims, net.ranks[1:]):
            unfolding = rest.reshape(r * d, -1)
            if s == r * d:
                core.copy_(torch.eye(s).reshape(r, d, s))
                rest = unfolding
                continue
            basis = top_singular_vectors(unfolding, 0, s)
            core.copy_(basis.reshape(r, d, s))
            rest = project(unfolding, 0, basis) if is_narrow(unfolding) else basis.T @ unfolding
        net.cores[-1].copy_(rest.reshape(net.cores[-1].shape))
        return net
