"""Nonlinear Tree Tensor Network (TTN) generator.

A balanced binary tree over K = 2^L physical legs, contracted bottom-up. Node (h, j) at height h
covers legs [j 2^h, (j+1) 2^h); its message is a matrix over those legs' indices times one bond:

    M_(0,k)[p, c]            = A_k[p, c]                  (identity when the bond equals d_k)
    M_(h,j)[(p, q), c]       = sigma_h( sum_ab M_l[p, a] M_r[q, b] B_(h,j)[a, b, c] )
    legs[(p, q)]             = sum_ab M_l[p, a] R[a, b] M_r[q, b]     (a GEMM of N*chi flops)

sigma_h is a gain-normalised activation shared by the nodes of height h (see ``base``); with
``activation='none'`` this is the linear hierarchical Tucker format, initialised exactly by the
leaf-to-root hierarchical SVD.

``forward`` never builds the leg tensor: it regroups the two small root messages instead, so that
the final batched GEMM writes the (rows, cols) weight matrix directly (see ``halves_product``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from adntn.core.spec import GeneratorSpec
from adntn.networks.base import Generator, activation_sites, contraction
from adntn.networks.target import float_blocks, is_narrow, target_matmul, target_tmatmul


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


def digits_first(tensor: torch.Tensor, out_dims: tuple[int, ...], in_dims: tuple[int, ...]) -> torch.Tensor:
    """(P, ...) with rows (o_1, i_1, ..., o_m, i_m) row-major -> (prod o, prod i, ...)."""
    m = len(out_dims)
    digits = [d for pair in zip(out_dims, in_dims) for d in pair]
    rest = tensor.shape[1:]
    split = tensor.reshape(*digits, *rest).permute(
        *range(0, 2 * m, 2), *range(1, 2 * m, 2), *range(2 * m, 2 * m + len(rest)))
    return split.reshape(math.prod(out_dims), math.prod(in_dims), *rest)


def _regrouped(left: torch.Tensor, right: torch.Tensor, spec: GeneratorSpec, m: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """left (P, chi) -> (x, i, chi) and right (Q, chi) -> (y, chi, j) (small copies; see below)."""
    left = digits_first(left, spec.out_dims[:m], spec.in_dims[:m])
    right = digits_first(right, spec.out_dims[m:], spec.in_dims[m:]).transpose(1, 2)
    return left, right


def halves_product(left: torch.Tensor, right: torch.Tensor, spec: GeneratorSpec, m: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight whose leg form is sum_b left[P, b] right[Q, b], as W[x, y, i, j]: row-major, so
    a view of the padded (rows, cols) matrix.

    left (P, chi) has rows over legs 1..m, (o_1, i_1, ..., o_m, i_m) row-major; right (Q, chi) over
    legs m+1..K. Regrouped (small copies) as left (x, i, chi), x = (o_1..o_m), i = (i_1..i_m), and
    right (y, chi, j), the batched GEMM W[x, y, i, j] = sum_b left[x, i, b] right[y, b, j] writes
    the matrix directly: no N-sized permutation. With autograd, broadcasting copies N*chi/j +
    N*chi/i values; without (expand, evaluation), the rows are written block by block
    (``halves_rows``): the result is the only large tensor, and it is ``out`` (rows*cols
    contiguous values) when given.
    """
    if torch.is_grad_enabled() and (left.requires_grad or right.requires_grad):
        left, right = _regrouped(left, right, spec, m)
        product = torch.matmul(left.unsqueeze(1), right.unsqueeze(0))
        return product if out is None else out.view_as(product).copy_(product)
    x, y = math.prod(spec.out_dims[:m]), math.prod(spec.out_dims[m:])
    i, j = math.prod(spec.in_dims[:m]), math.prod(spec.in_dims[m:])
    out = left.new_empty(x, y, i, j) if out is None else out.view(x, y, i, j)
    for _ in halves_rows(left, right, spec, m, out):
        pass
    return out


