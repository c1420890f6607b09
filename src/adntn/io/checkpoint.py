"""Checkpoint I/O: read state_dicts from ``.safetensors`` or PyTorch pickles, and write them.

Every failure a user can cause (missing, unreadable, corrupt or unsafe file, unwritable target,
non-finite weights) is raised as an :class:`~adntn.errors.AdntnError` with a one-sentence
message; no other exception escapes for bad input.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
import struct
import sys
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from adntn.errors import AdntnError
from adntn.io.files import atomic_write
from adntn.io.safetensors import SAFETENSORS_SUFFIX, safetensors_layout, write_safetensors
from adntn.memory import row_blocks

WRAPPER_KEYS = ("state_dict", "model")  # checkpoint dicts that wrap a state_dict under these keys
DATA_PARALLEL_PREFIX = "module."
_SHA256_CHUNK = 1 << 20
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
# A zip checkpoint whose records expand to more than MAX_EXPANSION times its file size and more
# than EXPANSION_FLOOR_BYTES is refused before torch.load: torch.save writes stored (uncompressed)
# records, so a real checkpoint's ratio is about 1, and a few MB of deflated zeros could
# otherwise make torch.load allocate gigabytes.
MAX_EXPANSION = 64
EXPANSION_FLOOR_BYTES = 256 << 20


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
    check_dense_tensors(tensors, str(path))
    return _strip_data_parallel_prefix(tensors), metadata


def check_dense_tensors(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse a tensor that holds no ordinary values: sparse, quantized, nested or on the meta device.

    Raises:
        AdntnError: naming the first such tensor of ``where`` (a file, or a module's class name).
    """
    for name, tensor in tensors.items():
        if tensor.is_meta:
            raise AdntnError(f"{where} holds {name} on the meta device, without values; "
                             "save the tensors after loading or initialising them.")
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested:
            kind, fix = (("quantized", "dequantize()") if tensor.is_quantized else
                         ("nested", "to_padded_tensor(0)") if tensor.is_nested else
                         (str(tensor.layout).removeprefix("torch."), "to_dense()"))
            raise AdntnError(f"{where} holds {name} as a {kind} tensor; adntn reads dense tensors only, "
                             f"so save it with tensor.{fix} first.")


