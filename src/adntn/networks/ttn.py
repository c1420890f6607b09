"""Nonlinear Tree Tensor Network (TTN) generator.

A balanced binary tree over K = 2^L physical legs, contracted bottom-up. Node (h, j) at height h
covers legs [j 2^h, (j+1) 2^h); its message is a matrix over those legs' indices times one bond:

    M_(0,k)[p, c]            = A_k[p, c]                  (identity when the bond equals d_k)
    M_(h,j)[(p, q), c]       = sigma_h( sum_ab M_l[p, a] M_r[q, b] B_(h,j)[a, b, c] )
    legs[(p, q)]             = sum_ab M_l[p, a] R[a, b] M_r[q, b]     (a GEMM of N*chi flops)

sigma_h is a gain-normalised activation shared by the nodes of height h (see ``base``); with
``activation='none'`` this is the linear hierarchical Tucker format, initialised exactly by the
leaf-to-root hierarchical SVD.

The two halves at the root (``halves``: M_l R and M_r) give the weight, its row blocks and the
distance to a target without the leg tensor (``halves.HalvesGenerator``).
"""

from __future__ import annotations

import math
import torch
from torch import nn

from adntn.core.spec import GeneratorSpec
from adntn.networks.base import activation_sites, contraction
from adntn.networks.halves import HalvesGenerator
from adntn.networks.target import float_blocks, is_narrow


