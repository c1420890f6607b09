"""Checkpoint I/O: read and write state_dicts as ``.safetensors`` or PyTorch pickles.

Every failure a user can cause (missing, unreadable, corrupt or unsafe file, unwritable target,
non-finite weights) is raised as an :class:`~adntn.errors.AdntnError` with a one-sentence
message; no other exception escapes for bad input.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import math
import os
import pickle
import re
import secrets
import struct
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import AdntnError

SAFETENSORS_SUFFIX = ".safetensors"
WRAPPER_KEYS = ("state_dict", "model")  # checkpoint dicts that wrap a state_dict under these keys
DATA_PARALLEL_PREFIX = "module."
_SHA256_CHUNK = 1 << 20
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_state_dict(
    path: Path, *, allow_pickle: bool = False, mmap: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read the tensors of a checkpoint file.

    Args:
        path: a ``.safetensors`` file, or any file written by ``torch.save`` (``.pt``, ``.pth``,
            ``.bin``, ...): a plain state_dict, a dict wrapping one under ``state_dict`` or
            ``model``, or (only with ``allow_pickle``) a pickled ``nn.Module``.
        allow_pickle: unpickle arbitrary Python objects (``torch.load(weights_only=False)``).
            Only for trusted files: unpickling can execute code.
        mmap: map the file instead of reading it: the tensors are copy-on-write views of its
            pages, read from disk when first used (and droppable again, see
            :func:`release_pages`). Must not be written to. A legacy (non-zip) ``torch.save``
            file, or a safetensors file whose offsets do not suit a view, is read as usual.

    Returns:
        ``(tensors, metadata)``: tensor name -> tensor (dtype and shape as stored; a leading
        ``module.`` shared by all names is stripped; non-tensor entries are dropped), and the
        safetensors ``__metadata__`` (``{}`` for PyTorch files).

    Raises:
        AdntnError: the file is missing, a directory, unreadable, corrupt, holds pickled objects
            that safe loading refuses, or holds no tensors.
    """
    path = Path(path)
    if not path.exists():
        raise AdntnError(f"Checkpoint {path} does not exist.")
    if path.is_dir():
        raise AdntnError(f"{path} is a directory, not a checkpoint file.")
    if path.suffix == SAFETENSORS_SUFFIX:
        tensors, metadata = _read_safetensors(path, mmap)
    else:
        tensors, metadata = _extract_tensors(_torch_load(path, allow_pickle, mmap), path), {}
    if not tensors:
        raise AdntnError(f"{path} is not a checkpoint: it holds no tensors.")
    return _strip_data_parallel_prefix(tensors), metadata


def _read_safetensors(path: Path, mmap: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:  # validates the header
            metadata = dict(handle.metadata() or {})
            mapped = _map_safetensors(path, safetensors_layout(handle)) if mmap else None
            tensors = mapped if mapped is not None else {name: handle.get_tensor(name) for name in handle.keys()}
    except OSError as error:
        raise AdntnError(f"Cannot read {path}: {error.strerror or error}.") from None
    except (SafetensorError, ValueError, RuntimeError):
        raise AdntnError(
            f"Cannot read {path}: the file is empty, truncated or not a safetensors file."
        ) from None
    return tensors, metadata


def _map_safetensors(path: Path, layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]
                     ) -> dict[str, torch.Tensor] | None:
    """Views of a (validated) safetensors file's tensors over one private mapping of the file, or
    None when a tensor's offset is not a multiple of its item size (a view cannot start there)."""
    with open(path, "rb") as stream:
        (header_size,) = struct.unpack("<Q", stream.read(8))
        header = json.loads(stream.read(header_size))
    start = 8 + header_size
    size = path.stat().st_size
    if any((start + header[name]["data_offsets"][0]) % dtype.itemsize for name, (dtype, _) in layout.items()):
        return None
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    tensors = {}
    for name, (dtype, shape) in layout.items():
        offset = (start + header[name]["data_offsets"][0]) // dtype.itemsize
        tensors[name] = torch.empty(0, dtype=dtype).set_(storage, offset, shape)
    return tensors


