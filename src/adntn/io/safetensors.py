"""The safetensors format, written deterministically and streamed (one tensor, or row block, at a time).

Layout: u64 little-endian header size, a JSON header with sorted keys padded to 8 bytes, then
each tensor's little-endian bytes in key order.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from adntn.errors import AdntnError
from adntn.io.files import write_blocks

SAFETENSORS_SUFFIX = ".safetensors"

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_layout(handle) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of an open ``safe_open`` handle, read from the header alone."""
    dtypes = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}
    layout = {}
    for name in handle.keys():
        view = handle.get_slice(name)
        if view.get_dtype() not in dtypes:
            raise AdntnError(f"Cannot read {name}: safetensors dtype {view.get_dtype()} is not supported.")
        layout[name] = (dtypes[view.get_dtype()], tuple(view.get_shape()))
    return layout


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write the safetensors format deterministically: same tensors and metadata, same bytes.

    (The reference writer emits ``__metadata__`` in hash order, which differs between runs.)
    """
    layout = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()}
    stream_safetensors(layout, tensors.__getitem__, path, metadata)


def stream_safetensors(layout: Mapping[str, tuple[torch.dtype, Sequence[int]]],
                       produce: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
                       path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors are made one at a time: ``produce(name)`` is called
    once per name of ``layout`` (name -> (dtype, shape)), in sorted order, and its result (one
    tensor, or row blocks: see :func:`write_blocks`) is written and dropped before the next, so at
    most one of them is alive here.

    Layout: u64 little-endian header size, a JSON header with sorted keys padded to 8 bytes,
    then each tensor's little-endian bytes in key order.

    Raises:
        AdntnError: a dtype has no safetensors equivalent, or a produced tensor does not match.
    """
    header: dict[str, object] = {}
    offset = 0
    for name in sorted(layout):
        dtype, shape = layout[name]
        if dtype not in _SAFETENSORS_DTYPES:
            raise AdntnError(f"Cannot store {name}: dtype {dtype} has no safetensors equivalent.")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    encoded = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name in sorted(layout):
            write_blocks(name, produce(name), *layout[name], handle.write)
