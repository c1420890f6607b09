"""An einsum run pairwise as GEMMs on the operands' own layouts.

opt_einsum finds the order of the pairwise contractions; its torch backend runs each as
``tensordot``, which permutes both operands to (free, contracted) x (contracted, free) and
copies them unless they already lie so, in an order of the contracted axes that it picks
itself. For a batch-sized operand whose contracted axes are not adjacent, that copy can take
several times the GEMM: VGG-16's fc6 aTTN correction contracts X (n, 196, 2, 2, 32) over its
196 and its 32, and the copy to (32, 196, n, 2, 2) moves runs of four floats (95 against 3 ms
for the same copy to (n, 2, 2, 196, 32) at batch 256, the GEMM 19 ms; an Intel Xeon, 2 threads).

Here each pair is one GEMM, the larger operand on the left, its contracted axes in the order
(of either operand) that leaves fewer values to copy: an operand whose free and contracted
axes each merge into one axis is read as it lies (as a strided matrix, transposed through the
GEMM's flag where needed); else it is copied once, into (free, contracted) or (contracted, free),
whichever moves the longer runs (``_inner_run``). The decisions depend on the shapes and strides
only and are made once, on meta tensors (``_plan``). A pair that shares a kept axis (a batch
axis) or sums an axis out alone goes to ``torch.einsum``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import opt_einsum
from opt_einsum.contract import PathInfo
import torch


def _flattens(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether axes of these sizes and strides can be merged into one axis without a copy."""
    kept = [(size, stride) for size, stride in zip(shape, strides) if size != 1]
    return all(outer_stride == inner_size * inner_stride
               for (_, outer_stride), (inner_size, inner_stride) in zip(kept, kept[1:]))


def _view_axes(tensor: torch.Tensor, term: str, contracted: str) -> tuple[list[int], list[int], bool]:
    """(free axes, contracted axes in the given order, whether the (free, contracted) matrix is a
    view: each group merges into one axis, whatever their strides)."""
    free = [axis for axis, name in enumerate(term) if name not in contracted]
    summed = [term.index(name) for name in contracted]
    shape, strides = tensor.shape, tensor.stride()
    groups_flatten = [_flattens(tuple(shape[a] for a in group), tuple(strides[a] for a in group))
                      for group in (free, summed)]
    return free, summed, all(groups_flatten)


Matrix = tuple[tuple[int, ...], tuple[int, int], bool]  # permutation, 2-D shape, transposed after


def _matrix_plan(tensor: torch.Tensor, term: str, contracted: str) -> Matrix:
    """How to read ``tensor`` (axes named by ``term``) as the matrix (free axes in their order,
    ``contracted`` in the given order): a view where one exists, else one copy into the layout
    (free, contracted) or (contracted, free) with the longer inner run (the second read back
    transposed, through the GEMM's flag)."""
    free, summed, is_view = _view_axes(tensor, term, contracted)
    rows, cols = math.prod(tensor.shape[a] for a in free), math.prod(tensor.shape[a] for a in summed)
    if is_view or _inner_run(tensor, [*free, *summed]) >= _inner_run(tensor, [*summed, *free]):
        return (*free, *summed), (rows, cols), False
    return (*summed, *free), (cols, rows), True


def _as_matrix(tensor: torch.Tensor, plan: Matrix) -> torch.Tensor:
    axes, shape, transposed = plan
    matrix = tensor.permute(axes).reshape(shape)
    return matrix.T if transposed else matrix


def _inner_run(tensor: torch.Tensor, order: list[int]) -> int:
    """The length of the innermost loop of copying ``tensor`` into a new contiguous tensor of
    axes ``order``: the trailing axes that lie contiguously in both, merged (a copy moving long
    runs is several times faster than one that writes or reads a few floats at a time)."""
    kept = [axis for axis in order if tensor.shape[axis] != 1]
    if not kept:
        return 1
    run, inner = tensor.shape[kept[-1]], kept[-1]
    for axis in reversed(kept[:-1]):
        if tensor.stride(axis) != tensor.stride(inner) * tensor.shape[inner]:
            break
        run, inner = run * tensor.shape[axis], axis
    return run


