"""Compressed layers inside a model: a generator stands in for a dense weight.

A :class:`GeneratedLinear` / :class:`GeneratedConv2d` holds a weight generator (a tensor network
``nn.Module`` with no inputs, see ``adntn.networks``) and the dense layer's bias. The weight is
regenerated on every forward, so gradients of any loss on the model's output reach the cores;
nothing dense is stored. :func:`swap_in` puts such layers into a model by dotted module name and
:func:`dense_weights` turns a model holding them back into a plain state_dict.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from adntn.errors import AdntnError
from adntn.networks import Generator


class GeneratedLayer(nn.Module):
    """Base of the generated layers: ``generator`` (weight of ``generator.spec.shape``) + ``bias``.

    The bias (shape (out,), or None) stays dense: it is a tiny fraction of the layer.
    """

    def __init__(self, generator: Generator, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.generator = generator
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The generated dense weight (recomputed at each access; differentiable)."""
        return self.generator()


class GeneratedLinear(GeneratedLayer):
    """y = x W^T + b with W = generator(): x (..., in) -> y (..., out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.generator(), self.bias)

    def extra_repr(self) -> str:
        out_features, in_features = self.generator.spec.shape
        return f"in_features={in_features}, out_features={out_features}, bias={self.bias is not None}"


class GeneratedConv2d(GeneratedLayer):
    """conv2d with W = generator() of shape (out, in, kh, kw): x (n, in, H, W) -> (n, out, H', W')."""

    def __init__(self, generator: Generator, bias: torch.Tensor | None,
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0)) -> None:
        super().__init__(generator, bias)
        self.stride = tuple(stride)
        self.padding = tuple(padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.generator(), self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        out_channels, in_channels, kh, kw = self.generator.spec.shape
        return (f"{in_channels}, {out_channels}, kernel_size=({kh}, {kw}), stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}")


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
