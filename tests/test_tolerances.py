"""The tolerance helper: errors are measured in eps of the dtype times the magnitude."""

import pytest
import torch

from tolerances import CONDITION, assert_close_scaled, eps


def test_rounding_passes_and_a_real_difference_fails():
    expected = torch.tensor([9.0, 0.4, 2e-4])
    unit = eps(torch.float32)
    assert_close_scaled(expected + 10 * unit * 9.0, expected)  # 10 eps of the largest entry, anywhere
    with pytest.raises(AssertionError, match="eps"):
        assert_close_scaled(expected + torch.tensor([0, 0, 2 * CONDITION * unit * 9.0]), expected)
    with pytest.raises(AssertionError):
        assert_close_scaled(expected * (1 + 1e-4), expected)  # 840 eps relative


def test_a_group_shares_one_scale_and_zero_needs_an_explicit_one():
    unit = eps(torch.float32)
    big, small = torch.tensor([8.0]), torch.tensor([1e-4])
    assert_close_scaled([big, small + 20 * unit * 8.0], [big, small])  # small: rounding of big terms
    with pytest.raises(AssertionError):
        assert_close_scaled(small + 20 * unit * 8.0, small)  # alone, the same error is 2000 of its eps
    with pytest.raises(AssertionError):
        assert_close_scaled(1e-9, 0.0)
    assert_close_scaled(1e-6, 0.0, scale=1.0)


def test_float64_is_judged_by_its_own_eps():
    assert_close_scaled(1.0 + 1e-14, 1.0, dtype=torch.float64)
    with pytest.raises(AssertionError):
        assert_close_scaled(1.0 + 1e-12, 1.0, dtype=torch.float64)