def _read_safetensors(path: Path, mmap: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:  # validates the header
            metadata = dict(handle.metadata() or {})
            mapped = _map_safetensors(path, safetensors_layout(handle)) if mmap else None
            tensors = mapped if mapped is not None else {name: handle.get_tensor(name) for name in handle.keys()}
    except OSError as error:
        raise AdntnError(f"Cannot read {path}: {error.strerror or error}.") from None
    except (SafetensorError, ValueError, RuntimeError):
        problem = _metadata_problem(path)
        if problem:
            raise AdntnError(f"Cannot read {path}: its safetensors metadata {problem}; "
                             "safetensors stores strings only, so write each value as a JSON string.") from None
        raise AdntnError(
            f"Cannot read {path}: the file is empty, truncated or not a safetensors file."
        ) from None
    return tensors, metadata


def _metadata_problem(path: Path) -> str | None:
    """Why a safetensors header's ``__metadata__`` is not the mapping of strings to strings that
    the format allows (what safetensors refuses with a bare parse error), or None."""
    try:
        with open(path, "rb") as stream:
            (header_size,) = struct.unpack("<Q", stream.read(8))
            if header_size > 100_000_000:
                return None
            header = json.loads(stream.read(header_size))
    except (OSError, struct.error, ValueError, RecursionError):
        return None
    if not isinstance(header, dict) or "__metadata__" not in header or header["__metadata__"] is None:
        return None
    metadata = header["__metadata__"]
    if not isinstance(metadata, dict):
        return f"is a {type(metadata).__name__}, not a mapping of strings to strings"
    for key, value in metadata.items():
        if not isinstance(value, str):
            return f"is not a mapping of strings to strings ({key!r} is a {type(value).__name__})"
    return None


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
    _check_expansion(path)
    try:
        with warnings.catch_warnings():  # e.g. torch's note on validating sparse tensors, refused later
            warnings.simplefilter("ignore", UserWarning)
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


def _check_expansion(path: Path) -> None:
    """Refuse a zip file whose central directory declares a decompression bomb (see
    :data:`MAX_EXPANSION`); torch.load's reader allocates each record's declared size and rejects
    a record that inflates to any other size, so the declared sizes bound what loading takes."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            expanded = sum(info.file_size for info in archive.infolist())
        size = path.stat().st_size
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # torch.load reports what is wrong with the file
    if expanded > EXPANSION_FLOOR_BYTES and expanded > MAX_EXPANSION * size:
        raise AdntnError(
            f"Cannot read {path}: its zip records would expand to {_bytes(expanded)} from "
            f"{_bytes(size)} ({expanded // max(size, 1):,}x); adntn refuses compressed checkpoints "
            f"that expand more than {MAX_EXPANSION}x (torch.save does not compress), as a possible "
            f"decompression bomb."
        )


def _bytes(count: int) -> str:
    """``count`` bytes in B, KiB, MiB or GiB."""
    if count < 1024:
        return f"{count} B"
    exponent = min(3, (count.bit_length() - 1) // 10)
    return f"{count / (1 << 10 * exponent):.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


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


# The largest squared Frobenius norm a compressed weight may have. Fitting computes ||W||^2 and
# ||G - W||^2 in float32; for a generator G no larger than W the latter is at most (2 ||W||)^2,
# so ||W||^2 <= float32 max / 4 keeps every such sum finite. A weight beyond it (|w| ~ 1e19 and
# up) makes the SVD-based initialisation fail (eigh does not converge on an overflowed Gram).
MAX_SQUARED_NORM = torch.finfo(torch.float32).max / 4


def check_finite(tensors: Mapping[str, torch.Tensor], keys: Iterable[str]) -> None:
    """Raise :class:`AdntnError` naming the first of ``keys`` whose tensor has NaN or Inf values,
    or whose sum of squares exceeds :data:`MAX_SQUARED_NORM` (too large for float32 arithmetic).

    Raises:
        AdntnError: a key is missing from ``tensors`` or its tensor is not finite or too large.
    """
    for key in keys:
        if key not in tensors:
            raise AdntnError(f"The checkpoint has no tensor named {key}.")
        tensor = tensors[key]
        if tensor.is_floating_point() or tensor.is_complex():
            squared_norm = _squared_norm(tensor)
            if not math.isfinite(squared_norm) and not _all_finite(tensor):
                raise AdntnError(
                    f"{key} contains NaN or Inf values; adntn cannot compress non-finite weights."
                )
            if not squared_norm <= MAX_SQUARED_NORM:
                raise AdntnError(
                    f"{key} has weights too large for float32 arithmetic (sum of squares "
                    f"{squared_norm:.3g}, more than {MAX_SQUARED_NORM:.3g}); rescale them before compressing."
                )


def check_runnable(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse NaN or Inf values in any floating-point tensor of ``where`` (a checkpoint to run).

    Raises:
        AdntnError: naming the first such tensor.
    """
    for key, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not _all_finite(tensor):
            raise AdntnError(f"{where} holds NaN or Inf values in {key}; a model with them cannot run.")


def _squared_norm(tensor: torch.Tensor) -> float:
    """Sum of |x|^2, accumulated in float64 block by block: a float32 or narrower tensor's sum
    cannot overflow, and is NaN or Inf exactly when the tensor has NaN or Inf values."""
    # in blocks: the float64 temporary of a whole VGG-16 fc6 would be 0.8 GB, and a mapped
    # checkpoint is read through without staying resident
    total = 0.0
    for block in row_blocks(tensor):
        values = torch.view_as_real(block) if block.is_complex() else block
        total += float(torch.linalg.vector_norm(values, dtype=torch.float64).square())
    return total


def _all_finite(tensor: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(block).all()) for block in row_blocks(tensor))


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