Step = tuple[tuple[int, ...], str, tuple | None]  # positions popped, result term, GEMM (None: einsum)


def _pair_plan(left: torch.Tensor, left_term: str, right: torch.Tensor, right_term: str,
               result: str) -> tuple | None:
    """The GEMM for two operands: (swap, left matrix, right matrix, result sizes, result term),
    the larger operand on the left (``swap``: the second picked is), the contracted axes in the
    order that copies fewer values; None for ``torch.einsum`` (a batch axis or a lone sum)."""
    shared = set(left_term) & set(right_term)
    contracted_set = shared - set(result)
    if shared & set(result) or (set(left_term) ^ set(right_term)) - set(result):
        return None
    swap = right.numel() > left.numel()
    if swap:
        left, left_term, right, right_term = right, right_term, left, left_term

    def copied(contracted: str) -> int:
        return sum(t.numel() for t, term in ((left, left_term), (right, right_term))
                   if not _view_axes(t, term, contracted)[2])

    contracted = min(("".join(name for name in term if name in contracted_set) for term in (left_term, right_term)),
                     key=copied)
    free_left = [name for name in left_term if name not in contracted_set]
    free_right = [name for name in right_term if name not in contracted_set]
    sizes = tuple([left.shape[left_term.index(n)] for n in free_left]
                  + [right.shape[right_term.index(n)] for n in free_right])
    return (swap, _matrix_plan(left, left_term, contracted), _matrix_plan(right, right_term, contracted),
            sizes, "".join(free_left + free_right))


def _run(step: Step, picked: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, str]:
    """One step of a plan on the picked (tensor, term) operands."""
    _, result, gemm = step
    if gemm is None:  # the picked terms, not opt_einsum's: an earlier GEMM may leave its axes in another order
        equation = ",".join(term for _, term in picked) + "->" + result
        return torch.einsum(equation, *(tensor for tensor, _ in picked)), result
    swap, left_plan, right_plan, sizes, term = gemm
    (left, _), (right, _) = picked[::-1] if swap else picked
    product = _as_matrix(left, left_plan) @ _as_matrix(right, right_plan).T
    return product.reshape(sizes), term


#: dynamic programming up to this many operands: its time grows about 3.5x per operand (on
#: equations of MERA's ``linear`` form, batch 256: 0.2-0.4 s for 10 operands, 2-3 s for 12, 34 s
#: for 14; the 18 of a 16-leg MERA had not finished after 22 minutes)
DYNAMIC_PROGRAMMING_OPERANDS = 10


def path_search(operands: int) -> str | opt_einsum.paths.PathOptimizer:
    """opt_einsum's path search for a contraction of this many operands: "optimal" (exhaustive,
    fewest flops) up to five; then dynamic programming on flops plus the values each step writes
    (``minimize="combo"``; the exhaustive search takes minutes for ten operands, this 0.1-0.4 s),
    up to ``DYNAMIC_PROGRAMMING_OPERANDS``; beyond, "branch-1" (opt_einsum's branch and bound
    keeping one branch per step: milliseconds for 18 operands, and on the smallest MERAs the cost
    of its "auto-hq"). The writes count because many of those steps contract an axis of 2-7:
    a GEMM that thin costs its memory traffic, not its flops (MERA's ``linear`` on VGG-16 fc6 at
    50,029x, batch 1: 74 ms on the path of fewest flops, 38 ms on this one)."""
    if operands <= 5:
        return "optimal"
    if operands <= DYNAMIC_PROGRAMMING_OPERANDS:
        return opt_einsum.DynamicProgramming(minimize="combo")
    return "branch-1"