def halves_rows(left: torch.Tensor, right: torch.Tensor, spec: GeneratorSpec, m: int,
                out: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """``halves_product`` without autograd, block by block: for each x, (x, W[x]) with W[x] the
    y*i*j contiguous values of rows x*y .. (x+1)*y - 1 of the padded matrix, (y, i, j), as one
    batched GEMM with left[x] broadcast. Written into ``out`` viewed as (x, y, i, j) when given,
    else into two buffers in turn: a block stays valid until the next-but-one is asked for.
    """
    left, right = _regrouped(left, right, spec, m)
    (x, i, chi), (y, _, j) = left.shape, right.shape
    right = right.contiguous()
    if out is not None:
        blocks = out.view(x, y, i, j)
    else:
        buffers = [left.new_empty(y, i, j) for _ in range(min(2, x))]
    for row in range(x):
        block = blocks[row] if out is not None else buffers[row % 2]
        torch.bmm(left[row].expand(y, i, chi), right, out=block)
        yield row, block


def crop_matrix(matrix: torch.Tensor, spec: GeneratorSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight of ``spec.shape`` from the padded matrix (any shape that reshapes to (rows, cols)),
    written into ``out`` when given (nothing to do when ``matrix`` already is ``out``)."""
    if out is not None and matrix.data_ptr() == out.data_ptr() and matrix.numel() == out.numel():
        return out
    rows, cols = spec.matrix_shape
    weight = matrix.reshape(spec.rows, spec.cols)[:rows, :cols].reshape(spec.shape)
    return weight.contiguous() if out is None else out.copy_(weight)


def direct_output(out: torch.Tensor | None, spec: GeneratorSpec) -> torch.Tensor | None:
    """``out`` when the padded matrix can be written into it directly (no padding), else None."""
    if out is None:
        return None
    if tuple(out.shape) != tuple(spec.shape) or not out.is_contiguous():
        layout = "contiguous" if out.is_contiguous() else "non-contiguous"
        raise ValueError(f"out must be a contiguous tensor of shape {tuple(spec.shape)}, "
                         f"not a {layout} one of shape {tuple(out.shape)}")
    return out if unpadded(spec) else None


def unpadded(spec: GeneratorSpec) -> bool:
    """Whether the padded (rows, cols) matrix is the weight matrix itself."""
    return (spec.rows, spec.cols) == tuple(spec.matrix_shape)


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


class BilinearForm(torch.autograd.Function):
    """L^T Y M for a large constant Y (P, Q) and thin L (P, a), M (Q, b): reads Y three times.

    Both gradients keep Y in its stored orientation: dL = Y (M G^T) and dM = ((L G)^T Y)^T.
    A product with Y^T as the left operand (autograd's choice for dM) runs up to 20x slower.
    A bfloat16 Y is read in float32 blocks (``target``).
    """

    @staticmethod
    def forward(ctx, left: torch.Tensor, target: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(left, target, right)
        return left.T @ target_matmul(target, right)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        left, target, right = ctx.saved_tensors
        grad_left = target_matmul(target, right @ grad.T) if ctx.needs_input_grad[0] else None
        grad_right = target_tmatmul(left @ grad, target).T if ctx.needs_input_grad[2] else None
        return grad_left, None, grad_right


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


class TTN(Generator):
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

    def legs(self) -> torch.Tensor:
        left, right = self.top_messages()
        return ((left @ self.root) @ right.T).reshape(self.spec.leg_dims)

    def forward(self, out: torch.Tensor | None = None) -> torch.Tensor:
        left, right = self.top_messages()
        product = halves_product(left @ self.root, right, self.spec, self.spec.n_legs // 2,
                                 direct_output(out, self.spec))
        return crop_matrix(product, self.spec, out)

    def row_blocks(self) -> Iterator[torch.Tensor]:
        if not unpadded(self.spec):
            yield self()
            return
        left, right = self.top_messages()
        for _, block in halves_rows(left @ self.root, right, self.spec, self.spec.n_legs // 2):
            yield block.view(-1, *self.spec.shape[1:])

    def squared_distance(self, target_legs: torch.Tensor, target_norm_sq: torch.Tensor) -> torch.Tensor:
        """||Y - L R R'^T||^2 = ||Y||^2 - 2<L^T Y R', R> + <L^T L R R'^T R', R>, no N-sized tensor."""
        left, right = self.top_messages()
        target = target_legs.reshape(left.shape[0], right.shape[0])
        cross = (BilinearForm.apply(left, target, right) * self.root).sum()
        gram = ((left.T @ left) @ self.root @ (right.T @ right) * self.root).sum()
        return target_norm_sq - 2 * cross + gram

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
