"""Nonlinear MERA generator: top-down fine-graining with disentanglers at every level.

Same tree and bonds as the TTN (``tree_bonds``), read top-down: root R (b_l, b_r), node cores
B_(h,j) (a, b, c) as maps c -> (a, b), leaves A_k (d_k, b) (identity when b = d_k). The state S
starts as R (two legs) and is fine-grained layer by layer, h = L-1 .. 1:

    S <- S x_j B_(h,j)          every leg c_j of the layer becomes its two children legs (a_j, b_j)
    S <- prod_j U_(h,j) S       U = I + P Q^T on the legs (2j+1, 2j+2): neighbours, different parents
    S <- sigma_h(S)             gain-normalised (see ``base``), one per layer

and finally legs = prod_k U_(0,k) (S x_k A_k), the physical disentanglers acting on the pairs
(k, k+1), k = 1, 3, ..., K-3, that straddle level-1 nodes (as in the aTTN). That last layer is
linear, so each physical disentangler is folded into its two leaves: the state is contracted with
one small matrix per group of legs, A_0, (I + P Q^T)(A_1 (x) A_2), ..., A_K-1.

Each layer's isometries, and the last layer's groups, are applied as a Kronecker matrix-vector
product (``_kron_apply``): one GEMM per factor that reads the state as a (transposed) matrix and
rotates the new axis to the other end, so the state is never permuted; going first-to-last or
last-to-first, whichever needs fewer flops. The result (N entries) is the only N-sized tensor when
the bonds are smaller than the legs; the one before it is d/b times smaller. Disentanglers are
a batched GEMM and a fused update on the state as it lies (``base.low_rank_update``); a layer's
own disentanglers act inside its chain of GEMMs, as soon as both their legs exist, on a state
still smaller than the layer's result. Without autograd the weight itself is made the same way
one tile at a time (a value of leg 0, and of leg 1 where that is still larger than a streamed
block: cut in the state with identity leaves, through the leaves' rows with matrix ones;
``_tiles``), each tile written into its strided block of the weight while still in cache.
The weight-space fit works in tiles too (``fit_tiles``), from the upper layers' state made once
per step; each tile's sigma, physical disentangler and distance are one fused step
(``base.sigma_mix_distance``).

With ``activation='none'`` and the disentanglers at the identity (P = 0, their initialisation)
this is the linear TTN of the same cores, so ``from_weight`` uses the TTN's hierarchical SVD.

Without the weight: the last layer being linear, W[o, i] = sum_b S[b] prod_g A_g[(o, i)_g, b_g]
with S the state above the leaves, so where S is small (matrix leaves) x W^T is one einsum of x,
the leaf groups and S (``linear``); else the weight is generated a tile at a time, each tile
multiplied into its rows of the output and dropped (``blocked_linear``).
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F

from adntn.core.contract import einsum_macs, gemm_einsum
from adntn.core.spec import GeneratorSpec
from adntn.core.tensorize import copy_in_runs, weight_order
from adntn.memory import current_policy
from adntn.networks.attn import boundary_height, boundary_pairs
from adntn.networks.base import (SIGMA_MIX_ACTIVATIONS, Disentangler, Generator, activation_sites, low_rank_update,
                                 pairwise_einsum, scaled_squared_distance, sigma_mix_distance, traced)
from adntn.networks.halves import direct_output, unpadded
from adntn.networks.ttn import TTN, add_tree_cores, tree_bonds


Factor = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None
#: ``linear`` (x W^T from the state above the leaves and the leaf groups) is offered when that
#: state holds at most 1/FACTORIZED_SHARE of the weight's values: with identity leaves it is nearly
#: the weight itself, and ``blocked_linear`` is the way
FACTORIZED_SHARE = 16
Scaled = tuple[torch.Tensor, torch.Tensor | None]  # a state and the scalar it is still to be multiplied by
Cuts = tuple[tuple[int, slice], ...]  # (leg, slice) pairs
LayerFactors = tuple[list[torch.Tensor], list[int], torch.Tensor | None]  # ``MERA._layer_factors``


def _kron_apply(state: torch.Tensor, factors: list[Factor], in_dims: list[int],
                scale: torch.Tensor | None = None, inplace: bool = False,
                mixers: tuple[list[int], list[tuple[int, Disentangler]]] | None = None) -> torch.Tensor:
    """Contract axis g of ``state`` (legs ``in_dims``) with factors[g]: a matrix (e_g, c_g), a pair
    (P, W) meaning I + P W (P (c_g, r), W (r, c_g)), or None for the identity, and multiply by the
    scalar ``scale`` (folded into a matrix factor when there is one). Returns the flattened
    (e_1, ..., e_n) tensor. ``inplace``: the low-rank factors may overwrite ``state`` (the caller's
    own, no gradient wanted).

    The factors act on different axes, so they commute: the low-rank ones are applied first, in
    place along their axes (``low_rank_update``). The matrices follow as a chain of GEMMs: first to
    last, each step views the state as (c_g, rest) and writes rest x e_g = (state^T) factor^T,
    moving the new axis last; last to first, it views it as (rest, c_g) and writes factor state^T,
    moving it first. After n steps the axes are back in order (an identity axis only rotates).

    ``mixers`` (only with matrix factors, each making two legs): (the output legs, two per factor;
    the disentanglers (k, U_k) on output legs (k, k+1), k odd). Each is applied as soon as the
    factors making its two legs are (they are then neighbours in the rotated layout), while the
    others still hold their smaller bonds: it acts on fewer entries than the finished state.
    """
    if scale is not None:
        matrix_at = next((g for g, f in enumerate(factors) if isinstance(f, torch.Tensor)), None)
        if matrix_at is None:
            state = state * scale
        else:
            factors = [*factors[:matrix_at], factors[matrix_at] * scale, *factors[matrix_at + 1:]]
    for g, factor in enumerate(factors):
        if isinstance(factor, tuple):
            view = state.reshape(math.prod(in_dims[:g]), in_dims[g], -1)
            state = low_rank_update(view, *factor, inplace=inplace)
    matrices = [f if isinstance(f, torch.Tensor) else None for f in factors]
    if all(m is None for m in matrices):
        return state.reshape(-1)
    sizes = [c if m is None else m.shape[0] for m, c in zip(matrices, in_dims)]

    def flops(order: list[int]) -> int:
        size, total = math.prod(in_dims), 0
        for g in order:
            size = size // in_dims[g] * sizes[g]
            total += size * (1 if matrices[g] is None else in_dims[g])
        return total

    first_to_last = list(range(len(factors)))
    last_to_first = first_to_last[::-1]
    forward = flops(first_to_last) <= flops(last_to_first)
    out_legs, pending = mixers if mixers is not None else ([], [])
    ready = {(k + 1) // 2 if forward else (k - 1) // 2: (k, mixer) for k, mixer in pending}
    for g in first_to_last if forward else last_to_first:
        matrix = state.reshape(in_dims[g], -1).T if forward else state.reshape(-1, in_dims[g]).T
        if matrices[g] is None:
            state = matrix
        else:
            # a contiguous factor^T: with the transposed view, autograd's gradient of the factor
            # would be (grad^T matrix)^T, both operands transposed (2x the time on fc6's state)
            state = matrix @ matrices[g].T.contiguous() if forward else matrices[g] @ matrix
        if g in ready:  # layout: (c_g+1.., e_0..e_g) first to last, (e_g..e_n-1, c_0..c_g-1) else
            k, mixer = ready[g]
            made = out_legs[:2 * g + 2] if forward else out_legs[2 * g:]
            at = k if forward else k - 2 * g
            before = math.prod(made[:at]) * (math.prod(in_dims[g + 1:]) if forward else 1)
            view = state.reshape(before, made[at] * made[at + 1], -1)
            state = mixer(view, inplace=inplace)
    return state.reshape(-1)


def _write_weight_order(split: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor) -> None:
    """out = scale * split (``split`` a permuted view of the legs; ``out`` of the same shape, a
    buffer or a tile's strided block of the weight): the permuted copy in runs (``copy_in_runs``),
    then the scale on ``out``, still in cache."""
    copy_in_runs(out, split)
    if scale is not None:
        out.mul_(scale)


def _cut_root(root: torch.Tensor, cuts: dict[int, slice]) -> torch.Tensor:
    """The root (b_1, b_2) of a one-level MERA, each leg k in ``cuts`` cut to its slice (with one
    level the root's axes are the legs)."""
    return root[tuple(cuts.get(k, slice(None)) for k in range(2))]


def _digits(value: int, radices: list[int]) -> list[int]:
    """``value`` in the mixed radix ``radices``, most significant first."""
    digits = []
    for radix in reversed(radices):
        value, digit = divmod(value, radix)
        digits.append(digit)
    return digits[::-1]


def _index(digits: list[int], radices: list[int]) -> int:
    """The value of ``digits`` in the mixed radix ``radices`` (the inverse of ``_digits``)."""
    value = 0
    for digit, radix in zip(digits, radices):
        value = value * radix + digit
    return value


def _slices(size: int, total: int) -> list[slice]:
    """Slices of range(size) covering about one streamed block (``memory.current_policy``) of
    ``total`` entries each (a slice is at least one index)."""
    step = max(1, size * current_policy().block_values() // max(1, total))
    return [slice(start, min(start + step, size)) for start in range(0, size, step)]


class MERA(Generator):
    arch = "mera"
    mix_rank = 1

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        add_tree_cores(self, spec)
        ranks = iter(spec.disentangler_ranks)
        levels = [[(k, r) for k, r in zip(boundary_pairs(len(legs)), ranks) if r > 0]
                  for legs in self._level_legs(spec)]
        self.pairs = [[k for k, _ in level] for level in levels]  # per level: pairs with a disentangler
        self.mixers = nn.ModuleList(
            nn.ModuleList(Disentangler(legs[k] * legs[k + 1], r) for k, r in level)
            for legs, level in zip(self._level_legs(spec), levels)
        )
        self.activations = activation_sites(spec, self.levels - 1)

    @staticmethod
    def _level_legs(spec: GeneratorSpec) -> list[tuple[int, ...]]:
        """The legs the disentanglers of level h act on: physical (h = 0), else bonds[h-1]."""
        bonds = tree_bonds(spec)
        return [spec.leg_dims] + [tuple(bonds[h - 1]) for h in range(1, len(bonds))]

    @classmethod
    def disentangler_sides(cls, spec: GeneratorSpec) -> list[tuple[int, int]]:
        return [(legs[k], legs[k + 1]) for legs in cls._level_legs(spec) for k in boundary_pairs(len(legs))]

    @classmethod
    def disentangler_order(cls, spec: GeneratorSpec) -> list[int]:
        """By how high the boundary each one straddles lies (the root's split first), then cheaper
        first."""
        places = [(h, k) for h, legs in enumerate(cls._level_legs(spec)) for k in boundary_pairs(len(legs))]
        dims = cls.disentangler_dims(spec)
        return sorted(range(len(places)),
                      key=lambda i: (-boundary_height(places[i][1], places[i][0]), dims[i], i))

    @classmethod
    def param_count(cls, spec: GeneratorSpec) -> int:
        mixers = sum(Disentangler.param_count(d, r)
                     for d, r in zip(cls.disentangler_dims(spec), spec.disentangler_ranks))
        return TTN.param_count(replace(spec, arch="ttn", mix_rank=0, mix_ranks=None)) + mixers

    def _leaf_groups(self) -> tuple[list[Factor], list[int]]:
        """The last layer's factors (leaves with the physical disentanglers folded in) and their
        input dims: A_0, (I + P Q^T)(A_k (x) A_k+1) for the pairs, A_K-1 (None: identity). A pair
        of identity leaves stays I + P Q^T, (P, Q^T): a dense (d d') x (d d') matrix would cost
        d d' flops per entry instead of 2 rank."""
        stored = iter(self.leaves)
        leaves = [None if identity else next(stored) for identity in self.leaf_is_identity]
        dims, bonds = self.spec.leg_dims, self.bonds[0]
        factors: list[Factor] = []
        in_dims, k = [], 0
        pairs = iter(zip(self.pairs[0], self.mixers[0]))
        pair = next(pairs, None)
        while k < len(dims):
            if pair is not None and pair[0] == k:
                mixer = pair[1]
                if leaves[k] is None and leaves[k + 1] is None:
                    factors.append((mixer.p, mixer.q.T))
                else:
                    a, b = (torch.eye(dims[i], dtype=self.root.dtype, device=self.root.device)
                            if leaves[i] is None else leaves[i] for i in (k, k + 1))
                    joint = torch.kron(a, b)
                    factors.append(joint + mixer.p @ (mixer.q.T @ joint))
                in_dims.append(bonds[k] * bonds[k + 1])
                pair, k = next(pairs, None), k + 2
            else:
                factors.append(leaves[k])
                in_dims.append(bonds[k])
                k += 1
        return factors, in_dims

    def _state(self, capture: list[torch.Tensor] | None = None, rows: slice | None = None,
               fixed: Cuts = (), upper: Scaled | None = None, activate: bool = True) -> Scaled:
        """The state above the leaves, shape bonds[0] (its first leg cut to ``rows`` when given,
        and each leg k of ``fixed`` to its slice: the bottom layer's cores, or the root with one
        level, are sliced along that child axis; no disentangler may touch those legs, see
        ``_free``, so the result is that slice of the full state), and the scalar it is still to
        be multiplied by (None: 1).

        Each layer's gains are folded into its small factors (``GainedActivation.scales``): the
        layer's gain into its first isometry, the previous layer's 1 / (a sigma'(0)) likewise, and
        the last layer's is returned for the leaves; the linear maps and disentanglers in between
        commute with scalars. So the states, the bottom one weight-sized, pass through sigma alone
        (no gain products on them, forward or backward). ``capture`` collects each layer's largest
        |pre-activation|, top layer first, of the network without activations (used to calibrate
        the gains; a reduction, so no state is kept and none is copied). ``upper``: the
        ``_upper_state()`` a caller building many slices made once; ``activate`` False leaves out
        the bottom layer's sigma."""
        cuts = dict(fixed) if rows is None else {0: rows, **dict(fixed)}
        state, pending = self._upper_state(capture) if upper is None else upper
        if self.levels == 1:
            return _cut_root(state, cuts), pending
        return self._layer(1, state, pending, capture, cuts, activate)

    def _upper_state(self, capture: list[torch.Tensor] | None = None) -> Scaled:
        """The state entering the bottom layer (layers L-1 .. 2 applied; the root with one or two
        levels) and its pending scale."""
        state, pending = self.root, None
        for h in range(self.levels - 1, 1, -1):
            state, pending = self._layer(h, state, pending, capture)
        return state, pending

    def _layer(self, h: int, state: torch.Tensor, pending: torch.Tensor | None,
               capture: list[torch.Tensor] | None = None, cuts: dict[int, slice] | None = None,
               activate: bool = True) -> Scaled:
        """Layer h on ``state`` (legs bonds[h]): its isometries, the child axis of leg k cut to
        ``cuts[k]``, its disentanglers, and its sigma when ``activate``. The input state is only
        read (every factor is a matrix), so it may be shared; the output is overwritten in place
        when no gradient is wanted."""
        factors, legs, pending = self._layer_factors(h, pending, cuts)
        return self._layer_apply(h, state, factors, list(self.bonds[h]), legs, capture, activate), pending

    def _layer_factors(self, h: int, pending: torch.Tensor | None, cuts: dict[int, slice] | None = None,
                       made: LayerFactors | None = None) -> LayerFactors:
        """Layer h's isometries as matrices (a b, c), cut as in ``_layer``, the layer's gain (and
        the scale pending from above) folded into the first; its output legs; the scale pending
        after its sigma. ``made``: this call's result without ``cuts`` (for the same ``pending``),
        made once by a caller cutting the layer many times (each cut is then rows of a view)."""
        if made is None:
            first = sum(len(self.bonds[g]) for g in range(1, h))
            cores = list(self.nodes)[first:first + len(self.bonds[h])]
            factors = [core.reshape(-1, core.shape[2]) for core in cores]
            activation = self.activations[h - 1] if len(self.activations) else None
            if activation is not None:
                gain, out_scale = activation.scales()
                factors[0] = factors[0] * (gain if pending is None else gain * pending)
                pending = out_scale
            made = factors, list(self.bonds[h - 1]), pending
        factors, legs, pending = made
        if cuts:
            factors, legs = list(factors), list(legs)
            for k, cut in cuts.items():
                j, axis = divmod(k, 2)
                node = factors[j].reshape(legs[2 * j], legs[2 * j + 1], -1)
                node = node[cut] if axis == 0 else node[:, cut]
                factors[j], legs[k] = node.reshape(-1, node.shape[2]), node.shape[axis]
        return factors, legs, pending

    def _layer_apply(self, h: int, state: torch.Tensor, factors: list[Factor], in_dims: list[int],
                     legs: list[int], capture: list[torch.Tensor] | None = None,
                     activate: bool = True) -> torch.Tensor:
        """``factors`` (None: an isometry already applied) on ``state`` (axes ``in_dims``), then
        layer h's disentanglers and (``activate``) sigma: the state of legs ``legs``."""
        own = not torch.is_grad_enabled()  # states made here may be overwritten
        state = _kron_apply(state, factors, in_dims, inplace=own,
                            mixers=(legs, list(zip(self.pairs[h], self.mixers[h]))))
        state = state.reshape(legs)
        if capture is not None:
            capture.append(torch.linalg.vector_norm(state, math.inf))
        activation = self.activations[h - 1] if len(self.activations) and activate else None
        return state if activation is None else activation.sigma(state, inplace=own)

    def legs(self, rows: slice | None = None) -> torch.Tensor:
        """The leg tensor, or with ``rows`` its slice ``legs[rows]`` along leg 0, computed alone."""
        legs, scale = self._scaled_legs(rows)
        return legs if scale is None else legs * scale

    def _scaled_legs(self, rows: slice | None = None, fixed: Cuts = (), upper: Scaled | None = None) -> Scaled:
        """(X, s) with ``legs(rows) == s * X`` (s None: 1), also cut along each identity leg k of
        ``fixed`` to its slice (``upper``: see ``_state``). The last layer's scale is folded into
        a leaf factor when there is a dense one; else it is returned, for the caller to fuse into
        its own pass over X (the distance, the write into weight order)."""
        in_state = tuple((k, cut) for k, cut in fixed if self.leaf_is_identity[k])  # the rest cut leaf rows
        if rows is not None and self.leaf_is_identity[0]:
            return self._leaves(self._state(rows=rows, fixed=in_state, upper=upper), fixed=((0, rows), *fixed))
        # the leaf groups may overwrite the state; with one level it is the root, but then there
        # are no physical pairs (``boundary_pairs(2)`` is empty)
        cuts = fixed if rows is None else ((0, rows), *fixed)
        return self._leaves(self._state(fixed=in_state, upper=upper), fixed=cuts)

    def _leaves(self, above: Scaled, fixed: Cuts = (), own: bool = True, lead: int = 0,
                groups: tuple[list[Factor], list[int]] | None = None) -> Scaled:
        """The last layer on the state ``above``, for the legs ``fixed`` cut to their slices (see
        ``_leaf_plan``): (X, s) as in ``_scaled_legs``; ``own``: the state may be overwritten (when
        no gradient is wanted); ``lead``: the rows of the first ``lead`` leaves are already
        applied (``_lead``); ``groups``: ``_leaf_groups()``, made once by a caller of many tiles."""
        state, scale = above
        factors, in_dims, shape = self._leaf_plan(fixed, lead, groups)
        own = own and not torch.is_grad_enabled()
        if scale is not None and not any(isinstance(f, torch.Tensor) for f in factors):
            legs = _kron_apply(state, factors, in_dims, inplace=own)
        else:
            legs, scale = _kron_apply(state, factors, in_dims, scale, inplace=own), None
        return legs.reshape(shape), scale

    def _leaf_plan(self, fixed: Cuts = (), lead: int = 0, groups: tuple[list[Factor], list[int]] | None = None
                   ) -> tuple[list[Factor], list[int], list[int]]:
        """``_leaf_groups`` for ``_leaves``' cuts: the factors, their input dims and the legs'
        shape, each leg of ``fixed`` cut to its slice: through its leaf's rows where that is a
        matrix (a group of its own, ``_cuts_rows``), else in the state already (``_free``).
        ``lead``: the first ``lead`` leaves' factors are left out, the state's axes being their rows.
        ``groups``: see ``_leaves``."""
        factors, in_dims = self._leaf_groups() if groups is None else groups
        factors, in_dims = list(factors), list(in_dims)
        shape = list(self.spec.leg_dims)
        group_of = self._group_of_leg()
        for k, cut in fixed:
            shape[k] = len(range(self.spec.leg_dims[k])[cut])
            if self.leaf_is_identity[k]:  # a free leg: its own group, the state cut
                in_dims[group_of[k]] = shape[k]
            else:
                factors[group_of[k]] = factors[group_of[k]][cut]
        for k in range(lead):
            factors[k], in_dims[k] = None, shape[k]
        return factors, in_dims, shape

    def _lead(self, above: Scaled, k: int, rows: slice, groups: tuple[list[Factor], list[int]]) -> Scaled:
        """Leaf k's ``rows`` (a matrix, its own group) applied to axis k of the state above the
        leaves, the axes before it already cut to one value: (X, s) with X of shape
        (1, .., 1, rows, b_k+1, .., b_K). Fixing legs 0 and 1 so, a tile's chain starts at leg 2
        and can take the legs in either direction (``_kron_apply``). ``groups``: ``_leaf_groups()``."""
        state, scale = above
        leaf = groups[0][self._group_of_leg()[k]][rows]
        made = leaf @ state.reshape(state.shape[k], -1)
        return made.reshape(*state.shape[:k], leaf.shape[0], *state.shape[k + 1:]), scale

    def _group_of_leg(self) -> list[int]:
        """For each leg, the index of its group in ``_leaf_groups`` (a physical pair is one)."""
        groups, group, k = [], 0, 0
        starts = set(self.pairs[0])
        while k < self.spec.n_legs:
            width = 2 if k in starts else 1
            groups += [group] * width
            group, k = group + 1, k + width
        return groups

    def _free(self, k: int) -> bool:
        """Whether leg k can be cut in the state: an identity leaf, and no disentangler of the
        physical or the bottom layer on it (those above act on whole subtrees)."""
        touched = {leg for level in self.pairs[:2] for first in level for leg in (first, first + 1)}
        return self.leaf_is_identity[k] and k not in touched

    def _cuts_rows(self, k: int) -> bool:
        """Whether leg k can be cut through its leaf's rows: a matrix leaf in a group of its own
        (no physical disentangler on it), so the state above the leaves stays whole."""
        return not self.leaf_is_identity[k] and not {k - 1, k} & set(self.pairs[0])

    def _tile_legs(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The legs ``blocked_linear`` fixes per tile: a head (leg 0, then leg 1) and a tail (the
        last legs), added in the order 1, K-1, K-2 while a tile would hold more than one cache
        block (leg 1) or one streamed block (the tail; ``memory.current_policy``), each only where
        ``_free`` and while one leg is left unfixed. Leg 0 is always fixed. Leg 1 comes first and
        costs nothing more: with both of its node's legs fixed, the node is applied once per value
        and leaves an axis of size 1 (``_tile_state``). On VGG-16's fc7 at 2,007x (tiles of 1 MB
        instead of 8 MB) ``blocked_linear`` took 37.8-39.3 against 43-102 ms at batch 1 and
        79-83 against 81-91 ms at 256, the forward 37.7-39.4 against 35.4-39.2 ms (AMD EPYC). With a
        matrix leaf 0 the legs are cut through their leaves' rows, the state above the leaves
        being shared by all tiles: leg 0, and leg 1 where ``_cuts_rows`` (leaf 0's rows are
        applied once per value, ``_lead``)."""
        n_legs, dims = self.spec.n_legs, self.spec.leg_dims
        head, tail = [0], []
        policy = current_policy()
        target = policy.block_values()
        if not self.leaf_is_identity[0]:
            if n_legs > 2 and math.prod(dims[1:]) > target and self._cuts_rows(1):
                return (0, 1), ()
            return (0,), ()
        for side, k in ((head, 1), (tail, n_legs - 1), (tail, n_legs - 2)):
            bound = policy.cache_values() if side is head else target
            if self.spec.rows * self.spec.cols // math.prod(dims[j] for j in head + tail) <= bound:
                break
            ends_tail = side is head or k == n_legs - 1 or n_legs - 1 in tail  # the tail ends at the last leg
            if k not in head + tail and len(head) + len(tail) + 1 < n_legs and self._free(k) and ends_tail:
                if side is tail:
                    tail.insert(0, k)
                else:
                    head.append(k)
        return tuple(head), tuple(tail)

    def row_slices(self) -> list[slice]:
        """Slices of leg 0 whose leg tensors hold about one streamed block each."""
        return _slices(self.spec.leg_dims[0], self.spec.dense_params)

    def fit_tiles(self) -> list[tuple[slice, Cuts]]:
        """The parts the weight-space distance is summed over: the slices of leg 0
        (``row_slices``), each also cut along leg 1 into the fewest slices of about one streamed
        block where one value of leg 0 is larger than that and leg 1 can be cut: in the state
        (``_free``, leaf 0 an identity) or through leaf 1's rows (``_cuts_rows``, leaf 0 a
        matrix). Leg 1 is in the first isometry the bottom layer's chain applies, or the first
        leaf, so each piece costs its share of the chain. A step's
        temporaries are then tile-sized: on fc6 of VGG-16 at 2,000x (leg 1 in two pieces) one
        step held 0.17-0.23 GB above its target against 0.34-0.39 GB for slices of leg 0 alone,
        for about 7% more time (eight alternated pairs of processes: 784-1,028 against 743-955
        ms; a larger ``block_bytes`` gives the time back)."""
        dims, block = self.spec.leg_dims, current_policy().block_values()
        tiles = []
        for rows in self.row_slices():
            cuts: list[Cuts] = [()]
            values = len(range(dims[0])[rows]) * math.prod(dims[1:])
            if values > block and (self._free(1) if self.leaf_is_identity[0] else self._cuts_rows(1)):
                step = -(-dims[1] // min(dims[1], -(-values // block)))  # equal pieces, the fewest
                cuts = [((1, slice(start, min(start + step, dims[1]))),) for start in range(0, dims[1], step)]
            tiles += [(rows, fixed) for fixed in cuts]
        return tiles

    def _state_slices(self) -> list[slice]:
        """Slices of bond 0 whose states above the leaves hold about one streamed block each."""
        return _slices(self.bonds[0][0], math.prod(self.bonds[0]))

    def _cut_end(self, upper: Scaled, cuts: Cuts, node: int, made: LayerFactors | None = None) -> Scaled:
        """``upper`` (the state entering the bottom layer) with the bottom layer's isometry of
        ``node`` (0 or the last), cut along ``cuts``, already applied; with one level, the root
        cut. A tile's state is then the remaining isometries on a state that is already small
        (applied in the chain, the end ones would come last and leave a larger intermediate).
        ``made``: see ``_layer_factors``."""
        state, pending = upper
        if self.levels == 1:
            return _cut_root(state, dict(cuts)), pending
        factors, _, _ = self._layer_factors(1, pending, dict(cuts), made)
        dims = list(state.shape)
        chosen = [f if g == (node % len(factors)) else None for g, f in enumerate(factors)]
        result = _kron_apply(state, chosen, dims)
        dims[node] = factors[node].shape[0]
        return result.reshape(dims), pending

    def _tile_state(self, headed: Scaled, cuts: Cuts, head_done: bool, made: LayerFactors | None = None) -> Scaled:
        """The state above the leaves for one tile of ``blocked_linear``, cut along ``cuts``:
        ``headed`` is ``_upper_state()``, or (``head_done``) ``_cut_end`` of node 0, done when
        both of its legs are cut. The last node's isometry is applied first too when both of its
        legs are cut, then the others in one chain, the bottom layer's disentanglers and sigma.
        A node applied first leaves an axis of size 1, which the chain's rotation moves for free;
        in the chain, a cut end node would shrink the state last, after a larger intermediate.
        ``made``: see ``_layer_factors``."""
        state, pending_above = headed
        if self.levels == 1:  # the root, cut along leg 0 by ``_cut_end``; ``_tile_legs`` leaves leg 1 whole
            return headed
        factors, legs, pending = self._layer_factors(1, pending_above, dict(cuts), made)
        last = len(factors) - 1
        tail_done = {2 * last, 2 * last + 1} <= dict(cuts).keys()
        if tail_done:
            state, _ = self._cut_end((state, pending_above), cuts, last, made)
        chain: list[Factor] = [None if head_done else factors[0], *factors[1:last],
                               None if tail_done else factors[last]]
        return self._layer_apply(1, state, chain, list(state.shape), legs), pending

    def block_values(self) -> int:
        """Half of what ``blocked_linear`` holds on the weight side: two tiles (the legs and the
        buffer in weight order, each 1/(d_k ...) of the padded weight for the legs it fixes,
        ``_tile_legs``), the state entering the bottom layer (``_upper_state``) and, when leaf 0 is
        a matrix, the state above the leaves and its rows for the head's values (``_lead``)."""
        head, tail = self._tile_legs()
        dims, bonds = self.spec.leg_dims, self.bonds[0]
        tile = self.spec.rows * self.spec.cols // math.prod(dims[k] for k in head + tail)
        upper = math.prod(self.bonds[1]) if self.levels > 2 else 0
        above = 0
        if not self.leaf_is_identity[0]:
            above = sum(math.prod(bonds[k:]) for k in range(len(head) + 1))
        return tile + (upper + above) // 2

    def _shared_above(self) -> Scaled | None:
        """``_state()`` for a caller slicing leg 0 many times, when leaf 0 is a matrix (its rows
        are sliced, the state is whole); None when leaf 0 is an identity (the state is sliced)."""
        return None if self.leaf_is_identity[0] else self._state()

    def _tile_start(self) -> tuple[Scaled | None, Scaled | None]:
        """What every tile of ``_tiles`` starts from: (``_shared_above()``, None) for a matrix
        leaf 0, else (None, ``_upper_state()``)."""
        above = self._shared_above()
        return above, self._upper_state() if above is None else None

    def _tiles(self, rows: int | None = None, leg_0: range | None = None,
               start: tuple[Scaled | None, Scaled | None] | None = None
               ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
        """Each tile of the legs ``_tile_legs`` fixes, as (their values, head then tail; the
        tile's legs put in weight order, a view of shape (o_k.., i_k..) over the unfixed legs k;
        the scalar still to multiply them by, None: 1). ``rows``: the tiles whose rows are all
        padding (at or past ``rows``) are skipped; ``leg_0``: only the tiles with these values of
        leg 0. The state entering the bottom layer (``start``: ``_tile_start()``, for a caller
        taking the tiles in parts) is built once; each tile is the bottom layer on it, its cores
        cut to the tile (or, for a matrix leaf 0, that leaf's rows on the shared state above the
        leaves)."""
        spec = self.spec
        head, tail = self._tile_legs()
        mid = [k for k in range(spec.n_legs) if k not in head + tail]
        out_dims, in_dims = spec.out_dims, spec.in_dims
        rows_per_head = spec.rows // math.prod(out_dims[k] for k in head)
        above, upper = self._tile_start() if start is None else start
        per_leg_0 = math.prod(spec.leg_dims[k] for k in head[1:])
        leg_0 = range(spec.leg_dims[0]) if leg_0 is None else leg_0
        groups = self._leaf_groups()
        made = self._layer_factors(1, upper[1]) if upper is not None and self.levels > 1 else None
        for head_value in range(leg_0.start * per_leg_0, leg_0.stop * per_leg_0):
            head_values = _digits(head_value, [spec.leg_dims[k] for k in head])
            head_o = _index([v // in_dims[k] for k, v in zip(head, head_values)], [out_dims[k] for k in head])
            if rows is not None and head_o * rows_per_head >= rows:
                break  # this and every later tile's rows are padding
            head_cuts = tuple((k, slice(v, v + 1)) for k, v in zip(head, head_values))
            both = self.levels == 1 or len(head) == 2  # node 0's legs all cut: applied once per head value
            new_leg_0 = head_values[1:] == [0] * (len(head) - 1)
            if above is not None:  # matrix leaves, whose rows are cut (``_tile_legs``: no tail)
                if new_leg_0:
                    leading = self._lead(above, 0, head_cuts[0][1], groups)
            elif self.levels > 1 and len(head) == 2:  # node 0 on the values of leg 1 at once, a row a tile
                if new_leg_0:
                    node_0, _ = self._cut_end(upper, head_cuts[:1], 0, made)
                headed = node_0[head_values[1]:head_values[1] + 1], upper[1]
            else:
                headed = self._cut_end(upper, head_cuts, 0) if both else upper
            for tail_value in range(math.prod(spec.leg_dims[k] for k in tail)):
                tail_values = _digits(tail_value, [spec.leg_dims[k] for k in tail])
                tail_cuts = tuple((k, slice(v, v + 1)) for k, v in zip(tail, tail_values))
                if above is not None:
                    lead = leading if len(head) == 1 else self._lead(leading, 1, head_cuts[1][1], groups)
                    legs, scale = self._leaves(lead, fixed=head_cuts, own=False, lead=len(head), groups=groups)
                else:
                    cuts = head_cuts + tail_cuts
                    legs, scale = self._leaves(self._tile_state(headed, cuts, both, made), fixed=cuts, groups=groups)
                    if scale is not None:  # the legs were made for this tile: scaled while in cache
                        legs, scale = legs.mul_(scale), None
                split = weight_order(legs.reshape([spec.leg_dims[k] for k in mid]),
                                     [out_dims[k] for k in mid], [in_dims[k] for k in mid])
                yield head_values + tail_values, split, scale

    @torch.no_grad()
    def blocked_linear(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T one tile at a time (``_tiles``): each value of the legs ``_tile_legs`` fixes
        (leg k's value is o_k i_k + i, o_k outermost) picks the rows of W with those row digits
        and the columns with those column digits, a strided block whose other digits are
        contiguous. The tile, put in weight order in a reused buffer, is multiplied into those
        rows of y^T with those columns of x (x is permuted once so that they are a contiguous
        matrix)."""
        spec = self.spec
        rows, cols = spec.matrix_shape
        head, tail = self._tile_legs()
        fixed = head + tail
        mid = [k for k in range(spec.n_legs) if k not in fixed]
        out_dims, in_dims = spec.out_dims, spec.in_dims
        flat = x.reshape(-1, cols)
        if spec.cols != cols:  # padded columns meet zeros
            flat = F.pad(flat, (0, spec.cols - cols))
        n = flat.shape[0]
        mid_rows, mid_cols = math.prod(out_dims[k] for k in mid), math.prod(in_dims[k] for k in mid)
        columns = (flat.reshape(n, *in_dims).permute(*(k + 1 for k in fixed), *(k + 1 for k in mid), 0)
                   .reshape(-1, mid_cols, n))  # one copy of x
        out_t = flat.new_zeros(spec.rows, n)  # y^T
        grid = out_t.view(math.prod(out_dims[k] for k in head), mid_rows, -1, n)
        buffer: torch.Tensor | None = None
        for values, split, scale in self._tiles(rows):
            buffer = torch.empty(split.shape, dtype=split.dtype, device=split.device) if buffer is None else buffer
            _write_weight_order(split, scale, buffer)
            head_o = _index([v // in_dims[k] for k, v in zip(head, values)], [out_dims[k] for k in head])
            tail_o = _index([v // in_dims[k] for k, v in zip(tail, values[len(head):])], [out_dims[k] for k in tail])
            column = _index([v % in_dims[k] for k, v in zip(fixed, values)], [in_dims[k] for k in fixed])
            grid[head_o, :, tail_o].addmm_(buffer.view(mid_rows, mid_cols), columns[column])
        return out_t[:rows].T.reshape(*x.shape[:-1], rows)

    @torch.no_grad()
    def _write_tiles(self, out: torch.Tensor, digit: int | None = None,
                     start: tuple[Scaled | None, Scaled | None] | None = None) -> torch.Tensor:
        """The weight into ``out`` (contiguous, ``spec.shape``, unpadded) one tile at a time
        (``_tiles``): each tile is written into its strided block of ``out`` while it is still
        in cache, instead of passing over a weight-sized state several times. With ``digit``,
        only the rows whose first row digit o_1 is ``digit``, into ``out`` of (o_2..o_K) x
        (i_1..i_K) values (``start``: see ``_tiles``)."""
        spec = self.spec
        head, tail = self._tile_legs()
        grid = out.view(spec.out_dims[0] if digit is None else 1, *spec.out_dims[1:], *spec.in_dims)
        leg_0 = None if digit is None else range(digit * spec.in_dims[0], (digit + 1) * spec.in_dims[0])
        n_legs = spec.n_legs
        for values, split, scale in self._tiles(leg_0=leg_0, start=start):
            index: list[int | slice] = [slice(None)] * (2 * n_legs)
            for k, v in zip(head + tail, values):
                index[k], index[n_legs + k] = divmod(v, spec.in_dims[k])
            if digit is not None:
                index[0] = 0
            _write_weight_order(split, scale, grid[tuple(index)])
        return out

    # ------------------------------------------------------------------ inference without W

    @property
    def has_factorized(self) -> bool:
        """Whether ``linear`` applies: the state above the leaves holds at most 1/FACTORIZED_SHARE
        of the weight (bonds below the legs, so matrix leaves) and the einsum's axes (n, o_k,
        i_k, b_k) have letters."""
        small = FACTORIZED_SHARE * math.prod(self.bonds[0]) <= self.spec.dense_params
        return small and 3 * self.spec.n_legs + 1 <= len(string.ascii_letters)

    def _linear_equation(self) -> tuple[str, list[tuple[int, ...]]]:
        """The einsum of ``linear`` and the shapes of its operands after x: x (n, i_1..i_K); one
        term per leaf group with a matrix (``_leaf_groups``), its rows split into digits and its
        columns into bonds, (o_k, i_k[, o_k+1, i_k+1], b_k[, b_k+1]); the state (b_1..b_K), an
        identity leaf's axis split into its (o_k, i_k) instead -> (n, o_1..o_K)."""
        spec, bonds, k_legs = self.spec, self.bonds[0], self.spec.n_legs
        letters = string.ascii_letters
        o, i, b, n = letters[:k_legs], letters[k_legs:2 * k_legs], letters[2 * k_legs:3 * k_legs], letters[3 * k_legs]
        terms, shapes, state_term, state_shape, k = [], [], "", [], 0
        while k < k_legs:
            legs = [k, k + 1] if k in self.pairs[0] else [k]
            if len(legs) == 1 and self.leaf_is_identity[k]:  # the state's axis is the leg itself
                state_term += o[k] + i[k]
                state_shape += [spec.out_dims[k], spec.in_dims[k]]
            else:
                terms.append("".join(o[j] + i[j] for j in legs) + "".join(b[j] for j in legs))
                shapes.append((*(d for j in legs for d in (spec.out_dims[j], spec.in_dims[j])),
                               *(bonds[j] for j in legs)))
                state_term += "".join(b[j] for j in legs)
                state_shape += [bonds[j] for j in legs]
            k += len(legs)
        equation = ",".join([n + i, *terms, state_term]) + "->" + n + o
        return equation, [*shapes, tuple(state_shape)]

    def linear_operands(self) -> dict[str, object]:
        """The state above the leaves with the last layer's scale folded in, and the matrices of
        the leaf groups (a pair of identity leaves: its I + P Q^T made dense), viewed as
        ``_linear_equation`` names them."""
        state, scale = self._state()
        if scale is not None:
            state = state * scale
        factors = [torch.eye(f[0].shape[0], dtype=f[0].dtype, device=f[0].device) + f[0] @ f[1]
                   if isinstance(f, tuple) else f for f in self._leaf_groups()[0]]
        _, shapes = self._linear_equation()
        matrices = [f.reshape(shape) for f, shape in zip((f for f in factors if f is not None), shapes)]
        return {"operands": (*matrices, state.reshape(shapes[-1]))}

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T for x (..., in*kh*kw), W never formed; autograd-correct. The last layer is
        linear: W[o, i] = sum_b S[b] prod_g A_g[(o, i)_g, b_g] over the state S above the leaves
        (after the bottom layer's sigma) and the leaf groups A_g (``_leaf_groups``), so x is
        contracted with them and S as one einsum (``_linear_equation``), pairwise in
        ``core.contract.path_search``'s order, each pair a GEMM (``core.contract.gemm_einsum``).
        S and the groups are cached while the cores are unchanged (``Generator.cached``)."""
        spec = self.spec
        rows, cols = spec.matrix_shape
        operands = self.cached("linear", self.linear_operands)["operands"]
        flat = x.reshape(-1, cols)
        if spec.cols != cols:
            flat = F.pad(flat, (0, spec.cols - cols))
        n = flat.shape[0]
        equation = self._linear_equation()[0]
        terms = (flat.reshape(n, *spec.in_dims), *operands)
        if torch.compiler.is_compiling():  # traced (export, ONNX): pairwise, keeping the batch symbolic
            out = pairwise_einsum(equation, terms)
        else:
            out = gemm_einsum(equation, *terms)
        out = out.reshape(n, spec.rows)
        if spec.rows != rows:
            out = out[:, :rows]
        return out.reshape(*x.shape[:-1], rows)

    def linear_macs(self, batch: int) -> int:
        equation, shapes = self._linear_equation()
        return einsum_macs(equation, ((batch, *self.spec.in_dims), *shapes))

    def linear_state_bytes(self) -> int:
        return 4 * sum(math.prod(shape) for shape in self._linear_equation()[1])

    def forward(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight; without autograd it is written a tile at a time (``_write_tiles``), into
        ``out`` when given: no weight-sized state besides ``out``, each tile's disentanglers,
        sigma, scale and permutation into weight order on values still in cache (fc6 of VGG-16,
        224 tiles of 1.8 MB: 205 ms at 2,000x, of which the permuted copy into ``out`` 68 and
        ``_kron_apply``'s GEMM chains 43 (cProfile); 178 ms at 50,000x. The whole state at once
        took 371-476 ms at 2,000x)."""
        if torch.is_grad_enabled() or not unpadded(self.spec):
            return super().forward(out)
        out = direct_output(out, self.spec)
        if not traced():
            if out is None:
                out = torch.empty(self.spec.shape, dtype=self.root.dtype, device=self.root.device)
            return self._write_tiles(out)
        # traced (export, ONNX): the whole state, so the graph holds one chain, not one per tile
        legs, scale = self._scaled_legs()
        out = torch.empty(self.spec.shape, dtype=legs.dtype, device=legs.device) if out is None else out
        split = weight_order(legs, self.spec.out_dims, self.spec.in_dims)
        _write_weight_order(split, scale, out.view(split.shape))
        return out

    def row_blocks(self) -> Iterator[torch.Tensor]:
        """One block of rows per value of the first row digit o_1, each written a tile at a time
        (``_write_tiles``) into one of two buffers used in turn: the temporaries are 1/o_1 of the
        weight's."""
        spec = self.spec
        out_rows, cols = spec.matrix_shape
        rows_per_block = math.prod(spec.out_dims[1:])
        buffers: list[torch.Tensor] = []
        with torch.no_grad():
            start = self._tile_start()
        for digit in range(spec.out_dims[0]):
            first_row = digit * rows_per_block
            if first_row >= out_rows:
                break
            if len(buffers) < 2:
                buffers.append(torch.empty(rows_per_block, spec.cols, dtype=self.root.dtype, device=self.root.device))
            block = self._write_tiles(buffers[digit % 2], digit, start)
            yield block[:out_rows - first_row, :cols].reshape(-1, *spec.shape[1:])

    def _tile_distance(self, target_legs: torch.Tensor, rows: slice, fixed: Cuts,
                       start: tuple[Scaled | None, Scaled | None] | None = None) -> torch.Tensor:
        """||T - G||^2 on one tile (``fit_tiles``; ``start``: what the tiles share,
        ``_tile_start()``, made once by the caller). With a gradient
        wanted, the bottom layer's sigma, the physical disentangler and the distance are one step
        where they can be (``_fused_tail``); else the last layer's scale is fused into the
        distance (``scaled_squared_distance``: two passes forward, two backward)."""
        index = [rows, *[slice(None)] * (self.spec.n_legs - 1)]
        for k, cut in fixed:
            index[k] = cut
        target = target_legs[tuple(index)].to(self.root.dtype)
        above, upper = (None, None) if start is None else start
        if above is not None:  # a matrix leaf 0: its rows on the state above the leaves
            legs, scale = self._leaves(above, fixed=((0, rows), *fixed), own=False)
            return scaled_squared_distance(legs, scale, target)
        fused = self._fused_tail(rows, fixed, upper)
        if fused is not None:
            return sigma_mix_distance(*fused, target)
        legs, scale = self._scaled_legs(rows, fixed=fixed, upper=upper)
        return scaled_squared_distance(legs, scale, target)

    def _fused_tail(self, rows: slice, fixed: Cuts, upper: Scaled | None
                    ) -> tuple[torch.Tensor, str | None, tuple | None, torch.Tensor | None] | None:
        """The arguments of ``base.sigma_mix_distance`` but the target for one tile, when a
        gradient is wanted and the tile's last steps are what it fuses: the bottom layer's sigma
        (tanh, relu or none), then at most one physical disentangler on identity leaves. Else None."""
        activation = self.spec.activation if len(self.activations) else None
        if (not torch.is_grad_enabled() or traced() or self.levels < 2 or not self.leaf_is_identity[0]
                or (activation is not None and activation not in SIGMA_MIX_ACTIVATIONS)):
            return None
        factors, in_dims, shape = self._leaf_plan(((0, rows), *fixed))
        if any(isinstance(f, torch.Tensor) for f in factors) or sum(f is not None for f in factors) > 1:
            return None
        z, pending = self._state(rows=rows, fixed=fixed, upper=upper, activate=False)
        z = z.reshape(shape)
        mix = None
        for g, factor in enumerate(factors):
            if factor is not None:
                mix = (*factor, (math.prod(in_dims[:g]), in_dims[g], math.prod(in_dims[g + 1:])))
        return z, activation, mix, pending

    def squared_distance(self, target_legs: torch.Tensor, target_norm_sq: torch.Tensor) -> torch.Tensor:
        """||T - G||^2 summed over tiles (``fit_tiles``): the temporaries are tile-sized."""
        return sum(self._tile_distance(target_legs, rows, fixed) for rows, fixed in self.fit_tiles())

    def accumulate_squared_distance(self, target_legs: torch.Tensor, target_norm_sq: torch.Tensor,
                                    scale: torch.Tensor) -> float:
        """One tile at a time (``fit_tiles``): its distance's gradient is accumulated before the
        next tile is built, so the autograd graph holds one tile (same gradient as the whole).

        What every tile starts from (``_tile_start``: the state entering the bottom layer, or
        with a matrix leaf 0 the state above the leaves) is made once: the tiles start from a
        detached copy that collects their gradients, which then flow through the layers above in
        one backward (on fc6 of VGG-16, 1.3 ms a tile made again at 2,000x, 32 tiles; 3.7 ms at
        50,000x, 16 tiles)."""
        above, upper = self._tile_start()
        made = above if above is not None else upper
        # a state with a graph (not the root itself) is replaced by a detached leaf
        shared = tuple(t.detach().requires_grad_() if t is not None and t.grad_fn is not None else t for t in made)
        start = (shared, None) if above is not None else (None, shared)
        total = 0.0
        for rows, fixed in self.fit_tiles():
            part = self._tile_distance(target_legs, rows, fixed, start=start) * scale
            part.backward()
            total += float(part.detach())
        ends = [(t, copy.grad) for t, copy in zip(made, shared) if copy is not t and copy.grad is not None]
        if ends:
            torch.autograd.backward([t for t, _ in ends], [grad for _, grad in ends])
        return total

    @classmethod
    @torch.no_grad()
    def from_target(cls, spec: GeneratorSpec, target: torch.Tensor) -> MERA:
        """Cores of the linear TTN's hierarchical SVD, disentanglers at the identity, and each gain
        set so that the layer's largest pre-activation is INIT_PREACTIVATION.

        The largest, not the rms as in the TTN: the top-down states of an HT-SVD are heavy-tailed
        (the leading singular directions hold most of the energy, max/rms ~ 5-25), and an rms
        calibration would saturate sigma on exactly those entries. So the network starts at the
        linear fit; Adam then grows the gains where the nonlinearity helps."""
        net = cls(spec)
        tree = TTN.from_target(replace(spec, arch="ttn", activation="none", mix_rank=0, mix_ranks=None), target)
        for mine, fitted in zip(net.leaves, tree.leaves):
            mine.copy_(fitted)
        for mine, fitted in zip(net.nodes, tree.nodes):
            mine.copy_(fitted)
        net.root.copy_(tree.root)
        if len(net.activations):
            gained = net.activations
            net.activations = nn.ModuleList()
            # the bottom layer's state is as large as the weight: slice by slice, each layer's
            # running maximum a Python float (small tensors kept alive across the slices would
            # sit in the freed slices' memory, and each next slice would grow the heap: +25 MB a
            # slice, 0.4 GB over fc6's sixteen, seen in the compress pipeline)
            largest = [0.0] * (net.levels - 1)
            for rows in net._state_slices():
                captured: list[torch.Tensor] = []
                net._state(capture=captured, rows=rows)
                largest = [max(value, float(z)) for value, z in zip(largest, captured)]
                del captured
            net.activations = gained
            for h, value in zip(range(net.levels - 1, 0, -1), largest):
                net.activations[h - 1].calibrate(torch.tensor(value))
        return net
