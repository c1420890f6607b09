"""Augmented TTN (aTTN): a TTN followed by one layer of disentanglers on the physical legs.

    legs = U_1 U_3 ... U_K-3 TTN.legs(),   U_k = I + P_k Q_k^T on the joint leg (k, k+1)

The pairs (k, k+1), k = 1, 3, ..., K-3, are the neighbouring legs that straddle a boundary between
two subtrees, the places a tree correlates worst (K/2 - 1 disentanglers, none for K = 2). Each U_k
is linear and acts on the rows of one root message, except the middle one (k = K/2 - 1), which
straddles the root split. So the others are applied to the small messages L = U_left (M_l R) and
M = U_right M_r (P*chi*rank flops each), and only the middle one meets the N-sized tensor:

    legs[x, (u, v), y] = sum_b L[x, u, b] M[v, y, b] + sum_r P[(u, v), r] C[x, r, y]
    C[x, r, y]         = sum_uvb Q[(u, v), r] L[x, u, b] M[v, y, b]          (from the messages)

The correction is accumulated in place into the GEMM's output, so generating the legs writes one
N-sized tensor, like the TTN, and ``squared_distance`` needs none. ``forward`` writes the weight
matrix directly the same way: the TTN's regrouped GEMM (``halves.halves_product``), then, for each
rank r, P[:, r] (x) C[:, r, :] added in place as a broadcast product over the weight's row and
column digits (``_AddMiddle``; no N-sized permutation). ``from_weight`` is the TTN's hierarchical
SVD with every U_k = I (P = 0), so its initial error equals the TTN's.

Applied to an input (``correct_linear``), the correction maps the middle pair's column digits to
its row digits through P, rank by rank, and the other legs' through the halves: it is cheapest when
the middle pair carries row digits only, or column digits only. ``placed`` moves the digits between
the legs for the halves' product and the correction together, counting the values the forward
copies as well as its multiply-adds (VGG-16's fc7 at 2,027x: 4.7 M multiply-adds a row at batch 32
become 2.7 M; fc6 at 2,000x no longer copies a half at every forward).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import nn

from adntn.core.contract import einsum_copies, einsum_macs, gemm_einsum
from adntn.core.spec import GeneratorSpec
from adntn.networks.base import Disentangler, contraction, pairwise_einsum
from adntn.networks.halves import MIN_BLOCK_SIDE, BilinearForm, HalvesGenerator, digits_first, halves_macs, halves_order
from adntn.networks.target import BatchedTargetProduct, is_narrow
from adntn.networks.ttn import TTN, tree_bonds


def boundary_pairs(n_legs: int) -> range:
    """First legs k of the pairs (k, k+1) that straddle two subtrees: 1, 3, ..., n_legs - 3."""
    return range(1, n_legs - 2, 2)


def boundary_height(k: int, level: int = 0) -> int:
    """How high in the tree the boundary between legs k and k+1 of ``level`` lies: the height of
    the lowest node above both (the root's split is the highest)."""
    position = k + 1
    return level + (position & -position).bit_length() - 1


def mix_pair(mixer: Disentangler, state: torch.Tensor, dims: tuple[int, ...], k: int) -> torch.Tensor:
    """``mixer`` (x -> x + P Q^T x) on legs (k, k+1) of ``state``, whose leading axes are legs
    ``dims``."""
    view = state.reshape(math.prod(dims[:k]), dims[k] * dims[k + 1], -1)
    return mixer(view).reshape(state.shape)


class _AddMiddle(torch.autograd.Function):
    """W += sum_r p[r, a, b] c[r, x, y, i, j] in place, W viewed as (x, a, y, i, b, j).

    With W the weight matrix, a = (o_u, o_v) and b = (i_u, i_v) are the row and column digits of the
    middle pair and x, y, i, j the others. The backward passes the gradient G on untouched and
    contracts it with c and with p by batched GEMMs on its own layout: autograd's broadcast
    backward would multiply then reduce (about twice as slow) and clone G for the in-place update.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(p, c)
        ctx.mark_dirty(weight)
        _, a, b = p.shape
        _, x, y, i, j = c.shape
        grid = weight.view(x, a, y, i, b, j)
        for p_r, c_r in zip(p, c):
            grid.addcmul_(p_r.reshape(1, a, 1, 1, b, 1), c_r.reshape(x, 1, y, i, 1, j))
        return weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p, c = ctx.saved_tensors
        _, a, b = p.shape
        _, x, y, i, j = c.shape
        grid = grad.reshape(x, a, y * i, b, j)
        grad_p = torch.stack([torch.matmul(grid, c_r.reshape(x, 1, y * i, j, 1)).sum((0, 2)).reshape(a, b)
                              for c_r in c])
        grad_c = torch.stack([torch.matmul(p_r.reshape(1, a, 1, 1, b), grid).sum(1).reshape(x, y, i, j)
                              for p_r in p])
        return grad, grad_p, grad_c


# the middle correction's action on the input, by index: X n a c d g = (batch, i_x, i_u, i_v, i_y);
# P u c w d r = (o_u, i_u, o_v, i_v, rank); L and M the halves in the layout of the GEMM operands
# that hold them (x s b a t or a t b x s; b q g p y or q g p y b, with (s, t) = (o_u', i_u') and
# (p, q) = (o_v', i_v') the digits of the middle legs u', v'); Q s t p q r folded into one of them
MIDDLE_OUT = "nxuwy"
L_VIEW = {"left": "xsbat", "right": "atbxs"}
M_VIEW = {"left": "bqgpy", "right": "qgpyb"}
L_FOLDED, M_FOLDED = "xapqbr", "ygstbr"
Q_VIEW = "stpqr"
FOLD_SHARE = 0.01  # see middle_fold
#: a placement of the digits other than the halves' own (``oriented_leg_factors``) is taken only
#: where it saves at least this share of the factorized forward's ``forward_cost`` (``placed``)
PLACEMENT_GAIN = 0.05
PLACEMENT_BATCHES = (1, 256)  # the batches whose cost a row ``placed`` adds up
#: multiply-adds one value copied by the forward counts as in ``forward_cost``: fitted on VGG-16's
#: fc6 at 2,000x over placements that trade copies for multiply-adds (Intel Xeon, 2 threads), a
#: copied value took 0.66-0.96 ns and a multiply-add 0.006-0.018 ns, more at batch 256 than at 1
COPY_COST = 64

Digits = tuple[int, int, int, int, int, int, int, int]


def middle_digits(out_dims: tuple[int, ...], in_dims: tuple[int, ...]) -> Digits:
    """(ox, ix, ou, iu, ov, iv, oy, iy): row and column digit products of legs 1..K/2-2 (x),
    the middle pair u = K/2-1, v = K/2, and legs K/2+1..K (y)."""
    half = len(out_dims) // 2
    return (math.prod(out_dims[:half - 1]), math.prod(in_dims[:half - 1]), out_dims[half - 1], in_dims[half - 1],
            out_dims[half], in_dims[half], math.prod(out_dims[half + 1:]), math.prod(in_dims[half + 1:]))


def middle_fold(digits: Digits, chi: int, rank: int, params: int, dense_params: int) -> str | None:
    """Which half Q is folded into for the middle correction: "left" (L Q: o_x i_x d_v b r values)
    or "right" (M Q: o_y i_y d_u b r), the smaller; the other half is read from the main GEMM
    operand that already holds it. None (Q stays apart, contracted at each forward) when the folded
    half would take the layer's inference memory (``params`` cores, the halves' operands and the
    fold) above ``FOLD_SHARE`` of the dense weight's values: folding buys 1.1-1.7x on the
    correction at batch 1-32 and nothing at 256 (measured on VGG-16's fc6 and fc7)."""
    ox, ix, ou, iu, ov, iv, oy, iy = digits
    side = "left" if ox * ix * ov * iv <= oy * iy * ou * iu else "right"
    folded = chi * rank * min(ox * ix * ov * iv, oy * iy * ou * iu)
    inference = params + chi * (ox * ou * ix * iu + ov * oy * iv * iy) + folded
    return side if inference <= FOLD_SHARE * dense_params else None


def middle_shapes(digits: Digits, chi: int, rank: int, order: str, fold: str | None,
                  batch: int) -> tuple[str, list[tuple[int, ...]]]:
    """The middle correction's equation and operand shapes for ``batch`` rows in the halves'
    ``order`` with Q folded as ``fold`` says (``ATTN.linear_operands`` builds these operands)."""
    ox, ix, ou, iu, ov, iv, oy, iy = digits
    views = {"left": {"l": (ox, ou, chi, ix, iu), "m": (chi, iv, iy, ov, oy)},
             "right": {"l": (ix, iu, chi, ox, ou), "m": (iv, iy, ov, oy, chi)}}[order]
    head = [(batch, ix, iu, iv, iy), (ou, iu, ov, iv, rank)]
    if fold == "left":
        return (f"nacdg,ucwdr,{L_FOLDED},{M_VIEW[order]}->{MIDDLE_OUT}",
                head + [(ox, ix, ov, iv, chi, rank), views["m"]])
    if fold == "right":
        return (f"nacdg,ucwdr,{L_VIEW[order]},{M_FOLDED}->{MIDDLE_OUT}",
                head + [views["l"], (oy, iy, ou, iu, chi, rank)])
    return (f"nacdg,ucwdr,{L_VIEW[order]},{Q_VIEW},{M_VIEW[order]}->{MIDDLE_OUT}",
            head + [views["l"], (ou, iu, ov, iv, rank), views["m"]])


def _forward_plan(spec: GeneratorSpec, chi: int, rank: int, batch: int
                  ) -> tuple[str, tuple[int, int, int, int], tuple[str, tuple[tuple[int, ...], ...]] | None]:
    """The halves' order, their blocks (x, i, y, j) and the middle correction's equation and
    shapes (None at rank 0) of the factorized forward on ``batch`` rows, from the spec alone."""
    half = spec.n_legs // 2
    out_dims, in_dims = spec.out_dims, spec.in_dims
    blocks = (math.prod(out_dims[:half]), math.prod(in_dims[:half]),
              math.prod(out_dims[half:]), math.prod(in_dims[half:]))
    order = halves_order(*blocks)
    if not rank:
        return order, blocks, None
    digits = middle_digits(out_dims, in_dims)
    fold = middle_fold(digits, chi, rank, spec.core_params, spec.dense_params)
    equation, shapes = middle_shapes(digits, chi, rank, order, fold, batch)
    return order, blocks, (equation, tuple(shapes))


def forward_macs(spec: GeneratorSpec, chi: int, rank: int, batch: int) -> int:
    """Multiply-adds of the factorized forward (halves' product plus middle correction of
    ``rank``, none at 0) for ``batch`` rows, from the spec's digits and the root bond ``chi``."""
    _, _, middle = _forward_plan(spec, chi, rank, batch)
    main = batch * chi * halves_macs(spec.out_dims, spec.in_dims, spec.n_legs // 2)
    return main + (0 if middle is None else einsum_macs(*middle))


def forward_copies(spec: GeneratorSpec, chi: int, rank: int, batch: int) -> int:
    """Values the factorized forward copies for ``batch`` rows besides its GEMMs' reads: in the
    halves' "right" order the intermediate U (n i y b) and the output (n x y), and what the middle
    correction's einsum copies (``einsum_copies``: its operands are contiguous)."""
    order, (x, i, y, _), middle = _forward_plan(spec, chi, rank, batch)
    main = batch * (i * y * chi + x * y) if order == "right" else 0
    return main + (0 if middle is None else einsum_copies(*middle))


def forward_cost(spec: GeneratorSpec, chi: int, rank: int) -> int:
    """What ``placed`` minimises: multiply-adds plus ``COPY_COST`` per copied value, a row, summed
    over ``PLACEMENT_BATCHES``."""
    return sum((forward_macs(spec, chi, rank, batch) + COPY_COST * forward_copies(spec, chi, rank, batch)) // batch
               for batch in PLACEMENT_BATCHES)


def _group_digits(dims: tuple[int, ...], start: tuple[int, ...]) -> dict[int, tuple[int, ...]]:
    """For each row product a group of legs of ``dims`` can carry: the per-leg row digits nearest
    ``start`` (fewest prime moves, in log terms) that make it."""
    best: dict[int, tuple[float, tuple[int, ...]]] = {}
    for digits in itertools.product(*([d for d in range(1, dim + 1) if dim % d == 0] for dim in dims)):
        moved = sum(abs(math.log(a / b)) for a, b in zip(digits, start))
        product = math.prod(digits)
        if product not in best or moved < best[product][0]:
            best[product] = (moved, digits)
    return {product: digits for product, (_, digits) in best.items()}



class ATTN(HalvesGenerator):
    arch = "attn"
    mix_rank = 1

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        self.tree = TTN(replace(spec, arch="ttn", mix_rank=0, mix_ranks=None))
        dims = spec.leg_dims
        active = [(k, r) for k, r in zip(boundary_pairs(len(dims)), spec.disentangler_ranks) if r > 0]
        self.pairs = [k for k, _ in active]  # the first legs of the pairs that have a disentangler
        self.mixers = nn.ModuleList(Disentangler(dims[k] * dims[k + 1], r) for k, r in active)

    def unmixed(self) -> TTN | ATTN:
        """The tree (whose cores are this generator's) while every disentangler is the identity
        (P = 0): then the weight is the tree's, bit for bit, and a fit that keeps the
        disentanglers need not pay for their correction (VGG-16's fc6 at 2,000x: an activation-space
        step 1.4-1.6 s against 2.3-2.4 s; bench/results/attn-unmixed.md)."""
        return self.tree if all(not bool(mixer.p.any()) for mixer in self.mixers) else self

    @classmethod
    def placed(cls, spec: GeneratorSpec) -> GeneratorSpec:
        """``spec`` with the digits moved between its legs where that makes the factorized forward,
        the halves' product and the middle correction together, at least ``PLACEMENT_GAIN``
        cheaper (``forward_cost``: multiply-adds and copied values).

        The correction's cost falls as the middle pair carries fewer row (or fewer column)
        digits, which ``oriented_leg_factors`` (placing for the halves alone) does not see; and
        its GEMMs read the cached halves without a copy only where the middle legs' digits do not
        split a half's contracted axes. The candidates are every split of the row digits between
        the outer groups of legs and the middle pair, costed on shapes alone (no tensor is
        built). Every leg keeps its dim, so the tree, its parameters and bonds stay; the halves'
        blocks keep each side at least ``MIN_BLOCK_SIDE`` (or the spec's own smallest side, if
        thinner), and within the outer groups of legs the row digits stay as near the spec's as
        they can. On VGG-16's fc6 at 2,000x the forward at batch 1 copied a whole half of the
        weight's factors (683 K values) and now copies 11 K; on fc7 at 2,027x 4.7 M multiply-adds a
        row at batch 32 become 2.7 M."""
        dims, half = spec.leg_dims, spec.n_legs // 2
        ranks = spec.disentangler_ranks
        middle = list(boundary_pairs(spec.n_legs)).index(half - 1) if spec.n_legs > 2 else None
        rank = 0 if middle is None else ranks[middle]
        if rank == 0:
            return spec
        chi = tree_bonds(spec)[-1][1]

        def sides(out_dims: tuple[int, ...], in_dims: tuple[int, ...]) -> int:
            return min(math.prod(out_dims[:half]), math.prod(in_dims[:half]),
                       math.prod(out_dims[half:]), math.prod(in_dims[half:]))

        floor = min(MIN_BLOCK_SIDE, sides(spec.out_dims, spec.in_dims))
        rows = math.prod(spec.out_dims)
        left = _group_digits(dims[:half - 1], spec.out_dims[:half - 1])
        right = _group_digits(dims[half + 1:], spec.out_dims[half + 1:])
        base_cost = forward_cost(spec, chi, rank)
        best, best_cost = spec, base_cost
        for ox, left_digits in left.items():
            for ou in (d for d in range(1, dims[half - 1] + 1) if dims[half - 1] % d == 0):
                for ov in (d for d in range(1, dims[half] + 1) if dims[half] % d == 0):
                    oy, rest = divmod(rows, ox * ou * ov)
                    if rest or oy not in right:
                        continue
                    out_dims = (*left_digits, ou, ov, *right[oy])
                    in_dims = tuple(d // o for d, o in zip(dims, out_dims))
                    if sides(out_dims, in_dims) < floor:
                        continue
                    candidate = replace(spec, out_dims=out_dims, in_dims=in_dims)
                    candidate_cost = forward_cost(candidate, chi, rank)
                    if candidate_cost < best_cost:
                        best, best_cost = candidate, candidate_cost
        return best if best_cost <= (1 - PLACEMENT_GAIN) * base_cost else spec

    @classmethod
    def disentangler_sides(cls, spec: GeneratorSpec) -> list[tuple[int, int]]:
        dims = spec.leg_dims
        return [(dims[k], dims[k + 1]) for k in boundary_pairs(len(dims))]

    @classmethod
    def disentangler_order(cls, spec: GeneratorSpec) -> list[int]:
        """The pair straddling the root first, then by how high the boundary lies, cheaper first."""
        dims = cls.disentangler_dims(spec)
        pairs = list(boundary_pairs(spec.n_legs))
        return sorted(range(len(pairs)), key=lambda i: (-boundary_height(pairs[i]), dims[i], i))

    @classmethod
    def param_count(cls, spec: GeneratorSpec) -> int:
        mixers = sum(Disentangler.param_count(d, r)
                     for d, r in zip(cls.disentangler_dims(spec), spec.disentangler_ranks))
        return TTN.param_count(replace(spec, arch="ttn", mix_rank=0, mix_ranks=None)) + mixers

    @classmethod
    @torch.no_grad()
    def from_target(cls, spec: GeneratorSpec, target: torch.Tensor) -> ATTN:
        """The TTN's hierarchical SVD (and gain calibration); disentanglers at the identity."""
        net = cls(spec)
        net.tree = TTN.from_target(net.tree.spec, target)
        return net

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """L (P_left, chi) and M (P_right, chi): the TTN's halves with the off-middle disentanglers
        applied (the middle one is ``middle``)."""
        left, right = self.tree.halves()
        dims, half = self.spec.leg_dims, self.split
        for k, mixer in zip(self.pairs, self.mixers):
            if k + 1 < half:
                left = mix_pair(mixer, left, dims[:half], k)
            elif k >= half:
                right = mix_pair(mixer, right, dims[half:], k - half)
        return left, right

    @property
    def middle(self) -> Disentangler | None:
        """The disentangler on the pair (K/2-1, K/2) that straddles the root (None when K = 2)."""
        half = self.split
        return next((mixer for k, mixer in zip(self.pairs, self.mixers) if k + 1 == half), None)

    def _middle_shape(self) -> tuple[int, int, int]:
        """(x, u*v, y): the leg tensor around the middle pair (u, v) = legs (K/2-1, K/2)."""
        dims, half = self.spec.leg_dims, self.spec.n_legs // 2
        return math.prod(dims[:half - 1]), dims[half - 1] * dims[half], math.prod(dims[half + 1:])

    def _middle_coefficients(self, left: torch.Tensor, right: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """C[x, r, y] = sum_uvb factor[(u, v), r] L[x, u, b] M[v, y, b], factor (u*v, rank)."""
        dims, half = self.spec.leg_dims, self.spec.n_legs // 2
        u, v = dims[half - 1], dims[half]
        left = left.reshape(-1, u, left.shape[1])
        right = right.reshape(v, -1, right.shape[1])
        factor = factor.reshape(u, v, -1)
        expr = contraction("xub,vyb,uvr->xry", tuple(left.shape), tuple(right.shape), tuple(factor.shape))
        return expr(left, right, factor)

    def legs(self) -> torch.Tensor:
        left, right = self.halves()
        legs = left @ right.T.contiguous()
        middle = self.middle
        if middle is not None:
            x, joint, _ = self._middle_shape()
            coeff = self._middle_coefficients(left, right, middle.q)
            legs.view(x, joint, -1).baddbmm_(middle.p.expand(x, -1, -1), coeff)
        return legs.reshape(self.spec.leg_dims)

    def correct_matrix(self, product: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """The TTN's matrix plus the middle correction, added in place (``_AddMiddle``)."""
        middle = self.middle
        if middle is None:
            return product
        p, c = self._middle_terms(left, right, middle)
        return _AddMiddle.apply(product, p.flatten(1, 2).flatten(2, 3), c)

    def _middle_terms(self, left: torch.Tensor, right: torch.Tensor, middle: Disentangler
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The middle correction sum_r p[r, (o_u, o_v), (i_u, i_v)] c[r, x, y, i, j] in the weight's
        digits: p (r, o_u, o_v, i_u, i_v) and c (r, x, y, i, j), with x, i the row and column digits
        of legs 1..K/2-2 and y, j those of legs K/2+2..K."""
        half = self.spec.n_legs // 2
        coeff = self._middle_coefficients(left, right, middle.q)
        rows, cols = self.spec.out_dims, self.spec.in_dims
        p = middle.p.reshape(rows[half - 1], cols[half - 1], rows[half], cols[half], -1).permute(4, 0, 2, 1, 3)
        c = digits_first(coeff, rows[:half - 1], cols[:half - 1])  # (ox, ix, r, y)
        c = digits_first(c.permute(3, 0, 1, 2), rows[half + 1:], cols[half + 1:])  # (oy, iy, ox, ix, r)
        return p, c.permute(4, 2, 0, 3, 1)

    def corrected_rows(self, rows: Iterator[tuple[int, torch.Tensor]], left: torch.Tensor,
                       right: torch.Tensor) -> Iterator[torch.Tensor]:
        """Without autograd: the TTN's row blocks (``halves_rows``), each with its share of the
        middle correction. Block (X, Y, I, J) with X = (x, o_u), Y = (o_v, y), I = (i, i_u),
        J = (i_v, j) gets p[:, o_u] (o_v, i_u, i_v) (x) c[:, x] (y, i, j). (For the whole weight,
        one such pass over it all is faster: 77 against 108 ms for VGG-16's fc6 at 50,000x.)"""
        middle = self.middle
        if middle is None:
            yield from (block for _, block in rows)
            return
        p, c = self._middle_terms(left, right, middle)
        _, o_u, o_v, i_u, i_v = p.shape
        _, _, y, i, j = c.shape
        for row, block in rows:
            x, u = divmod(row, o_u)
            grid = block.view(o_v, y, i, i_u, i_v, j)
            for p_r, c_r in zip(p[:, u], c[:, x]):
                grid.addcmul_(p_r.reshape(o_v, 1, 1, i_u, i_v, 1), c_r.reshape(1, y, i, 1, 1, j))
            yield block

    # ------------------------------------------------------------------ inference without W

    def _middle_digits(self) -> Digits:
        """The spec's ``middle_digits``."""
        return middle_digits(self.spec.out_dims, self.spec.in_dims)

    def _middle_fold(self) -> str | None:
        """Which half Q is folded into for the correction (``middle_fold``)."""
        chi = self._digit_sizes()[4]
        params = sum(p.numel() for p in self.parameters())
        return middle_fold(self._middle_digits(), chi, self.middle.p.shape[1], params, self.spec.dense_params)

    def _half_views(self, ops: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """L and M as views of the main GEMM operands (no copy): in ``linear_order`` "left",
        A = (o_x, o_u, b, i_x, i_u) and B = (b, i_v, i_y, o_v, o_y); in "right", B =
        (i_x, i_u, b, o_x, o_u) and A = (i_v, i_y, o_v, o_y, b)."""
        ox, ix, ou, iu, ov, iv, oy, iy = self._middle_digits()
        chi = self._digit_sizes()[4]
        if self.linear_order == "left":
            return ops["a"].reshape(ox, ou, chi, ix, iu), ops["b"].reshape(chi, iv, iy, ov, oy)
        return ops["b"].reshape(ix, iu, chi, ox, ou), ops["a"].reshape(iv, iy, ov, oy, chi)

    def linear_operands(self) -> dict[str, torch.Tensor]:
        """The TTN's operands and, with a middle disentangler, its correction's (see
        ``correct_linear``): "middle" = (equation, (P, folded, view)), with P (o_u, i_u, o_v,
        i_v, r) a view of the cores, folded = L Q or M Q (``_middle_fold``, the only tensor it
        adds) and view the other half, a view of the main operands; without a fold, (P, L, Q, M)
        with both halves views."""
        left, right = self.halves()
        ops = self.halves_operands(left, right)
        middle = self.middle
        if middle is None:
            return ops
        ox, ix, ou, iu, ov, iv, oy, iy = self._middle_digits()
        rank = middle.p.shape[1]
        q = middle.q.reshape(ou, iu, ov, iv, rank)
        half_l, half_m = self._half_views(ops)
        order = self.linear_order
        fold = self._middle_fold()
        if fold == "left":
            folded = torch.einsum(f"{L_VIEW[order]},{Q_VIEW}->{L_FOLDED}", half_l, q).contiguous()
            equation, operands = f"nacdg,ucwdr,{L_FOLDED},{M_VIEW[order]}->{MIDDLE_OUT}", (folded, half_m)
        elif fold == "right":
            folded = torch.einsum(f"{M_VIEW[order]},{Q_VIEW}->{M_FOLDED}", half_m, q).contiguous()
            equation, operands = f"nacdg,ucwdr,{L_VIEW[order]},{M_FOLDED}->{MIDDLE_OUT}", (half_l, folded)
        else:
            equation = f"nacdg,ucwdr,{L_VIEW[order]},{Q_VIEW},{M_VIEW[order]}->{MIDDLE_OUT}"
            operands = (half_l, q, half_m)
        ops["middle"] = (equation, (middle.p.reshape(ou, iu, ov, iv, rank), *operands))
        return ops

    def correct_linear(self, out: torch.Tensor, flat: torch.Tensor, ops: dict) -> torch.Tensor:
        """``out`` plus the middle disentangler's correction applied to the padded input.

        On the legs the correction is E[x, (u, v), y] = sum_r P[(u, v), r] C[x, r, y] with
        C[x, r, y] = sum_{u'v'b} Q[(u', v'), r] L[x, u', b] M[v', y, b]. Splitting every leg into
        its row and column digits (x = (o_x, i_x), u = (o_u, i_u), ...), its action on
        X[n, i_x, i_u, i_v, i_y] (the padded input) is exactly

            dy[n, o_x, o_u, o_v, o_y] = sum_{r, b, u', v', i_x, i_u, i_v, i_y}
                P[(o_u, i_u), (o_v, i_v), r] L[o_x, i_x, u', b] Q[u', v', r] M[v', (o_y, i_y), b] X[n, i_x, i_u, i_v, i_y]

        with Q folded into the smaller half where that fits (``_middle_fold``) and the halves read
        from the main operands, contracted pairwise in the order of fewest flops for the batch, each pair a GEMM
        on the operands' own layouts (``core.contract.gemm_einsum``): no N-sized tensor."""
        if "middle" not in ops:
            return out
        equation, operands = ops["middle"]
        ox, ix, ou, iu, ov, iv, oy, iy = self._middle_digits()
        operands = (flat.view(flat.shape[0], ix, iu, iv, iy), *operands)
        if torch.compiler.is_compiling():  # traced (export, ONNX): pairwise, keeping the batch symbolic
            return out + pairwise_einsum(equation, operands).reshape(out.shape)
        return out + gemm_einsum(equation, *operands).reshape(out.shape)

    def _middle_shapes(self, batch: int) -> tuple[str, list[tuple[int, ...]]]:
        """The correction's equation and operand shapes for ``batch`` rows (``middle_shapes``)."""
        chi, rank = self._digit_sizes()[4], self.middle.p.shape[1]
        return middle_shapes(self._middle_digits(), chi, rank, self.linear_order, self._middle_fold(), batch)

    def _middle_linear_macs(self, batch: int) -> int:
        if self.middle is None:
            return 0
        equation, shapes = self._middle_shapes(batch)
        return einsum_macs(equation, tuple(shapes))

    def linear_macs(self, batch: int) -> int:
        return super().linear_macs(batch) + self._middle_linear_macs(batch)

    def linear_state_bytes(self) -> int:
        """The TTN's operands plus the folded half of the middle correction, if any (``_middle_fold``)."""
        fold = None if self.middle is None else self._middle_fold()
        if fold is None:
            return super().linear_state_bytes()
        _, shapes = self._middle_shapes(1)
        return super().linear_state_bytes() + 4 * math.prod(shapes[2 if fold == "left" else 3])

    def generation_macs(self) -> int:
        middle = self.middle
        return super().generation_macs() + self.spec.rows * self.spec.cols * (0 if middle is None else middle.p.shape[1])

    def squared_distance(self, target_legs: torch.Tensor, target_norm_sq: torch.Tensor) -> torch.Tensor:
        """||Y - T - E||^2 with T = L M^T and E = P C, from the messages and one pass over Y:
        ||Y||^2 - 2<Y, T> - 2<P^T Y, C> + ||T||^2 + 2<C_P, C> + <P^T P, C C^T>,
        C_P being C with P in place of Q (so <T, E> = <C_P, C>)."""
        left, right = self.halves()
        middle = self.middle
        target = target_legs.reshape(left.shape[0], right.shape[0])
        cross = (((left.T @ target) * right.T).sum() if not is_narrow(target)
                 else BilinearForm.apply(left, target, right).diagonal().sum())
        gram = ((left.T @ left) * (right.T @ right)).sum()
        if middle is not None:
            x, joint, y = self._middle_shape()
            coeff = self._middle_coefficients(left, right, middle.q)
            along_p = self._middle_coefficients(left, right, middle.p)
            if not is_narrow(target):
                target_p = torch.bmm(middle.p.T.expand(x, -1, -1), target.reshape(x, joint, y))
                cross = cross + (target_p * coeff).sum()
            else:  # <P^T Y_x, C_x> summed over x = <P, sum_x Y_x C_x^T>
                cross = cross + (middle.p * BatchedTargetProduct.apply(target.reshape(x, joint, y), coeff)).sum()
            coeff_gram = torch.einsum("xry,xsy->rs", coeff, coeff)
            gram = gram + 2 * (along_p * coeff).sum() + ((middle.p.T @ middle.p) * coeff_gram).sum()
        return target_norm_sq - 2 * cross + gram
