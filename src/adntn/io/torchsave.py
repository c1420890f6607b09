"""Write ``torch.save``'s zip format one tensor, or one row block, at a time.

:func:`stream_torch_save` writes, byte for byte, the file ``torch.save(dict(tensors), path)``
writes for tensors that own their contiguous storage (no ``requires_grad``), keys in the layout's
order, while holding one produced tensor or block at a time. (A module's ``state_dict()`` is an
OrderedDict that also pickles each module's version; ``load_state_dict`` does not need it.)

1. ``torch.save`` of placeholders (``torch.empty``: address space, never touched) under
   ``torch.serialization.skip_data()`` (torch >= 2.6) writes torch's own pickle, zip headers,
   64-byte data alignment, zip64 records and central directory, and leaves a hole for the bytes
   of each storage record ``data/<i>`` (the i-th tensor, in pickling order);
2. each tensor's blocks are written into its hole as they come, their CRC-32 computed on the way;
3. the CRC-32s go into the records' data descriptors and central-directory entries, and the
   ``.data/serialization_id`` record (the hash of the record names, then ``c10::hash_combine``
   of the records' CRC-32s, 20 digits each) is recomputed as torch.save computes it.

torch.load (2.14) checks no CRC-32, zip readers do. Identical bytes were checked by hand with
records and offsets past 4 GiB (zip64) too; the tests use small files.

Why not write the zip by hand: that needs torch's pickle all the same (this skip_data pass, or a
copy of torch's private persistent ids), a copy of its writer (padding extra fields, data
descriptors, zip64 rules), and the id's name hash is libstdc++'s ``std::hash``, so the file
would differ from torch.save's. Here every byte but the data, their CRC-32s and the id's second
half is torch's, for the same cost: the reserve pass took 2 ms for VGG-16's 32 tensors, and
writing its 553 MB 0.20 s against torch.save's 0.21 s (medians, page cache, no fsync).

Without ``skip_data``, or when the reserved file is not laid out as described above (a torch
that changed it), the tensors are gathered into a dict and written by ``torch.save``: the same
file, but the whole state_dict is in memory.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from adntn.io.files import write_blocks

_SERIALIZATION_ID = ".data/serialization_id"
_DESCRIPTOR = b"PK\x07\x08"  # data descriptor: signature, CRC-32, compressed and uncompressed size
_END = struct.Struct("<4s4H2LH")  # end of central directory
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central-directory entry, then name, extra field, comment
_LOCAL = struct.Struct("<4s5H3L2H")  # local header, then name and extra field (torch's padding)
_CENTRAL_CRC, _DESCRIPTOR_CRC = 16, 4  # where the CRC-32 sits in an entry and a descriptor
_UNKNOWN = 0xFFFFFFFF  # a 32-bit field whose value is in the zip64 extra field
_MASK = (1 << 64) - 1


@dataclass
class _Record:
    """One record of the zip: ``name`` without the archive's folder, where its data and entry are."""

    name: str
    crc: int
    size: int
    data: int  # file offset of its first data byte; a data descriptor follows the data (if any)
    entry: int  # file offset of its central-directory entry


def stream_torch_save(layout: Mapping[str, tuple[torch.dtype, Sequence[int]]],
                      produce: Callable[[str], torch.Tensor | Iterable[torch.Tensor]], path: Path) -> None:
    """Write what ``torch.save`` writes for the dict name -> tensor of ``layout`` (name -> (dtype,
    shape)), calling ``produce(name)`` once per name in ``layout``'s order; its result (one tensor,
    or row blocks: see :func:`~adntn.checkpoint.write_blocks`) is written and dropped before the
    next, so at most one of them is alive here.

    Raises:
        AdntnError: a produced tensor or its blocks do not match the layout.
    """
    records = _reserve(layout, path)
    if records is None:
        torch.save({name: _gathered(name, produce(name), *layout[name]) for name in layout}, path)
        return
    *contents, identity = records
    by_name = {record.name: record for record in contents}
    with open(path, "r+b") as handle:
        for index, name in enumerate(layout):
            record = by_name[f"data/{index}"]
            handle.seek(record.data)
            written = _Checksummed(handle)
            write_blocks(name, produce(name), *layout[name], written)
            if record.size:
                record.crc = written.crc
                _put_crc(handle, record)
        handle.seek(identity.data)
        digits = handle.read(identity.size)[:20] + b"%020d" % _combined_crc(contents)
        handle.seek(identity.data)
        handle.write(digits)
        identity.crc = zlib.crc32(digits)
        _put_crc(handle, identity)


