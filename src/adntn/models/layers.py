"""Compressed layers inside a model: a generator stands in for a dense weight.

A :class:`GeneratedLinear` / :class:`GeneratedConv2d` holds a weight generator (a tensor network
``nn.Module`` with no inputs, see ``adntn.networks``) and the dense layer's bias; nothing dense is
stored. The forward follows the layer's ``schedule``:

- ``dense``: the weight is regenerated (``generator()``) and applied; gradients reach the cores.
- ``factorized``: x W^T from the generator's factors (``Generator.linear``), W never formed;
  autograd-correct. Only where the generator has one (``has_factorized``: not a mera whose
  state above the leaves is nearly the weight's size).
- ``blocked``: W generated one block of rows at a time, one GEMM per block
  (``Generator.blocked_linear``); without autograd only: with a gradient wanted (grad enabled and
  the input or a core requiring grad) it falls back to ``dense``.
- ``auto`` (default): per forward, from ``inference_cost`` for the batch at hand: factorized when
  it exists and needs fewer flops than dense, else blocked when no gradient is wanted, else dense.

A convolution is unfolded (``F.unfold``: (n, in*kh*kw, L)) and the same linear map applied to its
n*L columns, then reshaped to (n, out, H', W'). :func:`swap_in` puts such layers into a model by dotted module name and
:func:`dense_weights` turns a model holding them back into a plain state_dict.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from adntn.errors import AdntnError
from adntn.networks import Generator

SCHEDULES = ("auto", "factorized", "blocked", "dense")
FLOAT_BYTES = 4
AUTO_MEMO = 64  # batch sizes whose auto choice a layer remembers


def _core_bytes(generator: Generator) -> int:
    return sum(p.numel() * p.element_size() for p in generator.parameters())


def inference_cost(generator: Generator, batch: int) -> dict[str, dict[str, int] | None]:
    """Flops and bytes of one forward on ``batch`` rows (a convolution: n * H' * W') per schedule.

    Returns {"dense", "blocked", "factorized"} -> {"flops": ..., "bytes": ...} (2 flops per
    multiply-add), "factorized" None for an arch without one. flops: dense and blocked generate
    the weight (``generation_macs``) and multiply it; factorized is ``linear_macs`` (its operands
    are cached, see ``Generator.cached``). bytes: what the weight side holds during the forward:
    the cores plus the dense weight (dense), two row blocks (blocked), or the cached operands
    (factorized); activations not counted."""
    rows, cols = generator.spec.matrix_shape
    cores = _core_bytes(generator)
    dense_flops = 2 * (generator.generation_macs() + batch * rows * cols)
    cost: dict[str, dict[str, int] | None] = {
        "dense": {"flops": dense_flops, "bytes": cores + FLOAT_BYTES * generator.spec.dense_params},
        "blocked": {"flops": dense_flops,
                    "bytes": cores + 2 * FLOAT_BYTES * min(generator.block_values(), generator.spec.dense_params)},
        "factorized": None,
    }
    if generator.has_factorized:
        cost["factorized"] = {"flops": 2 * generator.linear_macs(batch),
                              "bytes": cores + generator.linear_state_bytes()}
    return cost


class GeneratedLayer(nn.Module):
    """Base of the generated layers: ``generator`` (weight of ``generator.spec.shape``) + ``bias``.

    The bias (shape (out,), or None) stays dense: it is a tiny fraction of the layer.
    """

    def __init__(self, generator: Generator, bias: torch.Tensor | None, schedule: str = "auto") -> None:
        super().__init__()
        self.generator = generator
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.schedule = schedule

    @property
    def schedule(self) -> str:
        """"auto" | "factorized" | "blocked" | "dense" (see the module docstring); settable."""
        return self._schedule

    @schedule.setter
    def schedule(self, value: str) -> None:
        if value not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, not {value!r}")
        if value == "factorized" and not self.generator.has_factorized:
            raise ValueError(f"a {self.generator.spec.arch} generator has no factorized form; "
                             "use 'blocked' or 'dense'")
        self._schedule = value

    def _wants_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def resolve_schedule(self, batch: int, x: torch.Tensor) -> str:
        """The schedule a forward on ``batch`` rows runs (``blocked`` with a gradient wanted: dense)."""
        grad = self._wants_grad(x)
        if self._schedule == "auto":
            if self._factorized_is_cheaper(batch):
                return "factorized"
            return "dense" if grad else "blocked"
        if self._schedule == "blocked" and grad:
            return "dense"
        return self._schedule

    def _factorized_is_cheaper(self, batch: int) -> bool:
        """Whether ``inference_cost`` has the factorized flops below the dense ones for ``batch``
        rows; remembered per batch size for this generator (the cost depends on its spec and
        structure only, not on the cores' values), up to ``AUTO_MEMO`` sizes."""
        memo = self.__dict__.get("_auto_memo")
        if memo is None or memo[0] is not self.generator:
            memo = (self.generator, {})
            self.__dict__["_auto_memo"] = memo
        choice = memo[1].get(batch)
        if choice is None:
            cost = inference_cost(self.generator, batch)
            choice = cost["factorized"] is not None and cost["factorized"]["flops"] < cost["dense"]["flops"]
            if len(memo[1]) < AUTO_MEMO:
                memo[1][batch] = choice
        return choice

    def _matmul(self, schedule: str, flat: torch.Tensor) -> torch.Tensor:
        """x W^T (no bias) for ``flat`` (M, in*kh*kw) by the factorized or the blocked schedule."""
        if schedule == "factorized":
            return self.generator.linear(flat)
        return self.generator.blocked_linear(flat)

    def inference_repr(self) -> str:
        """schedule, and what inference on one row (no gradient) runs: its schedule, the bytes it
        holds (``inference_cost``: cores + cached operands, or two row blocks) and its flops per
        sample against the dense layer's."""
        rows, cols = self.generator.spec.matrix_shape
        run = self._schedule
        if run == "auto":
            run = "factorized" if self._factorized_is_cheaper(1) else "blocked"
        cost = inference_cost(self.generator, 1)[run]
        return (f"schedule={self._schedule}, inference={run}, inference_bytes={cost['bytes']}, "
                f"{cost['flops']} flops/sample vs {2 * rows * cols} dense")

    @property
    def weight(self) -> torch.Tensor:
        """The generated dense weight (recomputed at each access; differentiable)."""
        return self.generator()


class GeneratedLinear(GeneratedLayer):
    """y = x W^T + b with W = generator(): x (..., in) -> y (..., out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        schedule = self.resolve_schedule(math.prod(x.shape[:-1]), x)
        if schedule == "dense":
            return F.linear(x, self.generator(), self.bias)
        flat = x.reshape(-1, x.shape[-1])
        y = self._matmul(schedule, flat).reshape(*x.shape[:-1], self.generator.spec.shape[0])
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        out_features, in_features = self.generator.spec.shape
        return (f"in_features={in_features}, out_features={out_features}, bias={self.bias is not None}, "
                f"{self.inference_repr()}")


class GeneratedConv2d(GeneratedLayer):
    """conv2d with W = generator() of shape (out, in, kh, kw): x (n, in, H, W) -> (n, out, H', W')."""

    def __init__(self, generator: Generator, bias: torch.Tensor | None,
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 schedule: str = "auto") -> None:
        super().__init__(generator, bias, schedule)
        self.stride = tuple(stride)
        self.padding = tuple(padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_channels, _, kh, kw = self.generator.spec.shape
        n, _, height, width = x.shape
        out_h = (height + 2 * self.padding[0] - kh) // self.stride[0] + 1
        out_w = (width + 2 * self.padding[1] - kw) // self.stride[1] + 1
        schedule = self.resolve_schedule(n * out_h * out_w, x)
        if schedule == "dense":
            return F.conv2d(x, self.generator(), self.bias, stride=self.stride, padding=self.padding)
        columns = F.unfold(x, (kh, kw), padding=self.padding, stride=self.stride)  # (n, in kh kw, L)
        flat = columns.transpose(1, 2).reshape(n * out_h * out_w, -1)
        y = self._matmul(schedule, flat)
        if self.bias is not None:
            y = y + self.bias
        return y.view(n, out_h * out_w, out_channels).transpose(1, 2).reshape(n, out_channels, out_h, out_w)

    def extra_repr(self) -> str:
        out_channels, in_channels, kh, kw = self.generator.spec.shape
        return (f"{in_channels}, {out_channels}, kernel_size=({kh}, {kw}), stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}, {self.inference_repr()}")


def generated_from(dense: nn.Module, generator: Generator) -> GeneratedLayer:
    """The generated counterpart of a dense ``nn.Linear`` / ``nn.Conv2d``, keeping its bias.

    Raises ``ValueError`` when the generator's shape differs from the dense weight's or the
    convolution has options a generated layer does not reproduce (dilation, groups, padding mode).
    """
    if tuple(generator.spec.shape) != tuple(dense.weight.shape):
        raise ValueError(f"generator shape {generator.spec.shape} != weight shape {tuple(dense.weight.shape)}")
    if isinstance(dense, nn.Linear):
        return GeneratedLinear(generator, dense.bias)
    if isinstance(dense, nn.Conv2d):
        if dense.dilation != (1, 1) or dense.groups != 1 or dense.padding_mode != "zeros" \
                or isinstance(dense.padding, str):
            raise ValueError("only plain convolutions (dilation 1, groups 1, numeric zero padding) are supported")
        return GeneratedConv2d(generator, dense.bias, dense.stride, dense.padding)
    raise ValueError(f"cannot generate the weight of a {type(dense).__name__}")


def swap_in(model: nn.Module, layers: dict[str, nn.Module]) -> nn.Module:
    """Replace the modules named in ``layers`` (dotted names, e.g. ``"classifier.3"``) in place.

    Returns ``model``. Raises :class:`AdntnError` for a name the model does not have.
    """
    for name, replacement in layers.items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise AdntnError(f"The model has no module named '{name}'.") from None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
    return model


@torch.no_grad()
def dense_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with every generated layer materialised under the dense keys.

    For a generated layer at ``name``, the ``name.generator.*`` entries are replaced by
    ``name.weight`` (the generated tensor) followed by ``name.bias`` when there is one, so the
    result loads into the original dense model with ``strict=True``.
    """
    generated = {f"{name}." if name else "": module for name, module in model.named_modules()
                 if isinstance(module, GeneratedLayer)}
    state = model.state_dict()
    dense: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = next((p for p in generated if key.startswith(p)), None)
        if prefix is None:
            dense[key] = value
        elif prefix + "weight" not in dense:
            dense[prefix + "weight"] = generated[prefix].generator().detach()
            if generated[prefix].bias is not None:
                dense[prefix + "bias"] = state[prefix + "bias"]
    return dense
