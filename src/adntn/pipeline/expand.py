"""Expand a compressed directory back into an ordinary dense state_dict.

Both outputs are streamed: a ``.safetensors`` header, or ``torch.save``'s pickle and zip records
(:mod:`adntn.torchsave`), is written from the shapes alone, then each tensor is read or generated,
written and dropped; a compressed layer's weight is generated in blocks of rows
(``Generator.row_blocks``), so the peak holds one block, or one uncompressed tensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from adntn.io.archive import DENSE_FILE, materialize, materialize_rows, read_dense, read_layers, read_report
from adntn.io.files import atomic_write
from adntn.io.safetensors import SAFETENSORS_SUFFIX, safetensors_layout, stream_safetensors
from adntn.errors import AdntnError
from adntn.io.torchsave import stream_torch_save

SUFFIXES = (".pt", ".pth", SAFETENSORS_SUFFIX)


def _check_complete(directory: Path, report: dict, keys) -> None:
    missing = [key for key in report["keys"] if key not in keys]
    if missing:
        raise AdntnError(f"{directory} is incomplete: {missing[0]} is in neither dense.safetensors nor a layer file.")


def expanded_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The dense state_dict, keys in the original checkpoint's order.

    Untouched tensors come from ``dense.safetensors`` bit for bit; each compressed layer's weight
    is its generator's output cast to the original dtype, its bias is the stored one.
    """
    report = read_report(directory)
    state = read_dense(directory)
    for layer in read_layers(directory, report):
        state[layer.weight_key] = materialize(layer.generator, layer.dtype)
        if layer.bias is not None:
            state[layer.bias_key] = layer.bias
    _check_complete(directory, report, state)
    return {key: state[key] for key in report["keys"]}


def _stream(directory: Path, report: dict, output: Path) -> None:
    """Write the expanded state_dict to ``output`` (.safetensors, .pt or .pth) one tensor at a time."""
    layers = {layer.weight_key: layer for layer in read_layers(directory, report)}
    biases = {layer.bias_key: layer.bias for layer in layers.values() if layer.bias is not None}
    path = Path(directory) / DENSE_FILE
    try:
        with safe_open(str(path), framework="pt") as dense:
            layout = safetensors_layout(dense)
            layout.update({key: (layer.dtype, layer.generator.spec.shape) for key, layer in layers.items()})
            layout.update({key: (bias.dtype, tuple(bias.shape)) for key, bias in biases.items()})
            _check_complete(directory, report, layout)
            layout = {key: layout[key] for key in report["keys"]}  # the original checkpoint's order

            def produce(key: str) -> torch.Tensor | Iterable[torch.Tensor]:
                if key in layers:
                    return materialize_rows(layers[key].generator, layers[key].dtype)
                return biases[key] if key in biases else dense.get_tensor(key)

            if output.suffix == SAFETENSORS_SUFFIX:
                metadata = report["source"].get("metadata") or None  # mean, std, ... for `adntn eval`
                atomic_write(output, lambda temporary: stream_safetensors(layout, produce, temporary, metadata))
            else:
                atomic_write(output, lambda temporary: stream_torch_save(layout, produce, temporary))
    except (OSError, SafetensorError) as error:
        raise AdntnError(f"{path} is missing or corrupt ({type(error).__name__}).") from None


def expand(directory: str | Path, out: str | Path | None = None, *,
           force: bool = False) -> Path | dict[str, torch.Tensor]:
    """Write the dense state_dict of ``directory`` to ``out`` (.pt, .pth or .safetensors) and
    return its path, streamed (see the module docstring); or, without ``out``, return the
    state_dict (``expanded_state_dict``: the whole dense weights in memory)."""
    if out is None:
        return expanded_state_dict(Path(directory))
    output = Path(out)
    if output.suffix not in SUFFIXES:
        raise AdntnError(f"The output must end in {', '.join(SUFFIXES)}, not '{output.suffix or output.name}'.")
    if output.exists() and not force:
        raise AdntnError(f"{output} already exists; pass --force to replace it.")
    _stream(Path(directory), read_report(directory), output)
    return output