def _torch_load(path: Path, allow_pickle: bool, mmap: bool = False) -> object:
    """``torch.load`` on CPU, translating every failure into an :class:`AdntnError`."""
    try:
        if mmap and zipfile.is_zipfile(path):  # torch.load maps only the zip format
            return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except OSError as error:
        raise AdntnError(f"Cannot read {path}: {error.strerror or error}.") from None
    except pickle.UnpicklingError as error:
        refused = _UNSUPPORTED_GLOBAL.search(str(error))
        if refused is None:
            raise _corrupt(path) from None
        name = refused.group(1)
        if _is_module_class(name):
            raise AdntnError(
                f"{path} holds a pickled model object ({name}), not a state_dict; save it with "
                f"torch.save(model.state_dict(), PATH) "
                f"or pass --allow-pickle if you trust the file."
            ) from None
        raise AdntnError(
            f"{path} holds pickled Python objects ({name}) that safe loading refuses; "
            f"pass --allow-pickle if you trust the file."
        ) from None
    except (ImportError, AttributeError) as error:
        if allow_pickle:  # the pickle names a class this environment cannot provide
            raise AdntnError(f"Cannot unpickle {path}: {error}.") from None
        raise _corrupt(path) from None
    except Exception:  # torch.load raises RuntimeError, EOFError, KeyError, ... on corrupt data
        raise _corrupt(path) from None


def _corrupt(path: Path) -> AdntnError:
    return AdntnError(
        f"Cannot read {path}: the file is empty, truncated or not a PyTorch checkpoint."
    )


def _is_module_class(qualified_name: str) -> bool:
    """Whether ``qualified_name`` (``pkg.mod.Class``) is an ``nn.Module`` subclass.

    Only modules that are already imported are consulted: a name from an untrusted file never
    triggers an import.
    """
    module_name, _, class_name = qualified_name.rpartition(".")
    candidate = getattr(sys.modules.get(module_name), class_name, None)
    return isinstance(candidate, type) and issubclass(candidate, torch.nn.Module)


