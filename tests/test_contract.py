"""core.contract.gemm_einsum is torch.einsum: for every equation, operand layout (contiguous or a
permuted view) and shape, with the same gradients, and without copying an operand that already
lies as a matrix."""

from __future__ import annotations

import string

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adntn.core import contract
from adntn.core.contract import gemm_einsum

from tolerances import assert_close_scaled

LETTERS = string.ascii_lowercase[:7]


@st.composite
def einsums(draw) -> tuple[str, list[torch.Tensor]]:
    """An explicit equation over up to 4 operands (each index once per operand, sizes 1-4; an
    index may be shared by several operands, kept or summed, or stand alone) and float64
    operands, some given as permuted views."""
    sizes = {name: draw(st.integers(1, 4)) for name in LETTERS}
    n_operands = draw(st.integers(2, 4))
    terms = [draw(st.permutations(LETTERS).map(lambda p, k=draw(st.integers(1, 4)): "".join(p[:k])))
             for _ in range(n_operands)]
    used = sorted(set("".join(terms)))
    output = "".join(draw(st.permutations(used))[:draw(st.integers(0, len(used)))])
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    operands = []
    for term in terms:
        shape = [sizes[name] for name in term]
        if draw(st.booleans()) and len(term) > 1:  # a permuted view of a contiguous tensor
            order = draw(st.permutations(range(len(term))))
            base = torch.randn([shape[a] for a in order], generator=generator, dtype=torch.float64)
            operands.append(base.permute([order.index(a) for a in range(len(term))]))
        else:
            operands.append(torch.randn(shape, generator=generator, dtype=torch.float64))
    return f"{','.join(terms)}->{output}", operands


@settings(max_examples=150, deadline=None)
@given(einsums())
def test_gemm_einsum_equals_torch_einsum_with_its_gradients(case) -> None:
    equation, operands = case
    leaves = [t.detach().clone().requires_grad_() for t in operands]
    expected = torch.einsum(equation, *leaves)
    actual = gemm_einsum(equation, *leaves)
    assert actual.shape == expected.shape
    # the magnitude of the summed terms: the same einsum on |operands| (an entry small by
    # cancellation, e.g. a full contraction to a scalar, carries the rounding of its terms)
    magnitudes = [t.detach().abs().requires_grad_() for t in operands]
    bound = torch.einsum(equation, *magnitudes)
    assert_close_scaled(actual, expected, scale=float(bound.detach().max()) if bound.numel() else 0.0)
    upstream = torch.randn(expected.shape, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, leaves, upstream)
    actual_grads = torch.autograd.grad(gemm_einsum(equation, *leaves), leaves, upstream)
    grad_bounds = torch.autograd.grad(bound, magnitudes, upstream.abs(), allow_unused=True)
    grad_scale = max((float(g.max()) for g in grad_bounds if g is not None and g.numel()), default=0.0)
    assert_close_scaled(actual_grads, expected_grads, scale=grad_scale)


def test_a_batch_operand_with_its_contracted_axes_apart_is_copied_once_in_long_runs(monkeypatch) -> None:
    """X (n, a, c, d, g) contracted over a and g (aTTN's correction at a large batch): one copy of X,
    into (n, c, d, a, g), whose inner run is g (8 floats), not the 4-float runs of (g, a, n, c, d)."""
    x = torch.randn(8, 6, 2, 2, 8)
    k = torch.randn(6, 8, 3)
    copies = []
    real = contract._as_matrix

    def spy(tensor, plan):
        if not tensor.is_meta:  # not the planning run
            copies.append((tuple(tensor.shape), plan))
        return real(tensor, plan)

    monkeypatch.setattr(contract, "_as_matrix", spy)
    result = gemm_einsum("nacdg,agy->ncdy", x, k)
    torch.testing.assert_close(result, torch.einsum("nacdg,agy->ncdy", x, k))
    (x_axes, _, x_transposed), = [plan for shape, plan in copies if shape == tuple(x.shape)]
    assert x_axes == (0, 2, 3, 1, 4) and not x_transposed


def test_an_operand_that_lies_as_a_matrix_is_not_copied() -> None:
    """A (m, k) @ B^T for B (n, k) given as B and as B.T's transpose: no copy either way."""
    a, b = torch.randn(5, 7), torch.randn(3, 7)
    for right in (b, b.T.contiguous().T):
        plan = contract._plan("mk,nk->mn", ((tuple(a.shape), a.stride()), (tuple(right.shape), right.stride())))
        (_, _, (_, left_plan, right_plan, _, _)), = plan.steps
        assert contract._as_matrix(a, left_plan).data_ptr() == a.data_ptr()
        assert contract._as_matrix(right, right_plan).data_ptr() == right.data_ptr()
        torch.testing.assert_close(gemm_einsum("mk,nk->mn", a, right), a @ b.T)


@settings(max_examples=80, deadline=None)
@given(einsums())
def test_einsum_copies_counts_what_gemm_einsum_copies(case) -> None:
    """``einsum_copies`` (planned on meta tensors) equals the values a run on contiguous operands
    copies: operands read as a matrix through a copy, and a result that is not contiguous in the
    output's order."""
    equation, operands = case
    operands = [t.contiguous() for t in operands]
    copied = []
    real = contract._as_matrix

    def spy(tensor, plan):
        matrix = real(tensor, plan)
        if not tensor.is_meta and matrix.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr():
            copied.append(tensor.numel())
        return matrix

    contract._as_matrix = spy
    try:
        result = gemm_einsum(equation, *operands)
    finally:
        contract._as_matrix = real
    expected = sum(copied) + (0 if result.is_contiguous() else result.numel())
    assert contract.einsum_copies(equation, tuple(tuple(t.shape) for t in operands)) == expected
