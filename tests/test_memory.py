"""Tests for adntn.memory: the block-size policy, row blocks and dropping a mapped tensor's pages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adntn import memory
from adntn.io.checkpoint import load_state_dict, save_state_dict
from adntn.memory import MemoryPolicy, current_policy, memory_policy, release_pages, row_blocks


def resident_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            return int(line.split()[1])
    return 0


def test_policy_sets_every_block_size_from_bytes() -> None:
    assert current_policy() == MemoryPolicy()
    assert MemoryPolicy().block_values() == 1 << 22 and MemoryPolicy().cache_values() == 1 << 18
    with memory_policy(block_bytes=400) as policy:
        assert current_policy() is policy and policy.block_values() == 100 and policy.block_values(2) == 200
        assert policy.block_rows(30) == 3 and policy.block_rows(1000) == 1
        assert [tuple(b.shape) for b in row_blocks(torch.zeros(7, 30))] == [(3, 30), (3, 30), (1, 30)]
    assert current_policy() == MemoryPolicy()


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_release_pages_drops_a_mapped_tensor_and_keeps_its_values(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"big{suffix}"
    values = torch.randn(4096, 4096)  # 64 MiB
    save_state_dict({"w": values}, path)
    mapped = load_state_dict(path, mmap=True)[0]["w"]
    before = resident_kib()
    assert torch.equal(mapped, values)  # reading maps the pages in
    touched = resident_kib()
    release_pages(mapped)
    released = resident_kib()
    assert touched - before > 48 * 1024
    assert touched - released > 48 * 1024
    assert torch.equal(mapped, values)  # read again from the file


def test_release_pages_leaves_ordinary_memory_alone() -> None:
    """Anonymous memory would read back as zeros after MADV_DONTNEED: it must never be touched."""
    values = torch.randn(1 << 20)
    copy = values.clone()
    release_pages(values)
    for block in row_blocks(values.reshape(1024, 1024), 1 << 12):
        pass
    assert torch.equal(values, copy)


def test_row_blocks_cover_the_rows_in_order() -> None:
    tensor = torch.arange(7 * 3).reshape(7, 3)
    blocks = list(row_blocks(tensor, 6))
    assert [tuple(b.shape) for b in blocks] == [(2, 3), (2, 3), (2, 3), (1, 3)]
    assert torch.equal(torch.cat(blocks), tensor)
    assert [b.item() for b in row_blocks(torch.tensor(5.0))] == [5.0]
    assert torch.cat(list(row_blocks(torch.empty(0, 4)))).shape == (0, 4)


_FAULTS_SCRIPT = """
import resource, torch
from adntn import memory
values, page = 1 << 20, resource.getpagesize()  # 4 MiB tensors
def faults_per_page():
    torch.ones(values)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        a, b = torch.ones(values), torch.ones(values)
        del a, b
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / (40 * values * 4 / page)
memory._glibc().mallopt(memory._M_MMAP_THRESHOLD, 128 << 10)  # glibc's initial threshold, held there
outside = faults_per_page()
with memory.reused_blocks():
    inside = faults_per_page()
print(outside, inside)
"""


@pytest.mark.skipif(memory._glibc() is None, reason="glibc's malloc")
def test_reused_blocks_serve_block_sized_temporaries_from_kept_pages() -> None:
    """With glibc's initial mmap threshold (held there: how far its own adjustment has moved it
    depends on the process's history), each new 4 MiB tensor is mapped afresh and faults in every
    page; inside ``reused_blocks`` the freed pages serve the next ones."""
    result = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, check=True)
    outside, inside = (float(v) for v in result.stdout.split())
    assert outside > 0.9
    assert inside < 0.1
