"""Writing files safely: atomically (a hidden temporary renamed into place) and in blocks.

Every failure is an :class:`~adntn.errors.AdntnError` with a one-sentence message.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from adntn.errors import AdntnError


_STALE_SUFFIX = re.compile(r"(?P<kind>tmp|old)-(?P<pid>[0-9]+)(?:-[0-9a-f]+)?")
_NAME_MAX = 255  # where the file system does not say


def temporary_name(path: Path, kind: str = "tmp", token: str = "") -> str:
    """The hidden sibling name of ``path`` that a run of this process uses while writing it:
    ``.NAME.tmp-PID[-TOKEN]`` (being written) or ``.NAME.old-PID`` (the replaced one, until the new
    one is in place); the PID lets a later run tell the leftovers of a dead run (:func:`sweep_stale`)."""
    return f".{Path(path).name}.{kind}-{os.getpid()}" + (f"-{token}" if token else "")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or no PID at all): not ours to judge
    return True


def sweep_stale(path: Path) -> None:
    """Remove what runs that died (killed, power cut) left beside ``path``: its ``.NAME.tmp-PID*``
    temporaries and ``.NAME.old-PID`` retired copies whose PID is no longer running. A retired copy
    whose ``path`` is gone (the run died between moving it aside and moving the new one in) is
    put back instead. Best effort: what cannot be removed stays."""
    path = Path(path)
    prefix = f".{path.name}."
    try:
        entries = [entry for entry in path.parent.iterdir() if entry.name.startswith(prefix)]
    except OSError:
        return
    for entry in sorted(entries):
        match = _STALE_SUFFIX.fullmatch(entry.name[len(prefix):])
        if match is None or _alive(int(match["pid"])):
            continue
        try:
            if match["kind"] == "old" and not os.path.lexists(path):
                os.replace(entry, path)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            pass


def check_name_fits(path: Path, *names: str) -> None:
    """Raise unless ``path``'s name and the hidden ``names`` written beside it fit the file system.

    Raises:
        AdntnError: a name is longer than the directory allows (``File name too long``).
    """
    path = Path(path)
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = _NAME_MAX
    longest = max((path.name, *names), key=lambda name: len(os.fsencode(name)))
    if len(os.fsencode(longest)) > limit:
        spare = limit - (len(os.fsencode(longest)) - len(os.fsencode(path.name)))
        raise AdntnError(f"Cannot write {path}: its name is too long for this file system "
                         f"(at most {max(spare, 0)} bytes here, as the temporary name beside it adds to it).")


def finite_json(value: object) -> object:
    """``value`` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def json_text(payload: object, *, indent: int | None = 2) -> str:
    """Strict JSON (no NaN, Infinity: non-finite floats become null), ending in a newline."""
    return json.dumps(finite_json(payload), indent=indent, allow_nan=False) + "\n"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(temporary)`` on a hidden file beside ``path``, fsync it and move it over ``path``.

    A failure (or an interrupt) removes the temporary file, so it never leaves a partial or
    clobbered ``path``; temporaries of ``path`` left by runs that died are removed first
    (:func:`sweep_stale`).

    Raises:
        AdntnError: the directory is missing or unwritable, or ``write`` fails.
    """
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise AdntnError(f"Cannot write {path}: {directory} is not an existing directory.")
    temporary = directory / temporary_name(path, "tmp", secrets.token_hex(4))
    check_name_fits(path, temporary.name)
    sweep_stale(path)
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
