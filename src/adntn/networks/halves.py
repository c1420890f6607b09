"""Generators whose leg tensor is a product of two halves: ttn, tt and attn share this.

Cut the K legs after leg m: the left half's legs carry the coarse row and column digits, the
right half's the fine ones. Such a generator provides the two halves

    left (P, b), rows over legs 1..m, (o_1, i_1, ..., o_m, i_m) row-major
    right (Q, b), rows over legs m+1..K

with legs = left @ right^T (TTN: left = M_l R, right = M_r at the root; TT: the cores left and
right of the split), and :class:`HalvesGenerator` derives the rest from them once: the weight
written directly as a matrix (``halves_product``, no N-sized permutation), its row blocks
(``halves_rows``) and the distance to a target without materialising the weight
(``halves_distance``). aTTN adds its middle disentangler's correction through the hooks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from adntn.core.spec import GeneratorSpec
from adntn.core.tensorize import choose_leg_factors, prime_factors
from adntn.memory import current_policy
from adntn.networks.base import Generator
from adntn.networks.target import target_matmul, target_tmatmul


# The fewest rows or columns a half's block may keep when ``oriented_leg_factors`` moves digits
# between them: VGG-16's fc7 (4096x4096) is cut into blocks of 256x16 and 16x256 by
# ``choose_leg_factors`` itself, and its quality rows were measured so; on the CIFAR-10 VGG-16-BN
# blocks 4 digits thin lost agreement with dense (bench/results/quality-digit-orientation.md).
MIN_BLOCK_SIDE = 16


def halves_macs(out_dims: tuple[int, ...], in_dims: tuple[int, ...], m: int) -> int:
    """Multiply-adds a row, per unit of bond, of the halves' product y = x W^T cut after leg m: the
    cheaper of x j (i + y) and i y (j + x) (``HalvesGenerator.linear_order``)."""
    x, i, y, j = math.prod(out_dims[:m]), math.prod(in_dims[:m]), math.prod(out_dims[m:]), math.prod(in_dims[m:])
    return min(x * j * (i + y), i * y * (j + x))


def halves_order(x: int, i: int, y: int, j: int) -> str:
    """The order of the halves' product with fewer multiply-adds for blocks (x, i) | (y, j):
    "left" (contract the coarse input digits i first, x j (i + y) a row per unit of bond) or
    "right" (the fine ones j, i y (j + x)); both scale with the batch, so it holds for every batch."""
    return "left" if x * j * (i + y) <= i * y * (j + x) else "right"


def oriented_leg_factors(rows: int, cols: int, n_legs: int,
                         min_side: int = MIN_BLOCK_SIDE) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``choose_leg_factors``, then a prime p moved between halves as a row digit one way and a column
    digit the other ((o, i) -> (o/p, i p) on one leg, (o p, i/p) on one of the other half), which
    keeps every leg's dim and so the tree, while that lowers ``halves_macs`` and each side of the
    halves' blocks (x, i, y, j) stays at least ``min_side``. On VGG-16's fc6 (4096x25088): blocks
    (rows x cols) of 64x392 and 64x64 become 16x1568 and 256x16, 4.0x fewer multiply-adds; fc7's
    256x16 and 16x256 stay."""
    out_dims, in_dims = (list(dims) for dims in choose_leg_factors(rows, cols, n_legs))
    m = n_legs // 2
    while True:
        cost, best = halves_macs(out_dims, in_dims, m), None
        for a in range(n_legs):
            for b in range(n_legs):
                if (a < m) == (b < m):
                    continue
                for p in sorted(set(prime_factors(out_dims[a])) & set(prime_factors(in_dims[b]))):
                    out, inn = out_dims.copy(), in_dims.copy()
                    out[a], inn[a], out[b], inn[b] = out[a] // p, inn[a] * p, out[b] * p, inn[b] // p
                    sides = (math.prod(out[:m]), math.prod(inn[:m]), math.prod(out[m:]), math.prod(inn[m:]))
                    moved = halves_macs(out, inn, m)
                    if min(sides) >= min_side and moved < cost:
                        cost, best = moved, (out, inn)
        if best is None:
            return tuple(out_dims), tuple(in_dims)
        out_dims, in_dims = best


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




def halves_distance(left: torch.Tensor, right: torch.Tensor, target: torch.Tensor,
                    target_norm_sq: torch.Tensor) -> torch.Tensor:
    """||Y - L R^T||^2 = ||Y||^2 - 2 tr(L^T Y R) + <L^T L, R^T R> for Y (P, Q): one pass over Y
    (``BilinearForm``), no N-sized tensor."""
    cross = BilinearForm.apply(left, target, right).diagonal().sum()
    gram = ((left.T @ left) * (right.T @ right)).sum()
    return target_norm_sq - 2 * cross + gram


