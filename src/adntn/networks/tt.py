"""Tensor-train (MPO / TT-matrix) baseline over the same physical legs as the trees.

    legs[p_1, ..., p_K] = G_1[0, p_1, :] G_2[:, p_2, :] ... G_K[:, p_K, 0],   G_k (r_k-1, d_k, r_k)

with r_0 = r_K = 1. Linear: the activation is ignored (``tt`` specs carry 'none'). Bond k takes
bond_dims[k-1] capped by what its two sides can carry (``tt_ranks``). ``from_weight`` is the TT-SVD:
left-to-right truncated SVDs of the unfoldings, each from the small Gram matrix of its rows.

The chain is contracted from both ends up to the split bond m that costs least, and the two halves
are joined by one GEMM of N*r_m flops, the only N-sized tensor; the weight, its row blocks and the
distance to a target follow from the two halves (``halves.HalvesGenerator``).

Being linear, the chain also applies to an input in any grouping of its legs, not only the two
halves that nonlinear trees are held to: ``linear`` cuts it into three groups (``TTPlan``), each
merged once into one GEMM operand, and contracts the input through them in turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from adntn.errors import AdntnError
from adntn.core.spec import GeneratorSpec
from adntn.core.tensorize import choose_leg_factors
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


GEMM_FULL_WIDTH = 64
"""Columns from which a batched GEMM of a small shared matrix runs at about full speed; narrower
ones ran slower about in proportion (fc7 of VGG-16 at 2,000x, a middle step of 8 columns: 39
against 94 G multiply-adds/s; AMD EPYC, 2 threads)."""


@dataclass(frozen=True)
class TTPlan:
    """How ``TT.linear`` contracts an input: legs [0, m1) form the coarse group L (x, i, a),
    [m1, m2) the middle M (a, y, j, b) (empty when m1 == m2, then a = b), [m2, K) the fine group
    C (b, z, k); x, y, z are the groups' output digit products, i, j, k their input ones and a, b
    the bonds r_m1, r_m2. W[(x, y, z), (i, j, k)] = sum_ab L[x,i,a] M[a,y,j,b] C[b,z,k].
    ``order`` "left" contracts the input's digits i first (L, then M, then C), "right" k first."""

    m1: int
    m2: int
    order: str
    sizes: tuple[int, ...]  # x, i, y, j, z, k, a, b

    def _steps(self) -> list[tuple[int, int | None]]:
        """(multiply-adds per row, columns) of each step of ``TT._product_rows``; columns only for
        the batched GEMMs that share a small left operand (the others are single GEMMs)."""
        x, i, y, j, z, k, a, b = self.sizes
        middle = self.m2 > self.m1
        if self.order == "left":
            steps = [(x * a * i * j * k, j * k), (x * y * b * a * j * k, k) if middle else None,
                     (x * y * b * k * z, None)]
        else:
            steps = [(i * j * k * b * z, None), (i * a * y * j * b * z, z) if middle else None,
                     (x * i * a * y * z, y * z)]
        return [step for step in steps if step is not None]

    def macs_per_row(self) -> int:
        return sum(macs for macs, _ in self._steps())

    def cost_per_row(self) -> float:
        """Multiply-adds, a batched GEMM narrower than GEMM_FULL_WIDTH columns counted as slower
        in proportion, plus the merged operands' values (read once per call)."""
        return sum(macs * max(1.0, GEMM_FULL_WIDTH / width) if width else macs
                   for macs, width in self._steps()) + self.state_values()

    def state_values(self) -> int:
        """Values of the three merged operands."""
        x, i, y, j, z, k, a, b = self.sizes
        return x * i * a + (a * y * j * b if self.m2 > self.m1 else 0) + b * z * k

    def row_values(self) -> int:
        """Values of the larger of the two intermediates, per input row."""
        x, i, y, j, z, k, a, b = self.sizes
        if self.order == "left":
            return max(x * a * j * k, x * y * b * k)
        return max(i * j * b * z, i * a * y * z)