def tree_bonds(spec: GeneratorSpec) -> list[list[int]]:
    """Actual bond dims: ``bonds[h][j]`` is the bond above node (h, j), h = 0 .. L-1.

    Each is spec.bond_dims[h] capped by the rank the node's subtree can carry: the product of its
    legs, the product of the other legs, and the product of its children's bonds.
    """
    dims = spec.leg_dims
    total = math.prod(dims)
    levels = int(math.log2(len(dims)))
    bonds: list[list[int]] = []
    for h in range(levels):
        width = 1 << h
        row = []
        for j in range(len(dims) >> h):
            inside = math.prod(dims[j * width:(j + 1) * width])
            below = inside if h == 0 else bonds[h - 1][2 * j] * bonds[h - 1][2 * j + 1]
            row.append(min(spec.bond_dims[h], inside, total // inside, below))
        bonds.append(row)
    return bonds


def _around(state: torch.Tensor, axis: int) -> torch.Tensor:
    """The contiguous ``state`` viewed as (before, dim, after) around ``axis``: no copy."""
    return state.reshape(math.prod(state.shape[:axis]), state.shape[axis], -1)


def _gram(view: torch.Tensor) -> torch.Tensor:
    """sum_a V_a V_a^T for V (before, dim, after), through the smaller temporary: the batched
    products (before, dim, dim) when dim <= after, else one GEMM on the unfolding (a copy of V)."""
    before, dim, after = view.shape
    if dim <= after:
        return torch.bmm(view, view.transpose(1, 2)).sum(0)
    unfolding = view.transpose(0, 1).reshape(dim, before * after)
    return unfolding @ unfolding.T


def top_singular_vectors(state: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    """Leading left singular vectors (dim x rank) of the unfolding of ``state`` along ``axis``.

    From the Gram matrix sum_a V_a V_a^T of the (before, dim, after) view V (``_gram``): the
    unfolding, a permuted copy of ``state``, is formed only when that is the smaller temporary.
    """
    view = _around(state.contiguous(), axis)
    gram = sum(_gram(block) for _, block in float_blocks(view)).double()
    _, vectors = torch.linalg.eigh(gram)
    return vectors[:, -rank:].flip(1).to(torch.float32 if is_narrow(state) else state.dtype)


def project(state: torch.Tensor, axis: int, basis: torch.Tensor) -> torch.Tensor:
    """Contract leg ``axis`` of ``state`` with ``basis`` (dim x rank), keeping the leg order:
    one batched GEMM basis^T V_a on the (before, dim, after) view, written contiguous in float32
    (block by block for a narrower ``state``)."""
    view = _around(state.contiguous(), axis)
    if not is_narrow(view):
        projected = torch.bmm(basis.T.expand(view.shape[0], -1, -1), view)
    else:
        projected = view.new_empty(view.shape[0], basis.shape[1], view.shape[2], dtype=torch.float32)
        for (rows, cols), block in float_blocks(view):
            projected[rows, :, cols] = torch.bmm(basis.T.expand(block.shape[0], -1, -1), block)
    return projected.reshape(*state.shape[:axis], basis.shape[1], *state.shape[axis + 1:])


def add_tree_cores(module: nn.Module, spec: GeneratorSpec) -> None:
    """Give ``module`` the cores of the tree for ``spec`` (random, from torch's global RNG).

    ``bonds`` and ``levels``; ``leaves`` A_k (d_k, b) for the legs whose bond is below d_k
    (``leaf_is_identity`` marks the others); ``nodes`` B (a, b, c) level by level; ``root`` (a, b).
    The TTN reads them bottom-up, the MERA top-down.
    """
    module.bonds = tree_bonds(spec)
    module.levels = len(module.bonds)
    dims = spec.leg_dims
    module.leaves = nn.ParameterList(
        nn.Parameter(torch.randn(d, b) / math.sqrt(d)) for d, b in zip(dims, module.bonds[0]) if b < d
    )
    module.leaf_is_identity = [b == d for d, b in zip(dims, module.bonds[0])]
    module.nodes = nn.ParameterList()
    for h in range(1, module.levels):
        for j, c in enumerate(module.bonds[h]):
            a, b = module.bonds[h - 1][2 * j], module.bonds[h - 1][2 * j + 1]
            module.nodes.append(nn.Parameter(torch.randn(a, b, c) / math.sqrt(a * b)))
    a, b = module.bonds[-1]
    module.root = nn.Parameter(torch.randn(a, b) / math.sqrt(a * b))


class TTN(HalvesGenerator):
    arch = "ttn"

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        add_tree_cores(self, spec)
        self.activations = activation_sites(spec, self.levels - 1)

    @classmethod
    def param_count(cls, spec: GeneratorSpec) -> int:
        bonds = tree_bonds(spec)
        leaves = sum(d * b for d, b in zip(spec.leg_dims, bonds[0]) if b < d)
        nodes = sum(
            bonds[h - 1][2 * j] * bonds[h - 1][2 * j + 1] * c
            for h in range(1, len(bonds)) for j, c in enumerate(bonds[h])
        )
        gains = 0 if spec.activation == "none" else len(bonds) - 1
        return leaves + nodes + bonds[-1][0] * bonds[-1][1] + gains

    def _leaf_messages(self) -> list[torch.Tensor]:
        stored = iter(self.leaves)
        return [
            torch.eye(d, dtype=self.root.dtype, device=self.root.device) if identity else next(stored)
            for d, identity in zip(self.spec.leg_dims, self.leaf_is_identity)
        ]

    def _node(self, left: torch.Tensor, right: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        """Pre-activation message: (P_l, a), (P_r, b), (a, b, c) -> (P_l * P_r, c)."""
        expr = contraction("pa,qb,abc->pqc", tuple(left.shape), tuple(right.shape), tuple(core.shape))
        return expr(left, right, core).reshape(left.shape[0] * right.shape[0], core.shape[2])

    def top_messages(self, capture: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two messages into the root, (P_left, a) and (P_right, b).

        ``capture`` collects each level's pre-activations (used to calibrate the gains).
        """
        messages = self._leaf_messages()
        cores = iter(self.nodes)
        for h in range(1, self.levels):
            pre = [self._node(messages[2 * j], messages[2 * j + 1], next(cores))
                   for j in range(len(messages) // 2)]
            if capture is not None:
                capture.append(torch.cat([z.reshape(-1) for z in pre]))
            messages = [self.activations[h - 1](z) for z in pre] if len(self.activations) else pre
        return messages[0], messages[1]

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """M_l R (P_left, b) and M_r (P_right, b): legs = M_l R M_r^T."""
        left, right = self.top_messages()
        return left @ self.root, right

    @classmethod
    @torch.no_grad()
    def from_target(cls, spec: GeneratorSpec, target: torch.Tensor) -> TTN:
        """Leaf-to-root hierarchical SVD of the leg tensor (exact for the linear TTN up to
        truncation). Each step reads the state in place and writes a d/b times smaller one."""
        net = cls(spec)
        state = target
        stored = iter(net.leaves)
        for k, identity in enumerate(net.leaf_is_identity):
            if not identity:
                basis = top_singular_vectors(state, k, net.bonds[0][k])
                next(stored).copy_(basis)
                state = project(state, k, basis)
        cores = iter(net.nodes)
        for h in range(1, net.levels):
            merged = [net.bonds[h - 1][2 * j] * net.bonds[h - 1][2 * j + 1] for j in range(len(net.bonds[h]))]
            state = state.reshape(merged)
            for j, c in enumerate(net.bonds[h]):
                basis = top_singular_vectors(state, j, c)
                next(cores).copy_(basis.reshape(net.bonds[h - 1][2 * j], net.bonds[h - 1][2 * j + 1], c))
                state = project(state, j, basis)
        net.root.copy_(state.reshape(net.root.shape))
        if len(net.activations):
            captured: list[torch.Tensor] = []
            linear = net.activations
            net.activations = nn.ModuleList()
            net.top_messages(capture=captured)
            net.activations = linear
            for site, z in zip(net.activations, captured):
                site.calibrate(z)
        return net
