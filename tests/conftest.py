"""Shared fixtures, and the property tests' profile.

``make test`` (and CI) draws the same hypothesis examples on every run (``derandomized``): a run
is red or green by the code and the machine's arithmetic, not by which examples it drew.
``ADNTN_HYPOTHESIS=explore`` (``make test-explore``) draws fresh ones, to look for counterexamples;
pin what it finds with ``@example``.
"""

import os
from contextlib import ExitStack

import pytest
import torch
from hypothesis import settings

from adntn import memory
from adntn.demo import small_vgg11

settings.register_profile("derandomized", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("ADNTN_HYPOTHESIS", "derandomized"))


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
