"""Expand a compressed directory back into an ordinary dense state_dict.

Both outputs are streamed: a ``.safetensors`` header, or ``torch.save``'s pickle and zip records
(:mod:`adntn.torchsave`), is written from the shapes alone, then each tensor is read or generated,
written and dropped; a compressed layer's weight is generated in blocks of rows
(``Generator.row_blocks``), so the peak holds one block, or one uncompressed tensor.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from adntn.io.archive import DENSE_FILE, dense_path, finite_dense, materialize, materialize_rows, read_dense
from adntn.io.files import atomic_write
from adntn.io.safetensors import SAFETENSORS_SUFFIX, stream_safetensors
from adntn.errors import AdntnError
from adntn.io.torchsave import stream_torch_save
from adntn.pipeline.load import read_archive

SUFFIXES = (".pt", ".pth", SAFETENSORS_SUFFIX)


def expanded_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The dense state_dict, keys in the original checkpoint's order.

    Untouched tensors come from ``dense.safetensors`` bit for bit; each compressed layer's weight
    is its generator's output cast to the original dtype, its bias is the stored one.
    """
    report, layers, layout, _ = read_archive(directory)
    state = read_dense(directory)
    for layer in layers:
        state[layer.weight_key] = materialize(layer.generator, layer.dtype)
        if layer.bias is not None:
            state[layer.bias_key] = layer.bias
    return {key: state[key] for key in layout}


def _stream(directory: Path, output: Path) -> None:
    """Write the expanded state_dict to ``output`` (.safetensors, .pt or .pth) one tensor at a time."""
    report, read, layout, _ = read_archive(directory)  # in the original checkpoint's order
    layers = {layer.weight_key: layer for layer in read}
    biases = {layer.bias_key: layer.bias for layer in read if layer.bias is not None}
    path = Path(directory) / DENSE_FILE
    try:
        with safe_open(str(dense_path(directory)), framework="pt") as dense:

            def produce(key: str) -> torch.Tensor | Iterable[torch.Tensor]:
                if key in layers:
                    return materialize_rows(layers[key].generator, layers[key].dtype)
                return biases[key] if key in biases else finite_dense(dense.get_tensor(key), key, path)

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
    output, directory = Path(out), Path(directory)
    if output.suffix not in SUFFIXES:
        raise AdntnError(f"The output must end in {', '.join(SUFFIXES)}, not '{output.suffix or output.name}'.")
    root, target = directory.resolve(), output.absolute().parent.resolve() / output.name
    if target == root or root in target.parents:
        raise AdntnError(f"{output} is inside the archive {directory} being expanded; write it elsewhere.")
    if os.path.lexists(output) and not force:
        raise AdntnError(f"{output} already exists; pass --force to replace it.")
    _stream(directory, output)
    return output
