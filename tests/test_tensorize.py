import math

import torch
from hypothesis import given, settings, strategies as st

from adntn.memory import memory_policy
from adntn.core.tensorize import (choose_leg_factors, copy_in_runs, run_view, legs_to_weight, max_legs, prime_factors,
                             smooth_ceiling, weight_to_legs)


def test_prime_factors_and_smooth_ceiling():
    assert prime_factors(25088) == [2] * 9 + [7, 7]
    assert smooth_ceiling(25088) == 25088
    assert smooth_ceiling(4099) == 4116  # 2^2 * 3 * 7^3
    assert smooth_ceiling(1) == 1


def test_vgg16_fc6_legs_cover_exactly_without_padding():
    out_dims, in_dims = choose_leg_factors(4096, 25088, 8)
    assert math.prod(out_dims) == 4096 and math.prod(in_dims) == 25088
    legs = [o * i for o, i in zip(out_dims, in_dims)]
    assert legs == sorted(legs, reverse=True)
    assert max(legs) / min(legs) <= 2  # balanced


def test_max_legs_is_power_of_two_with_nontrivial_legs():
    assert max_legs(4096, 512) == 16  # 21 prime factors
    assert max_legs(10, 4096) == 8
    out_dims, in_dims = choose_leg_factors(10, 4096, max_legs(10, 4096))
    assert all(o * i >= 2 for o, i in zip(out_dims, in_dims))


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 40), cin=st.integers(1, 12), kernel=st.sampled_from([1, 3]),
       n_legs=st.sampled_from([1, 2, 4]))
def test_weight_to_legs_round_trip(out, cin, kernel, n_legs):
    torch.manual_seed(0)
    weight = torch.randn(out, cin, kernel, kernel) if kernel > 1 else torch.randn(out, cin)
    out_dims, in_dims = choose_leg_factors(out, cin * kernel * kernel, n_legs)
    legs = weight_to_legs(weight, out_dims, in_dims)
    assert legs.shape == tuple(o * i for o, i in zip(out_dims, in_dims))
    assert torch.equal(legs_to_weight(legs, out_dims, in_dims, tuple(weight.shape)), weight)
    # padding is zero: the legs hold exactly the weight's entries
    assert torch.isclose(legs.pow(2).sum(), weight.pow(2).sum())


def test_leg_k_pairs_row_digit_and_column_digit():
    out_dims, in_dims = (2, 3), (5, 2)
    weight = torch.arange(6 * 10, dtype=torch.float32).reshape(6, 10)
    legs = weight_to_legs(weight, out_dims, in_dims)
    # row r = 3*o1 + o2, col c = 2*i1 + i2; leg 1 = (o1, i1), leg 2 = (o2, i2)
    o1, o2, i1, i2 = 1, 2, 4, 1
    assert legs[o1 * 5 + i1, o2 * 2 + i2] == weight[3 * o1 + o2, 2 * i1 + i2]


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 40), cols=st.integers(1, 40), n_legs=st.sampled_from([1, 2, 4]),
       block_values=st.integers(1, 200))
def test_weight_to_legs_in_blocks_equals_one_permutation(out, cols, n_legs, block_values):
    """Whatever the block size: the same legs as one reshape-permute of the padded matrix, and
    ``after_block`` sees every row of the weight once, in order."""

    torch.manual_seed(0)
    weight = torch.randn(out, cols, dtype=torch.float64)
    out_dims, in_dims = choose_leg_factors(out, cols, n_legs)
    rows, padded_cols = math.prod(out_dims), math.prod(in_dims)
    padded = torch.nn.functional.pad(weight, (0, padded_cols - cols, 0, rows - out))
    k = len(out_dims)
    order = [axis for pair in zip(range(k), range(k, 2 * k)) for axis in pair]
    expected = padded.reshape(*out_dims, *in_dims).permute(*order).reshape([o * i for o, i in zip(out_dims, in_dims)])
    seen = []
    with memory_policy(block_bytes=4 * block_values):
        legs = weight_to_legs(weight, out_dims, in_dims, dtype=torch.float32, after_block=seen.append)
    assert legs.dtype == torch.float32
    assert torch.equal(legs, expected.float())
    assert torch.equal(torch.cat(seen), weight)


_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16}


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(list(_INT_OF)), offset=st.integers(0, 3))
def test_copy_in_runs_moves_the_same_bits_as_copy(data, dtype, offset):
    """Any permuted view (of a buffer at any offset) into a contiguous tensor or a permuted view:
    the same bits as ``copy_``, NaN payloads included."""
    shape = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=5))
    order = data.draw(st.permutations(range(len(shape))))
    numel = math.prod(shape)
    bits = torch.randint(-2 ** 15, 2 ** 15, (numel + offset,), generator=torch.Generator().manual_seed(0))
    base = bits.to(_INT_OF[dtype]).view(dtype)  # every bit pattern: NaNs, infinities, subnormals
    src = base[offset:].view(shape).permute(*order)
    for dst in (torch.empty(src.shape, dtype=dtype), torch.empty(shape, dtype=dtype).permute(*order)):
        expected = torch.empty_like(dst).copy_(src)
        assert torch.equal(copy_in_runs(dst, src).view(_INT_OF[dtype]), expected.view(_INT_OF[dtype]))


def test_run_view_widens_the_runs_the_leg_and_weight_orders_share():
    legs = torch.zeros(3, 2, 5, 4)  # (o_1, i_1, o_2, i_2): runs of i_2 = 4 floats in weight order
    split = legs.permute(0, 2, 1, 3)
    assert run_view(torch.empty(split.shape), split) == (torch.complex128, 1)
    pairs = torch.zeros(3, 2, 5, 2).permute(0, 2, 1, 3)
    assert run_view(torch.empty(pairs.shape), pairs) == (torch.int64, 1)
    odd = torch.zeros(3, 2, 5, 3).permute(0, 2, 1, 3)
    assert run_view(torch.empty(odd.shape), odd) is None
    shifted = torch.zeros(1 + legs.numel())[1:].view(legs.shape).permute(0, 2, 1, 3)  # 4 bytes off
    assert run_view(torch.empty(shifted.shape), shifted) is None
    assert run_view(torch.empty(3, 4), torch.zeros(3, 4)) is None  # contiguous: one plain copy
