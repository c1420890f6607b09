"""What every generator shares: the interface, the gain-normalised activation, disentanglers.

A generator is an ``nn.Module`` with no inputs: ``forward()`` returns the dense weight of
``spec.shape``; ``legs()`` returns the same values as a tensor of shape ``spec.leg_dims``.
Each subclass that names an ``arch`` registers itself (``core.registry``) and states its rules as
class methods: how many bond dims a spec has (``levels``), which leg counts it can use, how a spec
is made from a shape and bonds (``make_spec``) and its parameter count (``param_count``); the
budget solver (``networks.budget``) works from these alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import ClassVar

import opt_einsum
import torch
from torch import nn

from adntn.core.contract import path_search
from adntn.core.registry import register
from adntn.core.spec import GeneratorSpec
from adntn.core.tensorize import choose_leg_factors, legs_to_weight, max_legs, smooth_ceiling, weight_to_legs
from adntn.memory import trim_heap

_SLOPE_AT_ZERO = {"tanh": 1.0, "gelu": 0.5, "relu": 1.0}
_SIGMA = {"tanh": torch.tanh, "gelu": nn.functional.gelu, "relu": torch.relu}
_SIGMA_INPLACE = {"tanh": torch.tanh_, "relu": torch.relu_}
INIT_PREACTIVATION = 0.05  # max |gain * z| at initialisation: sigma is then close to linear


class GainedActivation(nn.Module):
    """y = sigma(a z) / (a sigma'(0)) with a learnable gain a = exp(log_gain).

    For small a this is the identity (for tanh and gelu), so a network initialised from a linear
    fit starts at that fit; training grows a where the nonlinearity helps. One stored value.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.log_gain = nn.Parameter(torch.zeros(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        gain = self.log_gain.exp()
        return _SIGMA[self.name](gain * z) / (gain * _SLOPE_AT_ZERO[self.name])

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, 1 / (a sigma'(0))): ``forward(z) == sigma(z * a) * (1 / (a sigma'(0)))``.

        For a network whose activation sits between linear maps, both scalars fold into the
        neighbouring factors (``sigma``), so a weight-sized state passes through sigma alone.
        """
        gain = self.log_gain.exp()
        return gain, 1 / (gain * _SLOPE_AT_ZERO[self.name])

    def sigma(self, z: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """The bare nonlinearity, without the gain (see ``scales``); ``inplace`` overwrites ``z``
        where sigma has an in-place form (tanh, relu) and no gradient is wanted."""
        if inplace and not torch.is_grad_enabled() and self.name in _SIGMA_INPLACE:
            return _SIGMA_INPLACE[self.name](z)
        return _SIGMA[self.name](z)

    @torch.no_grad()
    def calibrate(self, z: torch.Tensor) -> None:
        """Set the gain so that the largest pre-activation |gain*z| is INIT_PREACTIVATION.

        The largest, not the typical value: pre-activations are heavy-tailed (max/rms of 5-23
        seen in MERA states), and calibrating on the rms saturates sigma on the tail.
        """
        largest = z.abs().amax().clamp_min(1e-12)
        self.log_gain.fill_(math.log(INIT_PREACTIVATION / float(largest)))


def activation_sites(spec: GeneratorSpec, count: int) -> nn.ModuleList:
    """``count`` gained activations, or none for a linear network."""
    if spec.activation == "none":
        return nn.ModuleList()
    return nn.ModuleList(GainedActivation(spec.activation) for _ in range(count))


class Disentangler(nn.Module):
    """Mixes two neighbouring legs (joint dim D): x -> x + P Q^T x, P, Q of shape (D, rank).

    An identity plus a low-rank update: 2*D*rank stored values, cost 2*rank per entry, and the
    identity at initialisation (P = 0), so a network with disentanglers starts as its tree.
    """

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(dim, rank))
        self.q = nn.Parameter(torch.randn(dim, rank) / math.sqrt(dim))

    @staticmethod
    def param_count(dim: int, rank: int) -> int:
        return 2 * dim * rank

    def forward(self, view: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Apply to the middle axis (the joint leg, dim D) of ``view`` of shape (pre, D, post)
        (``inplace``: see ``low_rank_update``)."""
        return low_rank_update(view, self.p, self.q.T, inplace=inplace)


def low_rank_update(view: torch.Tensor, p: torch.Tensor, w: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """(I + P W) applied to the middle axis of ``view`` (pre, D, post); P (D, r), W (r, D).

    C = W view is one batched GEMM on the view as it lies (no permutation; the small factors are
    broadcast), then view + P C: for rank 1 a single fused pass (``addcmul`` of P's column and C),
    else a batched GEMM. With a gradient wanted it runs as :class:`_LowRankUpdate`, whose backward
    adds W^T (P^T G) to the incoming gradient G in one pass instead of autograd's two.
    Without a gradient, ``inplace`` (for a view the caller owns) adds P C into ``view`` itself.
    """
    if traced() or not (torch.is_grad_enabled() and any(t.requires_grad for t in (view, p, w))):
        return _low_rank_forward(view, p, w, inplace=inplace and not torch.is_grad_enabled())[0]
    return _LowRankUpdate.apply(view, p, w)


def traced() -> bool:
    """Under torch.compile / torch.export / ONNX tracing: plain ops only (no custom Function)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _add_low_rank(base: torch.Tensor, p: torch.Tensor, coeff: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """base + P coeff for base (pre, D, post), P (D, r), coeff (pre, r, post); into ``base``
    itself when ``inplace``."""
    if p.shape[1] == 1:
        column = p.reshape(1, -1, 1)
        return base.addcmul_(column, coeff) if inplace else torch.addcmul(base, column, coeff)
    factors = (p.expand(base.shape[0], -1, -1), coeff)
    return base.baddbmm_(*factors) if inplace else torch.baddbmm(base, *factors)


def _low_rank_forward(view: torch.Tensor, p: torch.Tensor, w: torch.Tensor,
                      inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(view + P C, C) with C = W view (the first into ``view`` when ``inplace``)."""
    coeff = torch.bmm(w.expand(view.shape[0], -1, -1), view)
    return _add_low_rank(view, p, coeff, inplace), coeff


class _LowRankUpdate(torch.autograd.Function):
    """view + P (W view), backward by hand: G_view = G + W^T (P^T G) in one fused pass,
    G_P = sum G C^T, G_W = sum (P^T G) view^T (C = W view, kept: r/D of the view's size)."""

    @staticmethod
    def forward(ctx, view: torch.Tensor, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out, coeff = _low_rank_forward(view, p, w)
        ctx.save_for_backward(view, p, w, coeff)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        view, p, w, coeff = ctx.saved_tensors
        pre = view.shape[0]
        grad_coeff = torch.bmm(p.T.expand(pre, -1, -1), grad)  # (pre, r, post)
        grad_view = _add_low_rank(grad, w.T, grad_coeff) if ctx.needs_input_grad[0] else None
        grad_p = torch.bmm(grad, coeff.transpose(1, 2)).sum(0) if ctx.needs_input_grad[1] else None
        grad_w = torch.bmm(grad_coeff, view.transpose(1, 2)).sum(0) if ctx.needs_input_grad[2] else None
        return grad_view, grad_p, grad_w


def scaled_squared_distance(x: torch.Tensor, scale: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
    """||s x - T||^2 (s None: 1) without forming s x: forward E = T - s x in one fused pass
    (``addcmul``) and its dot product; backward G_x = -2 s E and G_s = -2 <x, E> (one pass each).
    Autograd's ``mse_loss(x * s, T)`` makes about seven passes over x-sized tensors."""
    if traced() or not torch.is_grad_enabled():
        return _scaled_distance_forward(x, scale, target)[0]
    if scale is None:
        return _ScaledDistance.apply(x, target)
    return _ScaledDistance.apply(x, target, scale)


def _scaled_distance_forward(x: torch.Tensor, scale: torch.Tensor | None,
                             target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    error = target - x if scale is None else torch.addcmul(target, x, scale, value=-1)
    flat = error.reshape(-1)
    return torch.dot(flat, flat), error


class _ScaledDistance(torch.autograd.Function):
    """||s x - T||^2 with a hand-written backward (see ``scaled_squared_distance``); no gradient
    to the target."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        distance, error = _scaled_distance_forward(x, scale, target)
        ctx.save_for_backward(x, error, scale)
        return distance

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, error, scale = ctx.saved_tensors
        factor = -2 * grad if scale is None else -2 * grad * scale
        grad_x = error * factor if ctx.needs_input_grad[0] else None
        grad_scale = None
        if scale is not None and ctx.needs_input_grad[2]:
            grad_scale = (-2 * grad * torch.dot(x.reshape(-1), error.reshape(-1))).reshape(scale.shape)
        return grad_x, None, grad_scale


#: sigma's derivative from its output y, written into ``grad`` (sigma' (y) * grad): what
#: :func:`sigma_mix_distance` supports
_SIGMA_BACKWARD_INPLACE = {
    "tanh": lambda grad, y: torch.ops.aten.tanh_backward.grad_input(grad, y, grad_input=grad),
    "relu": lambda grad, y: torch.ops.aten.threshold_backward.grad_input(grad, y, 0, grad_input=grad),
}
SIGMA_MIX_ACTIVATIONS = tuple(_SIGMA_BACKWARD_INPLACE)


def tanh_by_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """tanh(z) as 2 sigmoid(2z) - 1, within a few units in the last place of 1 (absolute).

    Scaling by 2 is exact and so is 2s - 1 for s >= 1/4 (Sterbenz; below, it rounds by half an ulp
    of 1/2), so the error is twice the sigmoid's: about 2^-22 absolute (1.8e-7 measured; torch.tanh
    is correctly rounded to 0.51 ulp of its own value, far finer near 0). PyTorch hands torch.tanh
    to MKL's vector library, which on AMD CPUs takes its slow path: on an AMD EPYC 3.4 ms for one
    MERA fit tile of fc6 (3.2M values, 2 threads) against 0.63 ms for these three passes;
    sigmoid is ATen's own vectorised kernel on every CPU (on an Intel Xeon MKL's tanh took about
    0.07 ms per 470K values, near these passes' 0.1 ms here; they were not timed there).
    """
    y = torch.mul(z, 2).sigmoid_()
    return torch.add(y.new_tensor(-1.0), y, alpha=2, out=y)


#: sigma on the weight-sized tiles of a fit (:func:`sigma_mix_distance`): the fit's objective may
#: differ from the generator's own sigma by float32's resolution of sigma's range, not of each
#: value (the fitted cores are then measured by the generator itself: ``relative_error``)
_FIT_SIGMA = {"tanh": tanh_by_sigmoid}


def sigma_mix_distance(z: torch.Tensor, sigma: str | None, mix: tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]] | None,
                       scale: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
    """||s (I + P W) sigma(z) - T||^2 with a gradient, in fewer passes than its parts: y = sigma(z)
    (``sigma`` None: the identity, else a key of ``_SIGMA_BACKWARD_INPLACE``; tanh is
    :func:`tanh_by_sigmoid`, sigma' from y as for tanh itself), the low-rank update
    ``mix`` = (P (D, r), W (r, D), (pre, D, post)) on the middle axis of y viewed as (pre, D, post)
    (None: none), the scalar s (None: 1). Forward keeps y and E = T - s u, u = (I + P W) y (no u);
    backward works in E's buffer in place: G_z = -2 g s sigma'(y) (I + W^T P^T) E.

    Against sigma, ``low_rank_update`` and ``scaled_squared_distance`` in turn, on MERA's tiles of
    fc6 at 2,000x (3.2M values): a fit step in 426-470 ms against 498-600 ms, and the fit's peak
    about 50 MB lower (u and the parts' fresh gradient buffers are never made)."""
    return _SigmaMixDistance.apply(z, target, sigma, *(mix if mix is not None else (None, None, None)), scale)


class _SigmaMixDistance(torch.autograd.Function):
    """See :func:`sigma_mix_distance`. Its backward overwrites what it saved: one backward only."""

    @staticmethod
    def forward(ctx, z, target, sigma, p, w, dims, scale):
        y = z if sigma is None else _FIT_SIGMA.get(sigma, _SIGMA[sigma])(z)
        error = torch.empty_like(y, memory_format=torch.contiguous_format)  # a tile of the target is strided
        if scale is None:
            torch.sub(target, y, out=error)
        else:
            torch.addcmul(target, y, scale, value=-1, out=error)
        coeff = None
        if p is not None:
            coeff = torch.bmm(w.expand(dims[0], -1, -1), y.reshape(dims))  # C = W y, (pre, r, post)
            _add_low_rank(error.view(dims), -p if scale is None else -(p * scale), coeff, inplace=True)
        flat = error.reshape(-1)
        ctx.sigma, ctx.dims, ctx.spent = sigma, dims, False
        ctx.save_for_backward(y, error, p, w, coeff, scale)
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, grad):
        if ctx.spent:
            raise RuntimeError("sigma_mix_distance's graph was already differentiated once (its buffers are reused)")
        ctx.spent = True
        y, error, p, w, coeff, scale = ctx.saved_tensors
        factor = -2 * grad if scale is None else -2 * grad * scale  # G_u = factor * E
        grad_p = grad_w = grad_scale = None
        if scale is not None and ctx.needs_input_grad[6]:
            dot = torch.dot(y.reshape(-1), error.reshape(-1))  # <u, E> = <y, E> + <C, P^T E>
        if p is not None:
            view = error.view(ctx.dims)
            pre = ctx.dims[0]
            projected = torch.bmm(p.T.expand(pre, -1, -1), view)  # P^T E, (pre, r, post)
            if ctx.needs_input_grad[3]:
                grad_p = torch.bmm(view, coeff.transpose(1, 2)).sum(0) * factor
            if scale is not None and ctx.needs_input_grad[6]:
                dot = dot + (coeff * projected).sum()
            if ctx.needs_input_grad[4]:
                grad_w = torch.bmm(projected, y.reshape(ctx.dims).transpose(1, 2)).sum(0) * factor
            _add_low_rank(view, w.T, projected, inplace=True)  # E <- (I + W^T P^T) E
        if scale is not None and ctx.needs_input_grad[6]:
            grad_scale = (-2 * grad * dot).reshape(scale.shape)
        grad_z = None
        if ctx.needs_input_grad[0]:
            grad_z = error if ctx.sigma is None else _SIGMA_BACKWARD_INPLACE[ctx.sigma](error, y)
            grad_z.mul_(factor)
        return grad_z, None, None, grad_p, grad_w, None, grad_scale


def contraction(equation: str, *shapes: tuple[int, ...]):
    """An opt_einsum contraction whose path is found once per equation and shapes (under tracing,
    ``pairwise_einsum``: torch.compile and torch.export cannot trace opt_einsum's own loop).

    No intermediate may be larger than the result or the largest operand (``memory_limit``):
    a generator's peak memory is then set by the tensors it returns, not by the path.
    """
    if torch.compiler.is_compiling():
        return lambda *operands: pairwise_einsum(equation, operands)
    return _cached_contraction(equation, *shapes)


@functools.lru_cache(maxsize=512)
def _cached_contraction(equation: str, *shapes: tuple[int, ...]):
    inputs, output = equation.split("->")
    sizes = {index: dim for term, shape in zip(inputs.split(","), shapes) for index, dim in zip(term, shape)}
    limit = max(math.prod(sizes[index] for index in output), *(math.prod(shape) for shape in shapes))
    return opt_einsum.contract_expression(equation, *shapes, optimize="auto", memory_limit=limit)


def pairwise_einsum(equation: str, operands: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``equation`` as a chain of two-operand ``torch.einsum`` calls, in the order opt_einsum finds
    for the operands with every symbolic dimension (a traced batch) taken as 1: no path search on
    symbolic sizes, which would specialise them (torch.export, ONNX)."""
    shapes = [tuple(d if isinstance(d, int) else 1 for d in t.shape) for t in operands]
    _, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=path_search(len(shapes)))
    tensors = list(operands)
    for positions, _, step, *_ in info.contraction_list:
        picked = [tensors.pop(k) for k in sorted(positions, reverse=True)]
        tensors.append(torch.einsum(step, *picked))
    return tensors[0]


class Generator(nn.Module):
    """Base class: a tensor network that generates one weight tensor.

    Class rules (override where an arch differs): ``mix_rank`` of its disentanglers (0: none),
    ``linear_only`` (the activation is always ``none``), ``levels``, ``leg_counts``,
    ``default_leg_count``, ``make_spec`` and ``param_count``.
    """

    arch: ClassVar[str]
    mix_rank: ClassVar[int] = 0
    linear_only: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "arch" in cls.__dict__:
            register(cls)

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__()
        self.spec = spec

    @classmethod
    def levels(cls, n_legs: int) -> int:
        """How many bond dims a spec over ``n_legs`` legs has (one per tree level by default)."""
        return int(math.log2(n_legs))

    @classmethod
    def leg_counts(cls, rows: int, cols: int) -> list[int]:
        """The leg counts a (rows, cols) weight can be cut into: powers of two from 2 up to
        ``max_legs``; a weight with fewer than two prime factors in all (1x3) still gets 2 legs,
        some of dim 1, as ``default_leg_count`` gives it."""
        return [1 << e for e in range(1, max(1, int(math.log2(max_legs(rows, cols)))) + 1)]

    @classmethod
    def default_leg_count(cls, rows: int, cols: int) -> int:
        """About 2^3-sized legs: K = 2^round(log2(log2(N) / 3)), between 2 and ``max_legs``."""
        n = smooth_ceiling(rows) * smooth_ceiling(cols)
        k = 1 << max(1, round(math.log2(max(math.log2(n) / 3, 2))))
        return max(2, min(k, max_legs(rows, cols)))

    @classmethod
    def leg_factors(cls, rows: int, cols: int, n_legs: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(out_dims, in_dims) of a (rows, cols) weight cut into ``n_legs`` legs (``choose_leg_factors``)."""
        return choose_leg_factors(rows, cols, n_legs)

    @classmethod
    def make_spec(cls, shape: tuple[int, ...], bond_dims: tuple[int, ...], activation: str,
                  n_legs: int, mix_ranks: tuple[int, ...] | None = None) -> GeneratorSpec:
        """The spec for ``shape`` cut into ``n_legs`` legs (``leg_factors``), given bond dims
        (and, for archs with disentanglers, each one's rank; default: all at ``mix_rank``)."""
        rows, cols = shape[0], math.prod(shape[1:])
        out_dims, in_dims = cls.leg_factors(rows, cols, n_legs)
        return GeneratorSpec(cls.arch, tuple(shape), out_dims, in_dims, tuple(bond_dims),
                             activation="none" if cls.linear_only else activation, mix_rank=cls.mix_rank,
                             mix_ranks=None if mix_ranks is None else tuple(mix_ranks))

    @classmethod
    def placed(cls, spec: GeneratorSpec) -> GeneratorSpec:
        """``spec`` once its bonds and ranks are chosen, with the digits its legs carry placed for
        its forward (same leg dims, so the same tree and parameters); here as it is."""
        return spec

    @classmethod
    def disentangler_sides(cls, spec: GeneratorSpec) -> list[tuple[int, int]]:
        """The two legs (dims) each disentangler ``spec`` can have mixes, in ``mix_ranks`` order
        (none here)."""
        return []

    @classmethod
    def disentangler_dims(cls, spec: GeneratorSpec) -> list[int]:
        """The joint dim D of each disentangler, in ``mix_ranks`` order."""
        return [a * b for a, b in cls.disentangler_sides(spec)]

    @classmethod
    def disentangler_order(cls, spec: GeneratorSpec) -> list[int]:
        """Indices of ``disentangler_dims`` in the order a budget gives them parameters."""
        return list(range(len(cls.disentangler_dims(spec))))

    @classmethod
    def param_count(cls, spec: GeneratorSpec) -> int:
        """Stored values of the generator for ``spec`` (equals ``sum(p.numel())`` once built)."""
        raise NotImplementedError

    @classmethod
    def fit_target(cls, spec: GeneratorSpec, weight: torch.Tensor, *,
                   after_block: Callable[[torch.Tensor], None] | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``weight`` in the form this generator is fitted against, in ``dtype`` (float32, or
        bfloat16: read in float32 blocks, see ``target``): the leg tensor (``spec.leg_dims``,
        built in row blocks; ``after_block`` as in ``weight_to_legs``)."""
        return weight_to_legs(weight.detach(), spec.out_dims, spec.in_dims, dtype=dtype,
                              after_block=after_block)

    @classmethod
    def from_target(cls, spec: GeneratorSpec, target: torch.Tensor) -> Generator:
        """A generator initialised to fit ``target`` (a ``fit_target``): an SVD-based fit."""
        raise NotImplementedError

    @classmethod
    def from_weight(cls, spec: GeneratorSpec, weight: torch.Tensor) -> Generator:
        """A generator initialised to fit ``weight``: ``from_target`` of its ``fit_target``."""
        return cls.from_target(spec, cls.fit_target(spec, weight))

    def legs(self) -> torch.Tensor:
        """The generated tensor, shape ``spec.leg_dims``."""
        raise NotImplementedError

    def forward(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The generated weight, shape ``spec.shape``; written into ``out`` (a contiguous tensor of
        that shape) when given, which the tree generators do without allocating N values."""
        weight = legs_to_weight(self.legs(), self.spec.out_dims, self.spec.in_dims, self.spec.shape)
        return weight if out is None else out.copy_(weight)

    def row_blocks(self) -> Iterator[torch.Tensor]:
        """The weight in blocks of whole rows, in order, without autograd: for writing it out
        without holding it. A block may be a reused buffer, valid until the next-but-one block is
        asked for. By default one block, the whole weight."""
        yield self()

    # ------------------------------------------------------------------ inference without W

    #: whether ``linear`` computes x W^T without forming W (False: only ``blocked_linear``); an
    #: arch where it depends on the structure makes it a property (mera)
    has_factorized: bool = False

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T for x (..., in*kh*kw) without forming the weight W; autograd-correct.
        Only for archs with ``has_factorized``."""
        raise NotImplementedError(f"{type(self).__name__} has no factorized linear map")

    def linear_macs(self, batch: int) -> int:
        """Multiply-adds of ``linear`` on ``batch`` rows (not counting the cached operands)."""
        raise NotImplementedError(f"{type(self).__name__} has no factorized linear map")

    def linear_state_bytes(self) -> int:
        """Bytes of the operands ``linear`` caches (besides the cores); 0 without a factorized form."""
        return 0

    def generation_macs(self) -> int:
        """About the multiply-adds of generating the dense weight once (``forward``)."""
        return self.spec.dense_params * max(1, max(self.spec.bond_dims))

    def block_values(self) -> int:
        """Values of one block of ``matrix_blocks`` (two may be held at once)."""
        return self.spec.dense_params

    def matrix_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, block) over the (out, in*kh*kw) weight matrix, in order, without autograd:
        ``row_blocks`` as matrices (a block may be a reused buffer, valid until the next-but-one)."""
        start = 0
        for block in self.row_blocks():
            matrix = block.reshape(block.shape[0], -1)
            yield start, matrix
            start += matrix.shape[0]

    @torch.no_grad()
    def blocked_linear(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T for x (..., in*kh*kw) one block of W's rows at a time (``matrix_blocks``):
        one GEMM per block into its output columns, so W never exists whole. No autograd (the
        layers fall back to the dense weight when a gradient is wanted)."""
        rows, cols = self.spec.matrix_shape
        flat = x.reshape(-1, cols)
        out_t = flat.new_empty(rows, flat.shape[0])  # y^T: each block writes contiguous rows
        for start, block in self.matrix_blocks():
            torch.mm(block, flat.T, out=out_t[start:start + block.shape[0]])
        return out_t.T.reshape(*x.shape[:-1], rows)

    def unmixed(self) -> Generator:
        """The generator that makes the same weight while the disentanglers stay as they are, for a
        fit that keeps them (``fit(mix=False)``): this one (attn: its tree, while every
        disentangler is the identity; see ``ATTN.unmixed``)."""
        return self

    def cached(self, name: str, build: Callable[[], object]) -> object:
        """``build()``, kept while the cores are unchanged when no gradient wrt them is wanted.

        With grad enabled and a core requiring grad, always rebuilt (fine-tuning gets correct
        gradients). Otherwise cached, keyed on every parameter's ``data_ptr`` and ``_version``
        (an optimizer step or a ``copy_`` bumps the version; a new ``.data`` moves the pointer) and
        on the first one's dtype and device. Under tracing it builds every time, so an exported
        graph computes them from the cores. (The key is read on every forward: it walks the
        modules' own parameter dicts, not the de-duplicating ``parameters()``; with the shorter
        key, 18 us instead of 34 for VGG's fc6 at batch 1.)"""
        params = [p for module in self.modules() for p in module._parameters.values() if p is not None]
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return build()  # traced (torch.export, torch.compile, ONNX): the operands are part of the graph
        key = (params[0].dtype, params[0].device, *((p.data_ptr(), p._version) for p in params))
        entry = self.__dict__.get("_inference_cache")
        if entry is None or entry[0] != key:
            entry = (key, {})
            self.__dict__["_inference_cache"] = entry
        if name not in entry[1]:
            with torch.no_grad():
                entry[1][name] = build()
            trim_heap()  # the temporaries that made it (VGG-16 fc6, ttn at 2,000x: 12.0 MB held after, 3.7 with it)
        return entry[1][name]

    def squared_distance(self, target_legs: torch.Tensor, target_norm_sq: torch.Tensor) -> torch.Tensor:
        """||T - G||_F^2 for a target in leg form; subclasses may avoid materialising G."""
        return (self.legs() - target_legs).pow(2).sum()

    def accumulate_squared_distance(self, target_legs: torch.Tensor, target_norm_sq: torch.Tensor,
                                    scale: torch.Tensor) -> float:
        """``scale * squared_distance``, its gradient accumulated into the cores' ``.grad``; returns
        the value. Subclasses may do it in parts to bound the autograd graph."""
        loss = self.squared_distance(target_legs, target_norm_sq) * scale
        loss.backward()
        return float(loss.detach())
