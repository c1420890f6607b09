"""Tolerances that follow from the dtype and the magnitude of what is compared.

Two computations of the same quantity that differ only in rounding (another summation order:
row slices against the whole, blocks of another size, another BLAS kernel or MKL code path)
disagree by a few units of the dtype's machine epsilon *relative to the size of the numbers that
were summed*, not to the size of each result entry: an entry that is small because large terms
cancel carries the absolute error of those terms. So a comparison allows, elementwise,

    |actual - expected| <= condition * eps(dtype) * (|expected| + scale)

with ``scale`` the largest magnitude among the expected values (all tensors of a group together,
e.g. every parameter's gradient of one loss), and ``condition`` the number of eps the
computation may lose (a few per chained product or sum). The default, 64 eps, is six times the
worst case measured on an AMD EPYC under the default MKL path and MKL_CBWR=AVX2, AVX512 and
COMPATIBLE (11 eps, the gradients of test_a_bfloat16_target_is_read_in_float32_blocks); the
2.35e-6 gradient difference reported on an Intel Xeon for the MERA slices test is 2.2 eps x 9.04.

Set ``ADNTN_TOLERANCE_REPORT=1`` to print each comparison's measured error in these units.
"""

from __future__ import annotations

import os
import torch

CONDITION = 64  # eps lost by the computations compared here, with a margin over those measured


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (float32: 1.19e-7, float64: 2.22e-16)."""
    return torch.finfo(dtype).eps


def _as_tensors(values) -> list[torch.Tensor]:
    if isinstance(values, torch.Tensor):
        return [values]
    if isinstance(values, (int, float)):
        return [torch.tensor(float(values), dtype=torch.float64)]
    return [torch.as_tensor(value) for value in values]


def assert_close_scaled(actual, expected, *, condition: float = CONDITION, scale: float | None = None,
                        dtype: torch.dtype | None = None) -> None:
    """Assert ``actual`` equals ``expected`` up to rounding in ``dtype``.

    Args:
        actual, expected: tensors, Python numbers, or equally long sequences of tensors (one
            group: they share ``scale``).
        condition: allowed error in units of eps(dtype) times the magnitude (module docstring).
        scale: the magnitude of the numbers the computation summed; default the largest
            |expected| of the group. Give it when the expected values are (near) zero by
            cancellation.
        dtype: the precision the compared values were computed in; default the dtype of
            ``expected`` (float32 for a Python number, which comes from a float32 computation
            here unless stated).
    """
    actual_list, expected_list = _as_tensors(actual), _as_tensors(expected)
    assert len(actual_list) == len(expected_list), (len(actual_list), len(expected_list))
    if dtype is None:
        dtype = torch.float32 if isinstance(expected, (int, float)) else expected_list[0].dtype
    expected64 = [e.detach().double() for e in expected_list]
    if scale is None:
        scale = max(float(e.abs().max()) if e.numel() else 0.0 for e in expected64)
    unit = eps(dtype)
    worst = 0.0
    for index, (a, e) in enumerate(zip(actual_list, expected64)):
        assert a.shape == e.shape, f"entry {index}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        error = (a.detach().double() - e).abs()
        allowed = unit * (e.abs() + scale)
        if error.numel():
            ratio = float((error / allowed.clamp_min(torch.finfo(torch.float64).tiny)).max())
            worst = max(worst, ratio)
            assert ratio <= condition, (
                f"entry {index}: error {float(error.max()):.3g} is {ratio:.1f} eps(dtype) x magnitude, "
                f"over the {condition} allowed (scale {scale:.3g}, {dtype})")
    if os.environ.get("ADNTN_TOLERANCE_REPORT"):
        print(f"\n[tolerance] {worst:.2f} of {condition} eps x magnitude ({dtype}, scale {scale:.3g})")