@functools.lru_cache(maxsize=256)
def _path(equation: str, shapes: tuple[tuple[int, ...], ...]) -> PathInfo:
    """opt_einsum's ``path_search`` path for operands of ``shapes`` (it depends on the shapes
    alone, so ``einsum_macs`` and every layout's ``_plan`` share it)."""
    return opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=path_search(len(shapes)))[1]


def einsum_macs(equation: str, shapes: tuple[tuple[int, ...], ...]) -> int:
    """Multiply-adds of ``equation`` on operands of ``shapes`` along ``path_search``'s path (the
    one ``gemm_einsum`` takes)."""
    return int(_path(equation, shapes).opt_cost) // 2


def einsum_copies(equation: str, shapes: tuple[tuple[int, ...], ...]) -> int:
    """Values ``gemm_einsum`` copies when every operand of ``shapes`` is contiguous: the operands
    (given or made by an earlier step) that no view reads as the matrix their GEMM wants, and the
    result if it cannot be read flat in the output's order (a ``reshape`` of it copies)."""
    layouts = tuple((shape, torch.empty(shape, device="meta").stride()) for shape in shapes)
    return _plan(equation, layouts).copied


def _copied(tensor: torch.Tensor, plan: Matrix) -> int:
    """``tensor.numel()`` if reading it as ``plan``'s matrix takes a copy, else 0."""
    axes, shape, _ = plan
    try:
        tensor.permute(axes).view(shape)
    except RuntimeError:
        return tensor.numel()
    return 0


class Plan(NamedTuple):
    """``gemm_einsum``'s steps for one equation and operand layouts, and the values they copy
    (``einsum_copies``)."""

    steps: tuple[Step, ...]
    copied: int


@functools.lru_cache(maxsize=256)
def _plan(equation: str, layouts: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]) -> Plan:
    """The steps for operands of these (shape, strides): opt_einsum's pairwise order
    (``path_search``), each pair's GEMM decided on meta tensors that carry the layouts through the
    steps, which also count the values copied."""
    inputs, output = equation.split("->")
    info = _path(equation, tuple(shape for shape, _ in layouts))
    tensors = [(torch.empty_strided(shape, strides, device="meta"), term)
               for (shape, strides), term in zip(layouts, inputs.split(","))]
    steps: list[Step] = []
    copied = 0
    for positions, _, step_equation, *_ in info.contraction_list:
        picked = [tensors.pop(k) for k in sorted(positions, reverse=True)]
        result = step_equation.split("->")[1]
        gemm = _pair_plan(*picked[0], *picked[1], result) if len(picked) == 2 else None
        if gemm is not None:
            swap, left_plan, right_plan, _, _ = gemm
            (left, _), (right, _) = picked[::-1] if swap else picked
            copied += _copied(left, left_plan) + _copied(right, right_plan)
        step: Step = (tuple(positions), result, gemm)
        tensors.append(_run(step, picked))
        steps.append(step)
    (tensor, term), = tensors
    if not tensor.permute(tuple(term.index(name) for name in output)).is_contiguous():
        copied += tensor.numel()
    return Plan(tuple(steps), copied)


def gemm_einsum(equation: str, *operands: torch.Tensor) -> torch.Tensor:
    """``torch.einsum(equation, *operands)`` (explicit ``->`` output, no repeated index within
    one operand), contracted pairwise in ``path_search``'s order for these shapes, each pair
    a GEMM on the operands' own layouts (module docstring), planned once per shapes and strides.
    The result may be a permuted view."""
    inputs, output = equation.split("->")
    tensors = list(zip(operands, inputs.split(",")))
    for step in _plan(equation, tuple((tuple(t.shape), t.stride()) for t in operands)).steps:
        picked = [tensors.pop(k) for k in sorted(step[0], reverse=True)]
        tensors.append(_run(step, picked))
    (tensor, term), = tensors
    return tensor.permute(tuple(term.index(name) for name in output))
