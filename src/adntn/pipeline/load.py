"""Loading a compressed directory as a model: the generated layers hold their cores, every other
layer the stored tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from adntn.errors import AdntnError
from adntn.io.archive import DENSE_FILE, CompressedLayer, read_dense, read_layers, read_report
from adntn.io.safetensors import safetensors_layout
from adntn.models.architectures import ModelInfo, detect_model
from adntn.pipeline.assemble import assemble_model
from adntn.pipeline.options import resolve_device


def archive_model_info(directory: Path, layers: list[CompressedLayer]) -> ModelInfo | None:
    """The torchvision model of an archive, recognised from the shapes alone (no tensor read), or
    None when it is not one."""
    path = Path(directory) / DENSE_FILE
    try:
        with safe_open(str(path), framework="pt") as handle:
            layout = safetensors_layout(handle)
    except (OSError, SafetensorError) as error:
        raise AdntnError(f"{path} is missing or corrupt ({type(error).__name__}).") from None
    shapes = {key: torch.empty(shape, dtype=dtype, device="meta") for key, (dtype, shape) in layout.items()}
    for layer in layers:
        shapes[layer.weight_key] = torch.empty(layer.generator.spec.shape, device="meta")
        if layer.bias is not None:
            shapes[layer.bias_key] = layer.bias
    try:
        return detect_model(shapes)
    except AdntnError:
        return None


def load(directory: str | Path, *, model: nn.Module | None = None, device: str | None = None) -> nn.Module:
    """The compressed model of ``directory`` in eval mode: a torchvision AlexNet/VGG rebuilt from
    the archive, or, for a module that is not one, a copy of ``model`` (the module it was
    compressed from, or one of the same structure). Its generated layers hold the cores as
    parameters (it fine-tunes); it is moved to ``device`` when given."""
    directory = Path(directory)
    report = read_report(directory)
    layers = read_layers(directory, report)
    info = None if model is not None else archive_model_info(directory, layers)
    if model is None and info is None:
        raise AdntnError(f"{directory} holds no torchvision AlexNet or VGG; pass the module it was compressed "
                         "from as model=... to load it.")
    loaded = assemble_model(read_dense(directory), layers, info=info, template=model)
    return loaded.to(resolve_device(device)) if device is not None else loaded
