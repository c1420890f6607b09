"""What ``compress`` starts from: a checkpoint file or a module in memory, read once.

A :class:`Source` holds the tensors (mapped, for a file: see ``io.checkpoint.load_state_dict``),
the compressible layers and, when the tensors are a torchvision AlexNet/VGG, its
:class:`~adntn.models.architectures.ModelInfo` (layer aliases such as ``fc6``, and the model can be
rebuilt). A module that is no torchvision model still works: its ``nn.Linear`` and plain
``nn.Conv2d`` layers are named by module path (``"0"`` in an ``nn.Sequential``).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from adntn.errors import AdntnError
from adntn.io.checkpoint import check_dense_tensors, file_sha256, load_state_dict
from adntn.models.architectures import LayerInfo, ModelInfo, build_model, detect_model


@dataclass(frozen=True)
class Source:
    """The tensors and layers that ``compress`` reads (never writes).

    Attributes:
        state: tensor name -> tensor, in the checkpoint's order.
        metadata: the safetensors ``__metadata__`` (``{}`` for other sources).
        layers: every compressible layer, in forward order.
        info: the recognised torchvision model, or None.
        module: the module given in memory, or None for a file.
        name: the file's name, or the module's class name.
        sha256: of the file's bytes, or of the module's tensors (names, dtypes, shapes, bytes).
        bytes: the file's size, or the tensors' bytes.
    """

    state: Mapping[str, torch.Tensor] = field(repr=False)
    metadata: dict[str, str]
    layers: tuple[LayerInfo, ...]
    info: ModelInfo | None
    module: nn.Module | None = field(repr=False)
    name: str
    sha256: str
    bytes: int

    def layer(self, name: str) -> LayerInfo:
        """The layer called ``name``: an alias (``fc7``), module path (``classifier.3``) or weight key."""
        if self.info is not None:
            return self.info.layer(name)
        for layer in self.layers:
            if name in (layer.module, layer.weight_key):
                return layer
        examples = ", ".join(layer.module for layer in self.layers[:4]) or "none"
        raise AdntnError(f"Unknown layer '{name}'; the module's Linear and Conv2d layers are named by module "
                         f"path ({examples}{', ...' if len(self.layers) > 4 else ''}).")

    def group(self, name: str) -> tuple[LayerInfo, ...] | None:
        """The layers a group name stands for (``all``: every conv and linear layer but the
        output layer; ``conv``: every conv; ``fc``: every linear layer but the output layer), or
        None for any other name. The output layer (fc8) is compressed only when named."""
        hidden = self.layers[:-1] if self.layers and self.layers[-1].kind == "linear" else self.layers
        groups = {"all": hidden, "conv": tuple(layer for layer in self.layers if layer.kind == "conv"),
                  "fc": tuple(layer for layer in hidden if layer.kind == "linear")}
        return groups.get(name)

    def select(self, names: list[str]) -> tuple[LayerInfo, ...]:
        """The layers called ``names`` (or by the group names of :meth:`group`), in the given
        order (none missing, none twice)."""
        if not names:
            raise AdntnError("No layers were named; name at least one, e.g. fc6.")
        named = [layer for name in names
                 for layer in (self.group(name.strip()) or (self.layer(name.strip()),))]
        chosen: list[LayerInfo] = []
        for layer in named:
            if not layer.module:
                raise AdntnError("The module given is itself the layer; compress a module that holds it, "
                                 "e.g. nn.Sequential(layer), and name it '0'.")
            if layer in chosen:
                raise AdntnError(f"Layer {layer.label} ({layer.module}) is named more than once.")
            chosen.append(layer)
        return tuple(chosen)

    def dense_model(self) -> nn.Module:
        """The dense model in eval mode: the torchvision model rebuilt from the tensors, or a copy of
        the module given (so moving or training it never touches the caller's)."""
        if self.info is not None:
            model = build_model(self.info)
            model.load_state_dict(dict(self.state), strict=True)
            return model.eval()
        if self.module is None:
            raise AdntnError("The checkpoint is no torchvision AlexNet or VGG, so no model can be run on data.")
        return copy.deepcopy(self.module).eval()

    def describe(self) -> dict:
        """The report's ``source`` entry."""
        return {"path": self.name, "sha256": self.sha256, "bytes": self.bytes,
                "model": self.info.name if self.info is not None else self.name,
                "num_classes": self.info.num_classes if self.info is not None else None,
                "metadata": self.metadata}


def read_source(model_or_path: nn.Module | str | Path, *, model: str | None = None,
                allow_pickle: bool = False, mmap: bool = True) -> Source:
    """A :class:`Source` from a checkpoint path (mapped unless ``mmap=False``) or an ``nn.Module``.

    ``model`` forces the torchvision architecture (``--model``); for a path that is not one, the
    error says so. A module that is not recognised is used by module paths.
    """
    if isinstance(model_or_path, nn.Module):
        return _module_source(model_or_path, model)
    if not isinstance(model_or_path, (str, Path)):
        raise AdntnError(f"compress takes an nn.Module or a checkpoint path, not a {type(model_or_path).__name__}.")
    path = Path(model_or_path)
    state, metadata = load_state_dict(path, allow_pickle=allow_pickle, mmap=mmap)
    info = detect_model(state, override=model)
    return Source(state, metadata, info.layers, info, None, path.name, file_sha256(path), path.stat().st_size)


def _module_source(module: nn.Module, override: str | None) -> Source:
    state = {key: value.detach() for key, value in module.state_dict().items()}
    if not state:
        raise AdntnError(f"The {type(module).__name__} has no parameters or buffers to compress.")
    check_dense_tensors(state, f"The {type(module).__name__}")
    try:
        info: ModelInfo | None = detect_model(state, override=override)
    except AdntnError:
        if override is not None:
            raise
        info = None
    layers = info.layers if info is not None else module_layers(module)
    digest = hashlib.sha256()
    for key, value in state.items():
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    size = sum(value.numel() * value.element_size() for value in state.values())
    return Source(state, {}, layers, info, module, type(module).__name__, digest.hexdigest(), size)


def module_layers(module: nn.Module) -> tuple[LayerInfo, ...]:
    """The ``nn.Linear`` and plain ``nn.Conv2d`` layers of any module (dilation 1, one group,
    numeric zero padding), by module path, in registration order."""
    layers = []
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            layers.append(LayerInfo(name, None, "linear", tuple(child.weight.shape), child.bias is not None))
        elif isinstance(child, nn.Conv2d) and child.dilation == (1, 1) and child.groups == 1 \
                and child.padding_mode == "zeros" and not isinstance(child.padding, str):
            layers.append(LayerInfo(name, None, "conv", tuple(child.weight.shape), child.bias is not None,
                                    stride=tuple(child.stride), padding=tuple(child.padding)))
    return tuple(layers)
