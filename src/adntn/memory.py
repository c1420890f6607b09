"""One memory policy: how large the blocks are that stream through a large tensor.

Every place that reads, copies, generates or checks a weight in parts takes its block size from
the current :class:`MemoryPolicy`, so one byte budget decides the extra memory of all of them:

* ``block_bytes``: a streamed block (rows of a checkpoint tensor copied into the fit's target or
  checked for NaN, rows of a generated weight written by ``expand``, rows of the reported error
  in float64, a MERA slice in the fit);
* ``cache_bytes``: a float32 work block meant to stay in cache (a bfloat16 target read in float32).

The policy is a context variable: ``with memory_policy(block_bytes=1 << 20): ...`` changes it for
the code inside (and for tests), nothing else. It also holds :func:`release_pages`, which lets a
mapped checkpoint be read through block by block without staying resident, and
:func:`reused_blocks`, which keeps the pages of block-sized temporaries for the next block.
"""

from __future__ import annotations

import contextvars
import ctypes
import functools
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class MemoryPolicy:
    """Byte budgets of the blocks (see the module docstring); each at least one value."""

    block_bytes: int = 16 << 20
    cache_bytes: int = 1 << 20

    def block_values(self, itemsize: int = FLOAT32_BYTES) -> int:
        """Entries of ``itemsize`` bytes in a streamed block."""
        return max(1, self.block_bytes // itemsize)

    def cache_values(self, itemsize: int = FLOAT32_BYTES) -> int:
        """Entries of ``itemsize`` bytes in a cache-sized block."""
        return max(1, self.cache_bytes // itemsize)

    def block_rows(self, row_values: int, itemsize: int = FLOAT32_BYTES) -> int:
        """Whole rows of ``row_values`` entries per streamed block (at least one)."""
        return max(1, self.block_values(itemsize) // max(1, row_values))


_POLICY: contextvars.ContextVar[MemoryPolicy] = contextvars.ContextVar("adntn_memory_policy", default=MemoryPolicy())


def current_policy() -> MemoryPolicy:
    """The policy in force (the defaults unless inside :func:`memory_policy`)."""
    return _POLICY.get()


@contextmanager
def memory_policy(**budgets: int) -> Iterator[MemoryPolicy]:
    """Run the block inside with ``block_bytes`` and/or ``cache_bytes`` changed."""
    token = _POLICY.set(replace(_POLICY.get(), **budgets))
    try:
        yield _POLICY.get()
    finally:
        _POLICY.reset(token)


def row_blocks(tensor: torch.Tensor, values: int | None = None) -> Iterator[torch.Tensor]:
    """Blocks of whole rows (along dim 0) of about ``values`` entries each (default: the policy's
    streamed block), each released with :func:`release_pages` once the consumer asks for the next:
    a mapped tensor is read through without staying resident. The blocks are views; a 0-d tensor
    is one block."""
    if tensor.dim() == 0:
        yield tensor
        return
    values = current_policy().block_values(tensor.element_size()) if values is None else values
    rows = max(1, values // max(1, math.prod(tensor.shape[1:])))
    for block in tensor.split(rows):
        yield block
        release_pages(block)


_MADV_DONTNEED = 4  # Linux
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # where glibc's own adjustment stops on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
KEPT_BLOCKS = 8  # streamed blocks of free heap ``reused_blocks`` keeps mapped (128 MiB by default)


@functools.cache
def _glibc():
    """The C library when it is glibc (mallopt and malloc_trim as documented there), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # absent from musl and macOS
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


@contextmanager
def reused_blocks() -> Iterator[None]:
    """Inside, temporaries below 32 MiB (two default streamed blocks) come from pages malloc keeps.

    glibc maps an allocation at or above its mmap threshold afresh every time (its adjustment
    raises the threshold to the size freed, so the same size is mapped again), and trims the
    heap's free top back to the OS: each new tensor then faults in every page. A fit that works
    in tiles allocates the same tile-sized temporaries for every tile: on fc6 of VGG-16, MERA's
    step faulted 88,000 pages (344 MB, 0.15 s of system time) and took 600-690 ms against
    560-590 ms with the pages kept. Inside, the mmap threshold is glibc's largest, 32 MiB (its
    mallopt refuses more), and up to KEPT_BLOCKS streamed blocks of free heap stay mapped. On
    exit the heap is trimmed (``malloc_trim``) and the thresholds stay at glibc's own largest
    (32 MiB, trimming above 64 MiB), where its adjustment takes them after the first large free.
    A no-op off glibc.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, min((1 << 31) - 1, KEPT_BLOCKS * current_policy().block_bytes))  # an int
    try:
        yield
    finally:
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)


def trim_heap() -> None:
    """Give the free pages of malloc's heap back to the OS (glibc's ``malloc_trim``); a no-op off
    glibc. For a caller that has just dropped temporaries much larger than what it keeps: glibc
    keeps freed blocks below its mmap threshold (which its adjustment raises to 32 MiB) mapped."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


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