def tt_linear_plan(spec: GeneratorSpec, ranks: list[int]) -> TTPlan:
    """The grouping of least ``TTPlan.cost_per_row`` over every cut m1 <= m2 and both orders. On
    VGG-16's fc6 at 2,000x: legs 1-3 | 4 | 5-8, 30.8 M multiply-adds a row and 0.24% of the dense
    weight's values, against 61.6 M and 0.94% for the two halves at the fit's split."""
    out_dims, in_dims, n_legs = spec.out_dims, spec.in_dims, len(spec.leg_dims)
    plans = []
    for m1 in range(1, n_legs):
        for m2 in range(m1, n_legs):
            sizes = (math.prod(out_dims[:m1]), math.prod(in_dims[:m1]), math.prod(out_dims[m1:m2]),
                     math.prod(in_dims[m1:m2]), math.prod(out_dims[m2:]), math.prod(in_dims[m2:]),
                     ranks[m1], ranks[m2])
            plans += [TTPlan(m1, m2, order, sizes) for order in ("left", "right")]
    return min(plans, key=lambda p: (p.cost_per_row(), p.m1, p.m2, p.order))


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
        self.linear_plan = tt_linear_plan(spec, self.ranks)

    @classmethod
    def leg_factors(cls, rows: int, cols: int, n_legs: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``choose_leg_factors``'s digits: the forward groups the legs by its own plan (``TTPlan``),
        not by the halves."""
        return choose_leg_factors(rows, cols, n_legs)

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

    # ------------------------------------------------------------------ inference without W

    def _group(self, lo: int, hi: int) -> torch.Tensor:
        """Cores lo..hi-1 merged: (r_lo, o_lo...o_hi-1, i_lo...i_hi-1, r_hi), digits row-major."""
        out_dims, in_dims = self.spec.out_dims, self.spec.in_dims
        group = self.cores[lo].reshape(self.ranks[lo], out_dims[lo], in_dims[lo], self.ranks[lo + 1])
        for k in range(lo + 1, hi):
            core = self.cores[k].reshape(self.ranks[k], out_dims[k], in_dims[k], self.ranks[k + 1])
            group = torch.einsum("aoib,bpjc->aopijc", group, core).reshape(
                self.ranks[lo], group.shape[1] * out_dims[k], group.shape[2] * in_dims[k], self.ranks[k + 1])
        return group

    def linear_operands(self) -> dict[str, torch.Tensor]:
        """The three groups of ``linear_plan`` as GEMM operands: "left": L as (x a, i), M as
        (y b, a j), C as (b k, z); "right": C as (k, b z), M as (a y, j b), L as (x, i a)."""
        plan, n_legs = self.linear_plan, len(self.spec.leg_dims)
        coarse = self._group(0, plan.m1)[0]          # (x, i, a)
        fine = self._group(plan.m2, n_legs)[..., 0]  # (b, z, k)
        middle = self._group(plan.m1, plan.m2) if plan.m2 > plan.m1 else None  # (a, y, j, b)
        if plan.order == "left":
            ops = {"first": coarse.permute(0, 2, 1).reshape(-1, coarse.shape[1]),
                   "last": fine.permute(0, 2, 1).reshape(-1, fine.shape[1])}
            if middle is not None:
                ops["middle"] = middle.permute(1, 3, 0, 2).reshape(middle.shape[1] * middle.shape[3], -1)
        else:
            ops = {"first": fine.permute(2, 0, 1).reshape(fine.shape[2], -1),
                   "last": coarse.reshape(coarse.shape[0], -1)}
            if middle is not None:
                ops["middle"] = middle.reshape(middle.shape[0] * middle.shape[1], -1)
        return {name: op.contiguous() for name, op in ops.items()}

    def _product_rows(self, flat: torch.Tensor, ops: dict) -> torch.Tensor:
        """y = flat W^T through the three groups; flat (n, i j k) -> (n, x y z).
          left:  T[n, (x a), (j k)] = L (x a, i) @ X[n]; T[(n x), (y b), k] = M (y b, a j) @ T;
                 y[(n x y), z] = T (n x y, b k) @ C (b k, z)
          right: U[(n i j), (b z)] = X (n i j, k) @ C (k, b z); U[(n i), (a y), z] = M (a y, j b) @ U;
                 y[n, x, (y z)] = L (x, i a) @ U[n]
        Every step is one GEMM or one batched GEMM with a shared left operand, and each output is
        laid out as the next step reads it: no copies."""
        n = flat.shape[0]
        x, i, y, j, z, k, a, b = self.linear_plan.sizes
        middle = ops.get("middle")
        if self.linear_plan.order == "left":
            t = ops["first"] @ flat.reshape(i, j * k) if n == 1 else torch.matmul(ops["first"], flat.reshape(n, i, j * k))
            if middle is not None:
                t = torch.matmul(middle, t.reshape(n * x, a * j, k))
            return (t.reshape(n * x * y, b * k) @ ops["last"]).view(n, x * y * z)
        u = flat.reshape(n * i * j, k) @ ops["first"]
        if middle is not None:
            u = torch.matmul(middle, u.view(n * i, j * b, z))
        last = ops["last"]
        out = last @ u.view(i * a, y * z) if n == 1 else torch.matmul(last, u.view(n, i * a, y * z))
        return out.reshape(n, x * y * z)

    def linear_row_values(self) -> int:
        """The larger of the two intermediates of ``_product_rows``, per input row: ``linear``
        takes the batch in chunks of them that fill a cache block."""
        return self.linear_plan.row_values()

    def linear_macs(self, batch: int) -> int:
        return batch * self.linear_plan.macs_per_row()

    def linear_state_bytes(self) -> int:
        return 4 * self.linear_plan.state_values()

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
