"""Shared fixtures."""

from contextlib import ExitStack

import pytest

from adntn import memory


@pytest.fixture
def memory_policy():
    """``memory_policy(block_bytes=..., cache_bytes=...)`` sets the block sizes for the rest of one test."""
    with ExitStack() as stack:
        yield lambda **budgets: stack.enter_context(memory.memory_policy(**budgets))
