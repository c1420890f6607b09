"""Writing files safely: atomically (a hidden temporary renamed into place) and in blocks.

Every failure is an :class:`~adntn.errors.AdntnError` with a one-sentence message.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from adntn.errors import AdntnError


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
