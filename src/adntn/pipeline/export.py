"""``adntn export``: a compressed model as an ONNX graph whose compressed layers stay compressed.

The graph is traced from ``adntn.load``'s model with each generated layer in a fixed schedule:
``factorized`` where the arch has one (ttn, tt, svd, attn: the file holds the cores, or the root
messages they fold into, and x W^T runs from them), ``dense`` otherwise (mera: the weight is
generated from the cores at run time). So the file is about the size of the directory, never the
dense size. The batch dimension stays dynamic. Needs the ``onnx`` and ``onnxscript`` packages
(``pip install 'adntn[export]'``); ``onnxruntime`` runs the result.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch import nn

from adntn.errors import AdntnError
from adntn.io.archive import read_report
from adntn.io.files import atomic_write
from adntn.models.layers import GeneratedLayer
from adntn.pipeline.load import load

DEFAULT_INPUT_SIZE = 224  # torchvision's AlexNet and VGG on ImageNet
# The smallest image side the features take (VGG: five 2x2 poolings; AlexNet: its stride-4 conv and
# three 3x3 stride-2 poolings), and the largest side exported (the trace's activations grow with s^2).
MIN_INPUT_SIZE = {"alexnet": 63}
MIN_VGG_INPUT_SIZE = 32
MAX_INPUT_SIZE = 2048


def export_schedule(module: GeneratedLayer) -> str:
    return "factorized" if module.generator.has_factorized else "dense"


def input_size_of(report: dict) -> int:
    """The image side the model takes: the checkpoint's ``input_size`` metadata, else 224."""
    metadata = report["source"].get("metadata") or {}
    try:
        value = json.loads(metadata["input_size"]) if "input_size" in metadata else DEFAULT_INPUT_SIZE
        side = int(value[-1] if isinstance(value, list) else value)
    except (ValueError, TypeError, IndexError):
        raise AdntnError(f"The checkpoint's input_size metadata ({metadata['input_size']!r}) is not a size; "
                         "pass --input-size.") from None
    return side


def check_input_size(side: int, model: str, origin: str) -> int:
    """``side`` (from ``origin``: --input-size, or the metadata), refused unless torchvision's
    ``model`` takes images of that side and it is at most :data:`MAX_INPUT_SIZE`."""
    smallest = MIN_INPUT_SIZE.get(model, MIN_VGG_INPUT_SIZE)
    if not smallest <= side <= MAX_INPUT_SIZE:
        raise AdntnError(f"{origin} is {side}, but {model} takes images of side {smallest} to {MAX_INPUT_SIZE} "
                         "here; pass --input-size in that range.")
    return side


def export_onnx(directory: str | Path, out: str | Path, *, input_size: int | None = None,
                model: nn.Module | None = None, input_shape: tuple[int, ...] | None = None,
                force: bool = False) -> Path:
    """Write the ONNX graph of ``directory``'s model to ``out``; returns its path.

    A torchvision model takes images (batch, 3, s, s), s = ``input_size`` (default: from the
    checkpoint's metadata, else 224); another module (``model=``, as for ``adntn.load``) takes
    ``input_shape`` (its first dimension is the dynamic batch)."""
    for package in ("onnx", "onnxscript"):
        if importlib.util.find_spec(package) is None:
            raise AdntnError(f"ONNX export needs the {package} package; install it with pip install 'adntn[export]'.")
    out = Path(out)
    if out.suffix != ".onnx":
        raise AdntnError(f"The output must end in .onnx, not '{out.suffix or out.name}'.")
    if out.exists() and not force:
        raise AdntnError(f"{out} already exists; pass --force to replace it.")
    report = read_report(directory)
    if input_shape is None:
        if model is not None:
            raise AdntnError("Exporting a module that is no torchvision model needs its input_shape.")
        model_name = report["source"]["model"]
        if input_size is not None:
            side = check_input_size(input_size, model_name, "--input-size")
        else:
            side = check_input_size(input_size_of(report), model_name, "The checkpoint's input_size metadata")
        input_shape = (2, 3, side, side)
    network = load(directory, model=model)
    for module in network.modules():
        if isinstance(module, GeneratedLayer):
            module.schedule = export_schedule(module)
    example = torch.zeros(input_shape)
    batch = torch.export.Dim("batch")

    def write(temporary: Path) -> None:
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):  # torch.onnx talks on stdout
            torch.onnx.export(network, (example,), str(temporary), dynamo=True, external_data=False,
                              input_names=["input"], output_names=["logits"], dynamic_shapes=({0: batch},),
                              verbose=False)

    atomic_write(out, write)
    return out
