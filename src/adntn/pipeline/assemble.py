"""A model with generated layers in place, from dense tensors and compressed layers.

Used by ``Compressed.model`` and ``adntn.load``. A torchvision model is rebuilt on the meta
device and given the stored tensors (``assign``), so the dense weight of a compressed layer is
never allocated; a template module is copied with the compressed layers swapped out before the
copy, so their dense weights are never copied either.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from adntn.errors import AdntnError
from adntn.io.archive import CompressedLayer
from adntn.models.architectures import ModelInfo, build_model
from adntn.models.layers import GeneratedConv2d, GeneratedLayer, GeneratedLinear, swap_in


def generated_module(layer: CompressedLayer, dense: nn.Module | None = None, *,
                     stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0)) -> GeneratedLayer:
    """The generated counterpart of one compressed layer; a conv's stride and padding come from
    ``dense`` (the layer it replaces) when given."""
    if len(layer.generator.spec.shape) == 2:
        return GeneratedLinear(layer.generator, layer.bias)
    if isinstance(dense, nn.Conv2d):
        stride, padding = tuple(dense.stride), tuple(dense.padding)
    return GeneratedConv2d(layer.generator, layer.bias, stride, padding)


def swapped_copy(model: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """A deep copy of ``model`` with the modules named in ``replacements`` (dotted paths) replaced:
    the originals are never copied (their dense weights may be large)."""
    memo = {}
    for name, replacement in replacements.items():
        try:
            memo[id(model.get_submodule(name))] = replacement
        except AttributeError:
            raise AdntnError(f"The model has no module named '{name}'.") from None
    return copy.deepcopy(model, memo)


def assemble_model(dense: Mapping[str, torch.Tensor], layers: Sequence[CompressedLayer], *,
                   info: ModelInfo | None = None, template: nn.Module | None = None) -> nn.Module:
    """The model (eval mode) whose compressed layers are ``layers`` and whose other tensors are
    ``dense``: torchvision's ``info`` rebuilt, else a copy of ``template``.

    Raises:
        AdntnError: neither is given, or the tensors do not fit the model.
    """
    if template is not None:
        modules = dict(template.named_modules())
        model = swapped_copy(template, {layer.module: generated_module(layer, modules.get(layer.module))
                                        for layer in layers})
        model.load_state_dict(dict(dense), strict=False)
        _check_complete(model, dense, layers)
        return model.eval()
    if info is None:
        raise AdntnError("The model is no torchvision AlexNet or VGG; pass the module it was compressed "
                         "from (model=...) to rebuild it.")
    model = build_model(info, materialize=False)
    convs = {layer.module: layer for layer in info.layers}
    swap_in(model, {layer.module: generated_module(layer, stride=convs[layer.module].stride,
                                                   padding=convs[layer.module].padding) for layer in layers})
    model.load_state_dict(dict(dense), strict=False, assign=True)
    _check_complete(model, dense, layers)
    return model.eval()


def _check_complete(model: nn.Module, dense: Mapping[str, torch.Tensor], layers: Sequence[CompressedLayer]) -> None:
    """Every tensor of the model came from ``dense`` or a compressed layer, and nothing is left over."""
    generated = tuple(f"{layer.module}." for layer in layers)
    expected = {key for key in model.state_dict() if not key.startswith(generated)}
    missing = sorted(expected - set(dense))
    unexpected = sorted(set(dense) - expected)
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has an unexpected {unexpected[0]}"
        raise AdntnError(f"The stored tensors do not fit the model: it {what}.")
    meta = next((key for key, value in model.state_dict().items() if value.is_meta), None)
    if meta is not None:
        raise AdntnError(f"The stored tensors do not fit the model: {meta} was never given.")