def _reserve(layout: Mapping[str, tuple[torch.dtype, Sequence[int]]], path: Path) -> list[_Record] | None:
    """Write the file with a hole for the bytes of each tensor (record ``data/<i>`` for the i-th of
    ``layout``); return its records in file order, the serialization id's last, or None when this
    torch cannot skip data or lays the file out otherwise."""
    skip_data = getattr(torch.serialization, "skip_data", None)
    if skip_data is None:
        return None
    placeholders = {name: torch.empty(tuple(shape), dtype=dtype) for name, (dtype, shape) in layout.items()}
    with skip_data():
        torch.save(placeholders, path)
    del placeholders
    with open(path, "rb") as handle:
        records = _read_records(handle)
        if not records or records[-1].name != _SERIALIZATION_ID:
            return None
        handle.seek(records[-1].data)
        if handle.read(records[-1].size)[20:] != b"%020d" % _combined_crc(records[:-1]):
            return None  # not the id this module recomputes
        by_name = {record.name: record for record in records}
        if sum(name.startswith("data/") for name in by_name) != len(layout):
            return None
        for index, (dtype, shape) in enumerate(layout.values()):
            record = by_name.get(f"data/{index}")
            if record is None or record.size != math.prod(shape) * dtype.itemsize:
                return None
            handle.seek(record.data + record.size)
            if record.size and handle.read(len(_DESCRIPTOR)) != _DESCRIPTOR:
                return None
    return records


def _read_records(handle: BinaryIO) -> list[_Record] | None:
    """The records of the zip in ``handle``, in central-directory (= file) order; None if it is not
    a single-disk zip without an archive comment."""
    handle.seek(-_END.size, os.SEEK_END)
    end = handle.tell()
    signature, *_, directory_size, directory_offset, comment = _END.unpack(handle.read(_END.size))
    if signature != b"PK\x05\x06" or comment:
        return None
    if end >= _ZIP64_LOCATOR.size:
        handle.seek(end - _ZIP64_LOCATOR.size)
        signature, _, zip64_end, _ = _ZIP64_LOCATOR.unpack(handle.read(_ZIP64_LOCATOR.size))
        if signature == b"PK\x06\x07":
            handle.seek(zip64_end)
            signature, *_, directory_size, directory_offset = _ZIP64_END.unpack(handle.read(_ZIP64_END.size))
            if signature != b"PK\x06\x06":
                return None
    handle.seek(directory_offset)
    directory = handle.read(directory_size)
    records, position = [], 0
    while position < len(directory):
        (signature, *_, crc, packed_size, size, name_length, extra_length, comment_length, _, _, _,
         local) = _CENTRAL.unpack_from(directory, position)
        start = position + _CENTRAL.size
        extra = directory[start + name_length:start + name_length + extra_length]
        size, packed_size, local = _zip64_values(extra, size, packed_size, local)
        if signature != b"PK\x01\x02" or packed_size != size:  # torch stores records uncompressed
            return None
        handle.seek(local)
        local_signature, *_, local_name_length, local_extra_length = _LOCAL.unpack(handle.read(_LOCAL.size))
        if local_signature != b"PK\x03\x04":
            return None
        name = directory[start:start + name_length].decode().partition("/")[2]
        data = local + _LOCAL.size + local_name_length + local_extra_length
        records.append(_Record(name, crc, size, data, directory_offset + position))
        position = start + name_length + extra_length + comment_length
    return records


def _zip64_values(extra: bytes, *values: int) -> list[int]:
    """``values`` (uncompressed size, compressed size, local header offset) with each one that is
    ``0xFFFFFFFF`` read, in that order, from the zip64 field (id 1) of a central ``extra`` field."""
    values = list(values)
    position = 0
    while position + 4 <= len(extra):
        tag, length = struct.unpack_from("<2H", extra, position)
        if tag == 1:
            wide = iter(struct.unpack_from(f"<{length // 8}Q", extra, position + 4))
            values = [next(wide) if value == _UNKNOWN else value for value in values]
        position += 4 + length
    return values


def _combined_crc(records: Iterable[_Record]) -> int:
    """``c10::hash_combine`` folded over the CRC-32s in the records' data descriptors (empty records
    have none): the second half of torch's serialization id."""
    combined = 0
    for record in records:
        if record.size:
            combined ^= (record.crc + 0x9E3779B9 + (combined << 6) + (combined >> 2)) & _MASK
    return combined


def _put_crc(handle: BinaryIO, record: _Record) -> None:
    """Set ``record.crc`` in its data descriptor and its central-directory entry (a record that is
    not empty; an empty one has no descriptor and CRC-32 0)."""
    for offset in (record.data + record.size + _DESCRIPTOR_CRC, record.entry + _CENTRAL_CRC):
        handle.seek(offset)
        handle.write(struct.pack("<L", record.crc))


class _Checksummed:
    """A writer into ``handle`` at its current position that keeps the CRC-32 of what it wrote."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.crc = handle, 0

    def __call__(self, block: memoryview) -> None:
        self.handle.write(block)
        self.crc = zlib.crc32(block, self.crc)


def _gathered(name: str, produced: torch.Tensor | Iterable[torch.Tensor], dtype: torch.dtype,
              shape: Sequence[int]) -> torch.Tensor:
    """The tensor ``produced`` stands for, its blocks copied into one (the fallback's dict)."""
    tensor = torch.empty(tuple(shape), dtype=dtype)
    flat, position = tensor.reshape(-1).view(torch.uint8).numpy(), 0

    def copy(block: memoryview) -> None:
        nonlocal position
        flat[position:position + len(block)] = block
        position += len(block)

    write_blocks(name, produced, dtype, shape, copy)
    return tensor
