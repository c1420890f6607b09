"""Truncated-SVD baseline: W ~ U V^T on the weight matrix (rows = out, cols = in*kh*kw).

The spec has one leg per side, out_dims = (rows,), in_dims = (cols,), no padding, and
bond_dims = (rank,); U (rows, r) and V (cols, r) hold the r = min(rank, rows, cols) leading singular
triplets as U = U_r S^1/2, V = V_r S^1/2 after ``from_weight`` (the Eckart-Young optimum). Large
matrices with a small rank use the randomised range finder (``torch.svd_lowrank``, a few power
iterations) instead of a full SVD. ``legs`` is the matrix U V^T, and ``squared_distance`` never
forms it: ||Y - U V^T||^2 = ||Y||^2 - 2 <U, Y V> + <U^T U, V^T V>.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from adntn.errors import AdntnError
from adntn.memory import current_policy
from adntn.core.spec import GeneratorSpec
from adntn.networks.base import Generator
from adntn.networks.target import is_narrow
from adntn.networks.halves import BilinearForm

EXACT_SVD_MAX_SIDE = 1024  # a full float64 SVD when the smaller side is at most this
LOWRANK_OVERSAMPLE = 10
LOWRANK_POWER_ITERATIONS = 4


def svd_rank(spec: GeneratorSpec) -> int:
    """The rank actually used: bond_dims[0] capped by the matrix sides."""
    if spec.n_legs != 1 or len(spec.bond_dims) != 1 or (spec.rows, spec.cols) != spec.matrix_shape:
        raise AdntnError("An svd spec has out_dims=(rows,), in_dims=(cols,) of the weight matrix "
                         "and bond_dims=(rank,).")
    return min(spec.bond_dims[0], spec.rows, spec.cols)


class SVD(Generator):
    arch = "svd"
    linear_only = True

    @classmethod
    def levels(cls, n_legs: int) -> int:
        return 1

    @classmethod
    def leg_counts(cls, rows: int, cols: int) -> list[int]:
        return [1]

    @classmethod
    def default_leg_count(cls, rows: int, cols: int) -> int:
        return 1

    @classmethod
    def make_spec(cls, shape: tuple[int, ...], bond_dims: tuple[int, ...], activation: str,
                  n_legs: int = 1) -> GeneratorSpec:
        """The matrix itself as one leg per side; ``bond_dims`` = (rank,)."""
        rows, cols = shape[0], math.prod(shape[1:])
        return GeneratorSpec(cls.arch, tuple(shape), (rows,), (cols,), tuple(bond_dims), "none")

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        rank = svd_rank(spec)
        self.u = nn.Parameter(torch.randn(spec.rows, rank) / math.sqrt(spec.rows))
        self.v = nn.Parameter(torch.randn(spec.cols, rank) / math.sqrt(spec.cols * rank))

    @classmethod
    def param_count(cls, spec: GeneratorSpec) -> int:
        return svd_rank(spec) * (spec.rows + spec.cols)

    def legs(self) -> torch.Tensor:
        """The (rows, cols) matrix U V^T."""
        return self.u @ self.v.T

    def forward(self, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            return (self.u @ self.v.T).reshape(self.spec.shape)
        if torch.is_grad_enabled() and (self.u.requires_grad or self.v.requires_grad):
            return out.copy_((self.u @ self.v.T).reshape(self.spec.shape))
        return torch.mm(self.u, self.v.T, out=out.view(self.spec.rows, self.spec.cols)).view(self.spec.shape)

    def row_blocks(self) -> Iterator[torch.Tensor]:
        """Rows of U V^T, one streamed block (``memory.current_policy``) at a time."""
        rows = current_policy().block_rows(self.spec.cols)
        for block in self.u.split(rows):
            yield (block @ self.v.T).reshape(-1, *self.spec.shape[1:])

    has_factorized = True

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """y = (x V) U^T for x (..., cols): W = U V^T never formed; autograd-correct."""
        flat = x.reshape(-1, self.spec.cols)
        return ((flat @ self.v) @ self.u.T).reshape(*x.shape[:-1], self.spec.rows)

    def linear_macs(self, batch: int) -> int:
        return batch * self.u.shape[1] * (self.spec.rows + self.spec.cols)

    def generation_macs(self) -> int:
        return self.spec.rows * self.spec.cols * self.u.shape[1]

    def block_values(self) -> int:
        return current_policy().block_rows(self.spec.cols) * self.spec.cols

    def squared_distance(self, target_legs: torch.Tensor, target_norm_sq: torch.Tensor) -> torch.Tensor:
        target = target_legs.reshape(self.spec.rows, self.spec.cols)
        cross = ((self.u * (target @ self.v)).sum() if not is_narrow(target)
                 else BilinearForm.apply(self.u, target, self.v).diagonal().sum())
        gram = ((self.u.T @ self.u) * (self.v.T @ self.v)).sum()
        return target_norm_sq - 2 * cross + gram

    @classmethod
    def fit_target(cls, spec: GeneratorSpec, weight: torch.Tensor, *, after_block=None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (rows, cols) weight matrix as it is (a view; no copy for a float32 weight and
        ``dtype``)."""
        return weight.detach().reshape(spec.rows, spec.cols).to(dtype)

    @classmethod
    @torch.no_grad()
    def from_target(cls, spec: GeneratorSpec, target: torch.Tensor) -> SVD:
        net = cls(spec)
        rank = net.u.shape[1]
        matrix = target.reshape(spec.rows, spec.cols)
        sketch = rank + LOWRANK_OVERSAMPLE
        small = min(matrix.shape) <= EXACT_SVD_MAX_SIDE
        if small or 2 * sketch > min(matrix.shape):
            left, values, right_h = torch.linalg.svd(matrix.double() if small else matrix.float(),
                                                     full_matrices=False)
            right = right_h.T
        else:
            left, values, right = torch.svd_lowrank(matrix.float(), q=sketch, niter=LOWRANK_POWER_ITERATIONS)
        scale = values[:rank].sqrt()
        net.u.copy_(left[:, :rank] * scale)
        net.v.copy_(right[:, :rank] * scale)
        return net
