"""Expand a compressed directory back into an ordinary dense state_dict."""

from __future__ import annotations

from pathlib import Path

import torch

from .archive import layer_paths, materialize, read_dense, read_layer, read_report
from .checkpoint import save_state_dict
from .errors import AdntnError

SUFFIXES = (".pt", ".pth", ".safetensors")


def expanded_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The dense state_dict, keys in the original checkpoint's order.

    Untouched tensors come from ``dense.safetensors`` bit for bit; each compressed layer's weight
    is its generator's output cast to the original dtype, its bias is the stored one.
    """
    report = read_report(directory)
    state = read_dense(directory)
    for path in layer_paths(directory, report):
        layer = read_layer(path)
        state[layer.weight_key] = materialize(layer.generator, layer.dtype)
        if layer.bias is not None:
            state[layer.bias_key] = layer.bias
    missing = [key for key in report["keys"] if key not in state]
    if missing:
        raise AdntnError(f"{directory} is incomplete: {missing[0]} is in neither dense.safetensors nor a layer file.")
    return {key: state[key] for key in report["keys"]}


def expand(directory: Path, output: Path, *, force: bool = False) -> Path:
    """Write the dense state_dict of ``directory`` to ``output`` (.pt, .pth or .safetensors)."""
    output = Path(output)
    if output.suffix not in SUFFIXES:
        raise AdntnError(f"The output must end in {', '.join(SUFFIXES)}, not '{output.suffix or output.name}'.")
    if output.exists() and not force:
        raise AdntnError(f"{output} already exists; pass --force to replace it.")
    state = expanded_state_dict(directory)
    # a .safetensors output keeps the source's metadata (mean, std, ...) for `adntn eval`
    save_state_dict(state, output, metadata=read_report(directory)["source"].get("metadata") or None)
    return output
