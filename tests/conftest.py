"""Shared fixtures."""

from contextlib import ExitStack

import pytest
import torch

from adntn import memory
from adntn.demo import small_vgg11


@pytest.fixture
def memory_policy():
    """``memory_policy(block_bytes=..., cache_bytes=...)`` sets the block sizes for the rest of one test."""
    with ExitStack() as stack:
        yield lambda **budgets: stack.enter_context(memory.memory_policy(**budgets))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small torchvision VGG-11 state_dict (seed 0) saved as a .pt file, one per test module."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    torch.save(small_vgg11().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: one thread is as fast and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