def _extract_tensors(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """The name -> tensor mapping inside what ``torch.load`` returned."""
    if isinstance(loaded, torch.nn.Module):
        return loaded.state_dict()
    if not isinstance(loaded, Mapping):
        raise AdntnError(
            f"{path} is not a checkpoint: it holds a {type(loaded).__name__}, "
            f"not a mapping of tensor names to tensors."
        )
    for key in WRAPPER_KEYS:
        inner = loaded.get(key)
        if isinstance(inner, torch.nn.Module):
            return inner.state_dict()
        if isinstance(inner, Mapping):
            loaded = inner
            break
    return {
        name: value
        for name, value in loaded.items()
        if isinstance(name, str) and isinstance(value, torch.Tensor)
    }


def _strip_data_parallel_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if all(name.startswith(DATA_PARALLEL_PREFIX) for name in tensors):
        return {name[len(DATA_PARALLEL_PREFIX):]: value for name, value in tensors.items()}
    return tensors


def save_state_dict(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` atomically to ``path`` (see :func:`atomic_write`), replacing any file.

    ``.safetensors`` targets get ``metadata`` as their ``__metadata__`` (string -> string);
    other suffixes are written with ``torch.save`` as a plain state_dict (``metadata`` is not
    stored). Whether ``path`` may be overwritten is the caller's decision.

    Raises:
        AdntnError: the directory is missing or unwritable, or writing fails.
    """
    if Path(path).suffix == SAFETENSORS_SUFFIX:
        atomic_write(path, lambda temporary: write_safetensors(tensors, temporary, metadata))
    else:
        atomic_write(path, lambda temporary: torch.save(tensors, temporary))


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(temporary)`` on a hidden file beside ``path``, fsync it and move it over ``path``.

    A failure (or an interrupt) removes the temporary file, so it never leaves a partial or
    clobbered ``path``.

    Raises:
        AdntnError: the directory is missing or unwritable, or ``write`` fails.
    """
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise AdntnError(f"Cannot write {path}: {directory} is not an existing directory.")
    temporary = directory / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        # O_EXCL: never reuse an existing name; mode 0o666 lets the umask decide permissions.
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as error:
        raise AdntnError(f"Cannot write {path}: {error.strerror or error}.") from None
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, AdntnError):
            raise
        if isinstance(error, OSError):
            raise AdntnError(f"Cannot write {path}: {error.strerror or error}.") from None
        if isinstance(error, Exception):
            raise AdntnError(f"Cannot write {path}: {error}.") from None
        raise


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


def write_blocks(name: str, produced: torch.Tensor | Iterable[torch.Tensor], dtype: torch.dtype,
                 shape: Sequence[int], write: Callable[[memoryview], object]) -> None:
    """Pass the row-major bytes of tensor ``name`` to ``write``, one block at a time.

    ``produced`` is the tensor (``dtype``, ``shape``), or an iterable of row blocks of ``dtype``
    whose bytes, concatenated in order, are the tensor's. Each block is written and dropped before
    the next is asked for, so a producer may reuse a block's buffer for the block after next.

    Raises:
        AdntnError: the tensor, or a block's dtype or the blocks' total size, is not the announced one.
    """
    announced = f"the announced {dtype} {tuple(shape)}"
    if isinstance(produced, torch.Tensor):
        if (produced.dtype, tuple(produced.shape)) != (dtype, tuple(shape)):
            raise AdntnError(f"Cannot store {name}: it came out as {produced.dtype} {tuple(produced.shape)}, "
                             f"not {announced}.")
        produced = (produced,)
    expected, total = math.prod(shape) * dtype.itemsize, 0
    for block in produced:
        block = block.detach().cpu().contiguous()
        if block.dtype != dtype:
            raise AdntnError(f"Cannot store {name}: a block came out as {block.dtype}, not {announced}.")
        total += block.numel() * dtype.itemsize
        if total > expected:
            raise AdntnError(f"Cannot store {name}: its blocks hold more than the {expected} bytes of {announced}.")
        if block.numel():
            write(memoryview(block.reshape(-1).view(torch.uint8).numpy()))
        del block
    if total != expected:
        raise AdntnError(f"Cannot store {name}: its blocks hold {total} bytes, not the {expected} of {announced}.")


_MADV_DONTNEED = 4  # Linux


def _private_file_mapping(start: int, stop: int) -> bool:
    """Whether the addresses [start, stop) lie in one private mapping of a file (/proc/self/maps)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                low, high = (int(value, 16) for value in fields[0].split("-"))
                if low <= start and stop <= high:
                    return fields[1].endswith("p") and fields[4] != "0" and len(fields) > 5
    except (OSError, ValueError, IndexError):
        pass
    return False


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages of a tensor that views a file mapped by ``load_state_dict(mmap=True)``.

    The values stay readable: the next read faults them in again from the file (the page cache).
    So reading a mapped checkpoint block by block, releasing each block, keeps the process's
    resident memory at one block. A no-op for any other tensor (anonymous memory would lose its
    values), for non-contiguous tensors and off Linux. The tensor must never have been written to.
    """
    if not sys.platform.startswith("linux") or not tensor.is_contiguous() or tensor.device.type != "cpu":
        return
    page = os.sysconf("SC_PAGE_SIZE")
    address = tensor.data_ptr()
    start = -(-address // page) * page  # whole pages inside the tensor only
    stop = (address + tensor.numel() * tensor.element_size()) // page * page
    if stop > start and _private_file_mapping(start, stop):
        _madvise()(start, stop - start, _MADV_DONTNEED)


@functools.cache
def _madvise():
    """libc's madvise(addr, length, advice), looked up once."""
    function = ctypes.CDLL(None, use_errno=True).madvise
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


def row_blocks(tensor: torch.Tensor, values: int = 1 << 22) -> Iterator[torch.Tensor]:
    """Blocks of whole rows (along dim 0) of about ``values`` entries each, each released with
    :func:`release_pages` once the consumer asks for the next: a mapped tensor is read through
    without staying resident. The blocks are views; a 0-d tensor is one block."""
    if tensor.dim() == 0:
        yield tensor
        return
    rows = max(1, values // max(1, math.prod(tensor.shape[1:])))
    for block in tensor.split(rows):
        yield block
        release_pages(block)


_FINITE_CHUNK = 1 << 22  # elements per isfinite pass


def check_finite(tensors: Mapping[str, torch.Tensor], keys: Iterable[str]) -> None:
    """Raise :class:`AdntnError` naming the first of ``keys`` whose tensor has NaN or Inf values.

    Raises:
        AdntnError: a key is missing from ``tensors`` or its tensor is not finite.
    """
    for key in keys:
        if key not in tensors:
            raise AdntnError(f"The checkpoint has no tensor named {key}.")
        tensor = tensors[key]
        if tensor.is_floating_point() or tensor.is_complex():
            # in blocks: isfinite allocates a full-size temporary (|x|), 0.4 GB for VGG-16's fc6,
            # and a mapped checkpoint is read through without staying resident
            if not all(bool(torch.isfinite(block).all()) for block in row_blocks(tensor, _FINITE_CHUNK)):
                raise AdntnError(
                    f"{key} contains NaN or Inf values; adntn cannot compress non-finite weights."
                )


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks.

    Raises:
        AdntnError: the file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            while chunk := stream.read(_SHA256_CHUNK):
                digest.update(chunk)
    except OSError as error:
        raise AdntnError(f"Cannot read {path}: {error.strerror or error}.") from None
    return digest.hexdigest()