class HalvesGenerator(Generator):
    """A generator given by ``halves()`` (see the module docstring) and the cut ``split`` = m."""

    @classmethod
    def leg_factors(cls, rows: int, cols: int, n_legs: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Digits placed for the halves' product (``oriented_leg_factors``)."""
        return oriented_leg_factors(rows, cols, n_legs)

    @property
    def split(self) -> int:
        """m: the left half holds legs 1..m (the middle of the tree by default)."""
        return self.spec.n_legs // 2

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """left (P, b) and right (Q, b), legs = left @ right^T."""
        raise NotImplementedError

    def legs(self) -> torch.Tensor:
        left, right = self.halves()
        # a row-major right operand: for a column-major one, mm's backward reads the N-sized
        # gradient transposed, several times slower
        return (left @ right.T.contiguous()).reshape(self.spec.leg_dims)

    def forward(self, out: torch.Tensor | None = None) -> torch.Tensor:
        left, right = self.halves()
        product = halves_product(left, right, self.spec, self.split, direct_output(out, self.spec))
        return crop_matrix(self.correct_matrix(product, left, right), self.spec, out)

    def correct_matrix(self, product: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """Hook: ``product`` (the padded matrix from the halves) with any correction added; as is."""
        return product

    def row_blocks(self) -> Iterator[torch.Tensor]:
        if not unpadded(self.spec):
            yield self()
            return
        left, right = self.halves()
        for block in self.corrected_rows(halves_rows(left, right, self.spec, self.split), left, right):
            yield block.view(-1, *self.spec.shape[1:])

    def corrected_rows(self, rows: Iterator[tuple[int, torch.Tensor]], left: torch.Tensor,
                       right: torch.Tensor) -> Iterator[torch.Tensor]:
        """Hook: the blocks of ``halves_rows`` with any correction added; as they are."""
        return (block for _, block in rows)

    def squared_distance(self, target_legs: torch.Tensor, target_norm_sq: torch.Tensor) -> torch.Tensor:
        left, right = self.halves()
        target = target_legs.reshape(left.shape[0], right.shape[0])
        return halves_distance(left, right, target, target_norm_sq)

    # ------------------------------------------------------------------ inference without W

    has_factorized = True

    def _digit_sizes(self) -> tuple[int, int, int, int, int]:
        """(x, i, y, j, chi): the halves' row and column digit products and the bond joining them
        (found once from the halves' shapes: they do not change with the cores' values)."""
        sizes = self.__dict__.get("_digit_sizes_cache")
        if sizes is None:
            spec, m = self.spec, self.split
            with torch.no_grad():
                chi = self.halves()[0].shape[1]
            sizes = (math.prod(spec.out_dims[:m]), math.prod(spec.in_dims[:m]),
                     math.prod(spec.out_dims[m:]), math.prod(spec.in_dims[m:]), chi)
            self.__dict__["_digit_sizes_cache"] = sizes
        return sizes

    @property
    def linear_order(self) -> str:
        """"left" or "right": the halves' product in the order of fewer multiply-adds (``halves_order``)."""
        x, i, y, j, _ = self._digit_sizes()
        return halves_order(x, i, y, j)

    def linear_operands(self) -> dict[str, torch.Tensor]:
        """The GEMM operands of ``linear`` (``halves_operands``); subclasses add their correction's."""
        return self.halves_operands(*self.halves())

    def halves_operands(self, left: torch.Tensor, right: torch.Tensor) -> dict[str, torch.Tensor]:
        """The regrouped halves as GEMM operands for ``linear_order`` (``_regrouped``: L (x, i, b),
        R (y, b, j)): "left": A = L as (x b, i), B = R as (b j, y); "right": A = R as (j, y b),
        B = L as (i b, x). Only these two are kept (the halves themselves are not)."""
        lg, rg = _regrouped(left, right, self.spec, self.split)
        (x, i, chi), (y, _, j) = lg.shape, rg.shape
        if self.linear_order == "left":
            a = lg.permute(0, 2, 1).reshape(x * chi, i)
            b = rg.permute(1, 2, 0).reshape(chi * j, y)
        else:
            a = rg.permute(2, 0, 1).reshape(j, y * chi)
            b = lg.permute(1, 2, 0).reshape(i * chi, x)
        return {"a": a, "b": b}

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T for x (..., in*kh*kw), W never formed; autograd-correct.

        With L (x, i, b), R (y, b, j) the regrouped halves, W[(x, y), (i, j)] = sum_b L[x,i,b]
        R[y,b,j] on the padded matrix. The input's columns are zero-padded to i*j and viewed as
        X[n, i, j]; then, in ``linear_order``:
          left:  T[n, (x, b), j] = sum_i L[x,i,b] X[n,i,j]   (a batched GEMM, A (x b, i) @ X[n])
                 y[n, x, y] = sum_bj T[n, x, (b, j)] R[y,b,j] (one GEMM, M = n x)
          right: U[n, i, (y, b)] = sum_j X[n,i,j] R[y,b,j]   (one GEMM, M = n i)
                 y[n, y, x] = sum_ib U[n, y, (i, b)] L[x,i,b] (one GEMM on U permuted, M = n y)
        and the rows are cropped to ``out`` (``correct_linear`` adds any correction first). The
        operands are cached while the cores are unchanged, unless a gradient wrt them is wanted
        (``Generator.cached``). The rows of x go through the product in chunks whose
        intermediate (T or U) stays cache-sized (``linear_chunk_rows``); the correction takes the
        whole batch."""
        spec = self.spec
        rows, cols = spec.matrix_shape
        ops = self.cached("linear", self.linear_operands)
        lead = x.shape[:-1]
        flat = x.reshape(-1, cols)
        if spec.cols != cols:
            flat = torch.nn.functional.pad(flat, (0, spec.cols - cols))
        n, chunk = flat.shape[0], self.linear_chunk_rows()
        # traced (export, ONNX): one piece, the batch staying symbolic
        if torch.compiler.is_compiling() or n <= chunk:
            out = self._product_rows(flat, ops)
        else:
            out = flat.new_empty(n, spec.rows)
            for start in range(0, n, chunk):
                out[start:start + chunk] = self._product_rows(flat[start:start + chunk], ops)
        out = self.correct_linear(out, flat, ops)  # on the whole batch: its path is planned for it
        if spec.rows != rows:
            out = out[:, :rows]
        return out.reshape(*lead, rows)

    def linear_chunk_rows(self) -> int:
        """Rows of x per chunk of the halves' product in ``linear``: T (x b j values a row) or U
        (i y b) in one cache-sized block (``memory.current_policy``). On VGG-16's fc6
        at 2,000x (T 426 KB a row), batch 256: chunks of 2 rows 120 ms, the whole batch (a T of
        109 MB, through memory) 150-280 ms (AMD EPYC, 2 threads; chunks of 1-8 rows: 120-126)."""
        return max(1, current_policy().cache_values() // self.linear_row_values())

    def linear_row_values(self) -> int:
        """Values per input row of the product's intermediate (T or U)."""
        xs, i, y, j, chi = self._digit_sizes()
        return xs * chi * j if self.linear_order == "left" else i * y * chi

    def _product_rows(self, flat: torch.Tensor, ops: dict) -> torch.Tensor:
        """The halves' product applied to ``flat`` (n, padded cols): (n, padded rows), in
        ``linear_order``, without the correction of ``correct_linear``."""
        n = flat.shape[0]
        a, b = ops["a"], ops["b"]
        xs, i, y, j, chi = self._digit_sizes()
        if self.linear_order == "left":
            # (n, x b, j); one plain GEMM for a single row (the broadcast bmm costs ~20 us more)
            t = a @ flat.view(i, j) if n == 1 else torch.matmul(a, flat.reshape(n, i, j))
            out = (t.view(n * xs, chi * j) @ b).view(n, xs * y)
        else:
            u = (flat.reshape(n * i, j) @ a).view(n, i, y, chi)
            out = (u.permute(0, 2, 1, 3).reshape(n * y, i * chi) @ b).view(n, y, xs)
            out = out.transpose(1, 2).reshape(n, xs * y)
        return out

    def correct_linear(self, out: torch.Tensor, flat: torch.Tensor, ops: dict) -> torch.Tensor:
        """Hook: ``out`` (n, padded rows) of ``linear`` with any correction for the padded input
        ``flat`` (n, padded cols) added; as is."""
        return out

    def linear_macs(self, batch: int) -> int:
        x, i, y, j, chi = self._digit_sizes()
        if self.linear_order == "left":
            return batch * x * chi * j * (i + y)
        return batch * i * y * chi * (j + x)

    def linear_state_bytes(self) -> int:
        x, i, y, j, chi = self._digit_sizes()
        return 4 * chi * (x * i + y * j)

    def generation_macs(self) -> int:
        return self.spec.rows * self.spec.cols * self._digit_sizes()[4]

    def block_values(self) -> int:
        x, i, y, j, _ = self._digit_sizes()
        return y * i * j

    def matrix_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, block): the blocks of ``halves_rows`` (with ``corrected_rows``), each
        cropped to the weight's rows and columns, so a padded weight is blocked too."""
        if unpadded(self.spec):
            yield from super().matrix_blocks()
            return
        rows, cols = self.spec.matrix_shape
        with torch.no_grad():
            left, right = self.halves()
            start = 0
            for block in self.corrected_rows(halves_rows(left, right, self.spec, self.split), left, right):
                if start >= rows:
                    break
                matrix = block.view(block.shape[0], -1)
                yield start, matrix[:rows - start, :cols]
                start += matrix.shape[0]
