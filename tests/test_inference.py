"""Inference without the dense weight: the factorized and blocked schedules of the generated
layers equal F.linear / F.conv2d with the generated weight, with the same gradients, a cache that
follows the cores, and no dense weight ever generated."""

from __future__ import annotations


import math
from dataclasses import replace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from adntn.memory import memory_policy
from adntn.models.layers import GeneratedConv2d, GeneratedLinear, inference_cost
from adntn.networks import build
from adntn.networks.budget import default_legs, spec_for_bond_dim, spec_for_ratio
from adntn.core.tensorize import choose_leg_factors
from adntn.networks.base import Generator
from adntn.networks.halves import MIN_BLOCK_SIDE, halves_macs, oriented_leg_factors
from adntn.networks.tt import GEMM_FULL_WIDTH, TTPlan

from test_networks import make_spec, perturb_mixers
from tolerances import assert_close_scaled

ARCHS = ("ttn", "attn", "mera", "tt", "svd")
LINEAR_SHAPE, CONV_SHAPE = (53, 30), (16, 4, 3, 3)


pytestmark = pytest.mark.usefixtures("one_thread")


def generator(arch: str, shape: tuple[int, ...], n_legs: int = 4, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    net = build(make_spec(arch, shape, 1 if arch == "svd" else n_legs))
    perturb_mixers(net)
    return net


def schedules(net: Generator) -> list[str]:
    return (["factorized"] if net.has_factorized else []) + ["blocked", "dense", "auto"]


def product_scale(x: torch.Tensor, weight: torch.Tensor) -> float:
    """The largest sum of |terms| of x W^T: the magnitude its rounding follows (an output that is
    small because its terms cancel carries their rounding)."""
    return float((x.detach().abs().reshape(-1, weight.shape[1]) @ weight.detach().abs().T).max())


def no_forward(monkeypatch, net: Generator) -> None:
    """Generating the whole dense weight raises."""
    def refuse(*args, **kwargs):
        raise AssertionError("the dense weight was generated")
    monkeypatch.setattr(type(net), "forward", refuse)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_legs", [2, 4, 8])
@pytest.mark.parametrize("batch", [1, 7])
def test_linear_schedules_equal_the_dense_layer(arch: str, n_legs: int, batch: int, monkeypatch) -> None:
    if arch == "svd" and n_legs != 4:
        pytest.skip("svd has one leg per side")
    net = generator(arch, LINEAR_SHAPE, n_legs)
    bias = torch.randn(LINEAR_SHAPE[0])
    with torch.no_grad():
        weight = net()
    x = torch.randn(batch, 3, LINEAR_SHAPE[1])
    expected = F.linear(x, weight, bias)
    layer = GeneratedLinear(net, bias)
    for schedule in schedules(net):
        layer.schedule = schedule
        with torch.no_grad():
            if schedule != "dense":
                with monkeypatch.context() as patch:
                    no_forward(patch, net)
                    actual = layer(x)
            else:
                actual = layer(x)
        assert actual.shape == expected.shape
        assert_close_scaled(actual, expected)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_schedules_equal_the_dense_convolution(arch: str, batch: int, monkeypatch) -> None:
    net = generator(arch, CONV_SHAPE)
    bias = torch.randn(CONV_SHAPE[0])
    with torch.no_grad():
        weight = net()
    x = torch.randn(batch, 4, 9, 8)
    expected = F.conv2d(x, weight, bias, stride=2, padding=1)
    layer = GeneratedConv2d(net, bias, stride=(2, 2), padding=(1, 1))
    for schedule in schedules(net):
        layer.schedule = schedule
        with torch.no_grad():
            if schedule != "dense":
                with monkeypatch.context() as patch:
                    no_forward(patch, net)
                    actual = layer(x)
            else:
                actual = layer(x)
        assert actual.shape == expected.shape
        assert_close_scaled(actual, expected)


def test_factorized_is_refused_without_a_factorized_form() -> None:
    identity_leaves = identity_leaf_mera(LINEAR_SHAPE)
    layer = GeneratedLinear(identity_leaves, None)
    with pytest.raises(ValueError):
        layer.schedule = "factorized"
    with pytest.raises(ValueError):
        GeneratedLinear(identity_leaves, None, schedule="factorized")
    with pytest.raises(ValueError):
        layer.schedule = "fast"
    assert layer.schedule == "auto"


@pytest.mark.parametrize("arch", ["ttn", "attn", "tt", "svd"])
@pytest.mark.parametrize("conv", [False, True])
def test_factorized_gradients_equal_the_dense_ones(arch: str, conv: bool) -> None:
    shape = CONV_SHAPE if conv else LINEAR_SHAPE
    net = generator(arch, shape)
    layer = (GeneratedConv2d(net, torch.randn(shape[0]), (2, 2), (1, 1)) if conv
             else GeneratedLinear(net, torch.randn(shape[0])))
    x = torch.randn(*((2, 4, 7, 6) if conv else (5, shape[1])), requires_grad=True)
    probe = torch.randn_like(layer(x))
    grads = {}
    for schedule in ("dense", "factorized"):
        layer.schedule = schedule
        layer.zero_grad(set_to_none=True)
        x.grad = None
        (layer(x) * probe).sum().backward()
        grads[schedule] = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    assert len(grads["dense"]) == len(grads["factorized"]) > 2
    for actual, expected in zip(grads["factorized"], grads["dense"]):
        assert_close_scaled(actual, expected)


@pytest.mark.parametrize("arch, n_legs", [("ttn", 4), ("ttn", 8), ("tt", 4), ("attn", 2), ("attn", 4)])
@pytest.mark.parametrize("conv", [False, True])
def test_factorized_in_row_chunks_equals_the_dense_layer_with_its_gradients(arch: str, n_legs: int,
                                                                           conv: bool) -> None:
    """A cache block of two intermediate rows: x goes through the halves' (tt: three groups')
    product in chunks of 1-2 rows (aTTN's middle correction, with 4 legs, on the whole batch)."""
    shape = CONV_SHAPE if conv else LINEAR_SHAPE
    net = generator(arch, shape, n_legs)
    layer = (GeneratedConv2d(net, torch.randn(shape[0]), (2, 2), (1, 1)) if conv
             else GeneratedLinear(net, torch.randn(shape[0])))
    x = torch.randn(*((2, 4, 7, 6) if conv else (9, shape[1])), requires_grad=True)
    probe = torch.randn_like(layer(x))
    per_row = net.linear_row_values()
    results = {}
    for schedule in ("dense", "factorized"):
        layer.schedule = schedule
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with memory_policy(cache_bytes=4 * per_row * 2):
            assert net.linear_chunk_rows() == 2
            out = layer(x)
        (out * probe).sum().backward()
        results[schedule] = [out.detach(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()
                                                               if p.grad is not None]
    assert len(results["dense"]) == len(results["factorized"]) > 3
    for actual, expected in zip(results["factorized"], results["dense"]):
        assert_close_scaled(actual, expected)


@pytest.mark.parametrize("shape", [LINEAR_SHAPE, CONV_SHAPE, (64, 48)])
@pytest.mark.parametrize("n_legs", [2, 4, 8])
@pytest.mark.parametrize("bond", [1, 2, 3])
def test_mera_factorized_is_x_times_the_weight_with_its_gradients(shape, n_legs, bond) -> None:
    """Matrix leaves (bonds below the legs), some identity ones, physical disentanglers on
    matrix or identity pairs, padded shapes: the einsum over the state above the leaves is
    x W^T, and its gradients (input and every core) are the dense form's."""
    _check_mera_factorized(shape, n_legs, bond)


@pytest.mark.parametrize("shape", [(4096, 512), (256, 256)])
@pytest.mark.parametrize("mix_rank", [0, 2])
def test_mera_factorized_with_16_legs(shape, mix_rank) -> None:
    """The smallest MERAs (16 legs at bond 1, as the budget ladders use): without physical
    disentanglers an einsum of 18 operands, whose path search must not be dynamic programming
    (it had not finished after 22 minutes on the (4096, 512) one)."""
    assert build(make_spec("mera", shape, 16, bond=1, mix_rank=mix_rank)).has_factorized
    _check_mera_factorized(shape, 16, 1, mix_rank)


def _check_mera_factorized(shape: tuple[int, ...], n_legs: int, bond: int, mix_rank: int = 2) -> None:
    torch.manual_seed(0)
    net = build(make_spec("mera", shape, n_legs, bond=bond, mix_rank=mix_rank))
    perturb_mixers(net)
    cols = math.prod(shape[1:])
    x = torch.randn(5, cols, dtype=torch.float64, requires_grad=True)
    net = net.double()
    probe = torch.randn(5, shape[0], dtype=torch.float64)
    outputs, grads = {}, {}
    for form in ("factorized", "dense"):
        net.zero_grad(set_to_none=True)
        x.grad = None
        weight = net().reshape(shape[0], -1)
        outputs[form] = net.linear(x) if form == "factorized" else x @ weight.T
        (outputs[form] * probe).sum().backward()
        grads[form] = [x.grad.clone(), *(p.grad.clone() for p in net.parameters() if p.grad is not None)]
    # y sums products x W that may cancel: its scale is that of the terms
    assert_close_scaled(outputs["factorized"], outputs["dense"], scale=product_scale(x.detach(), weight.detach()))
    assert len(grads["factorized"]) == len(grads["dense"]) > 2
    assert_close_scaled(grads["factorized"], grads["dense"])


def test_mera_offers_its_factorized_form_when_the_state_above_the_leaves_is_small() -> None:
    small = build(make_spec("mera", (64, 48), 4, bond=2))  # a state of 2^4 values, 1/192 of the weight
    assert small.has_factorized and not all(small.leaf_is_identity)
    layer = GeneratedLinear(small, None)
    with torch.no_grad():
        assert layer.resolve_schedule(1, torch.randn(1, 48)) == "factorized"
    assert not identity_leaf_mera((64, 48)).has_factorized


@pytest.mark.parametrize("arch", ["ttn", "attn", "svd", "mera"])
def test_the_cache_follows_an_optimizer_step(arch: str, monkeypatch) -> None:
    net = generator(arch, LINEAR_SHAPE)
    assert net.has_factorized
    layer = GeneratedLinear(net, None, schedule="factorized")
    x = torch.randn(4, LINEAR_SHAPE[1])
    with torch.no_grad():
        before = layer(x)
        calls = []
        original = type(net).linear_operands if hasattr(type(net), "linear_operands") else None
        if original is not None:
            def counting(self):
                calls.append(1)
                return original(self)
            monkeypatch.setattr(type(net), "linear_operands", counting)
            layer(x)
            layer(x)
            assert calls == []  # built once (in the first forward), reused since
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    (layer(x) ** 2).sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = layer(x)
        expected = F.linear(x, net())
    assert not torch.allclose(after, before)
    assert_close_scaled(after, expected)


def test_building_the_cache_gives_its_temporaries_pages_back(monkeypatch) -> None:
    """The heap is trimmed once when the operands are built, never on a cache hit nor when a
    gradient is wanted (no cache)."""
    import adntn.networks.base as base

    trims = []
    monkeypatch.setattr(base, "trim_heap", lambda: trims.append(1))
    layer = GeneratedLinear(generator("ttn", LINEAR_SHAPE), None, schedule="factorized")
    x = torch.randn(3, LINEAR_SHAPE[1])
    with torch.no_grad():
        layer(x)
        layer(x)
    assert trims == [1]
    layer(x).sum().backward()
    assert trims == [1]


@pytest.mark.parametrize("change", ["copy_", "new data", "double"])
def test_the_cache_follows_a_core_changed_outside_an_optimizer(change: str) -> None:
    """An in-place write (version), a new ``.data`` (pointer) and a cast (dtype) each rebuild the
    cached operands: the factorized map is the dense one of the changed cores."""
    torch.manual_seed(0)
    net = generator("ttn", LINEAR_SHAPE)
    layer = GeneratedLinear(net, None, schedule="factorized")
    x = torch.randn(3, LINEAR_SHAPE[1])
    with torch.no_grad():
        before = layer(x)
        core = net.root
        if change == "copy_":
            core.mul_(2.0)
        elif change == "new data":
            core.data = core.data * 2.0
        else:
            layer.double()
            x = x.double()
        after = layer(x)
        assert_close_scaled(after, F.linear(x, net()))
    assert after.dtype == (torch.float64 if change == "double" else torch.float32)
    if change != "double":
        assert not torch.allclose(after, before)


def identity_leaf_mera(shape: tuple[int, ...]) -> Generator:
    """A MERA whose bonds reach the legs: identity leaves, a state above them as large as the
    weight, so no factorized form."""
    net = build(make_spec("mera", shape, 4, bond=64))
    assert not net.has_factorized
    return net


@pytest.mark.parametrize("arch", [*ARCHS, "mera-identity-leaves"])
def test_auto_picks_a_schedule_from_the_cost(arch: str) -> None:
    net = identity_leaf_mera((64, 48)) if arch == "mera-identity-leaves" else generator(arch, (64, 48))
    layer = GeneratedLinear(net, None)
    x = torch.randn(2, 48)
    with torch.no_grad():
        chosen = layer.resolve_schedule(2, x)
    cost = inference_cost(net, 2)
    assert set(cost) == {"dense", "blocked", "factorized"}
    if arch == "mera-identity-leaves":
        assert cost["factorized"] is None and chosen == "blocked"
        assert layer.resolve_schedule(2, x.requires_grad_()) == "dense"
    else:
        assert chosen == ("factorized" if cost["factorized"]["flops"] < cost["dense"]["flops"] else "blocked")
    one = inference_cost(net, 1)  # the repr states what one row runs, and what that holds and costs
    run = "factorized" if one["factorized"] is not None and one["factorized"]["flops"] < one["dense"]["flops"] else "blocked"
    assert f"schedule=auto, inference={run}, inference_bytes={one[run]['bytes']}," in repr(layer)
    assert f"{one[run]['flops']} flops/sample" in repr(layer)


@settings(max_examples=25, deadline=None)
@given(arch=st.sampled_from(["ttn", "tt"]), rows=st.integers(2, 40), cols=st.integers(2, 40),
       legs=st.sampled_from([2, 4]), bond=st.integers(1, 4), batch=st.integers(1, 5), seed=st.integers(0, 99))
@example(arch="tt", rows=4, cols=33, legs=4, bond=1, batch=1, seed=38)  # outputs 10x smaller than their terms
def test_factorized_equals_dense_on_random_shapes(arch, rows, cols, legs, bond, batch, seed) -> None:
    torch.manual_seed(seed)
    try:
        spec = make_spec(arch, (rows, cols), legs, bond=bond, activation="tanh")
    except Exception:  # a shape too small for that many legs
        return
    net = build(spec)
    x = torch.randn(batch, cols)
    with torch.no_grad():
        weight = net()
        expected, scale = x @ weight.T, product_scale(x, weight)
        assert_close_scaled(net.linear(x), expected, scale=scale)
        assert_close_scaled(net.blocked_linear(x), expected, scale=scale)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5000), cols=st.integers(1, 30000), legs=st.sampled_from([2, 4, 8]),
       min_side=st.integers(1, MIN_BLOCK_SIDE))
def test_oriented_digits_keep_the_legs_and_cost_no_more(rows, cols, legs, min_side) -> None:
    start = choose_leg_factors(rows, cols, legs)
    out_dims, in_dims = oriented_leg_factors(rows, cols, legs, min_side)
    assert [o * i for o, i in zip(out_dims, in_dims)] == [o * i for o, i in zip(*start)]
    assert (math.prod(out_dims), math.prod(in_dims)) == (math.prod(start[0]), math.prod(start[1]))
    m = legs // 2
    assert halves_macs(out_dims, in_dims, m) <= halves_macs(*start, m)
    if (out_dims, in_dims) != start:
        sides = (math.prod(out_dims[:m]), math.prod(in_dims[:m]), math.prod(out_dims[m:]), math.prod(in_dims[m:]))
        assert min(sides) >= min_side


def test_vgg16_fc6_digits_are_oriented_for_the_halves_product() -> None:
    """fc6's blocks go from 64x392 | 64x64 to 16x1568 | 256x16 (4x fewer multiply-adds); fc7's and
    the CIFAR VGG's fc6 (4096x512), already at the 16-digit floor, stay as they were."""
    out_dims, in_dims = oriented_leg_factors(4096, 25088, 8)
    assert halves_macs(out_dims, in_dims, 4) * 4 <= halves_macs(*choose_leg_factors(4096, 25088, 8), 4)
    for shape in ((4096, 4096), (4096, 512)):
        assert oriented_leg_factors(*shape, 8) == choose_leg_factors(*shape, 8)
    assert spec_for_ratio("ttn", (4096, 25088), 2000, "tanh").out_dims == out_dims
    assert spec_for_ratio("tt", (4096, 25088), 2000, "tanh").out_dims == choose_leg_factors(4096, 25088, 8)[0]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 3000), cols=st.integers(1, 3000), legs=st.sampled_from([2, 4, 8]),
       bond=st.integers(1, 6), rank=st.integers(0, 2))
def test_attn_placement_keeps_the_tree_and_costs_less(rows, cols, legs, bond, rank) -> None:
    """``ATTN.placed`` keeps every leg's dim, the padded shape and the parameters; where it moves
    digits, the factorized forward costs at least PLACEMENT_GAIN less (``forward_cost``), its
    multiply-adds (``forward_macs``) are the built layer's ``linear_macs``, and no half's block
    gets thinner than the floor."""
    from adntn.networks import attn
    from adntn.networks.ttn import tree_bonds

    base = attn.ATTN.make_spec((rows, cols), (bond,) * attn.ATTN.levels(legs), "tanh", legs)
    base = replace(base, mix_ranks=(rank,) * len(base.disentangler_ranks))
    spec = attn.ATTN.placed(base)
    assert spec.leg_dims == base.leg_dims and spec.core_params == base.core_params
    assert (math.prod(spec.out_dims), math.prod(spec.in_dims)) == (math.prod(base.out_dims), math.prod(base.in_dims))
    if spec == base:
        return
    chi, m = tree_bonds(base)[-1][1], legs // 2
    assert rank > 0 and legs > 2
    assert attn.forward_cost(spec, chi, rank) <= (1 - attn.PLACEMENT_GAIN) * attn.forward_cost(base, chi, rank)

    def side(s):
        return min(math.prod(s.out_dims[:m]), math.prod(s.in_dims[:m]), math.prod(s.out_dims[m:]), math.prod(s.in_dims[m:]))

    assert side(spec) >= min(MIN_BLOCK_SIDE, side(base))
    net = build(spec)
    for batch in (1, 7):
        assert net.linear_macs(batch) == attn.forward_macs(spec, chi, rank, batch)


@pytest.mark.parametrize("shape, legs", [((64, 64), 4), ((48, 160), 8), ((60, 90), 4)])
def test_factorized_equals_dense_on_placed_digits(shape, legs) -> None:
    """aTTN specs whose digits ``placed`` moved: the factorized map and its gradients are the dense
    layer's."""
    from adntn.networks.attn import ATTN

    base = ATTN.make_spec(shape, (3,) * ATTN.levels(legs), "tanh", legs)
    spec = ATTN.placed(base)
    assert (spec.out_dims, spec.in_dims) != (base.out_dims, base.in_dims)
    torch.manual_seed(0)
    net = build(spec)
    perturb_mixers(net)
    x = torch.randn(5, shape[1], requires_grad=True)
    with torch.no_grad():
        assert_close_scaled(net.linear(x), x @ net().T)
    grads = torch.autograd.grad(net.linear(x).square().sum(), [x, *net.parameters()])
    dense = torch.autograd.grad((x @ net().T).square().sum(), [x, *net.parameters()])
    assert_close_scaled(grads, dense)


def test_vgg16_attn_digits_are_placed_for_the_middle_correction() -> None:
    """fc7 and fc6 at 2,000x and fc6 at 50,000x (a middle disentangler each), against the halves'
    own digits: ``forward_cost`` falls by half or more, the multiply-adds rise at no batch, and at
    batch 1 the forward copies at least 10x fewer values (fc6 at 2,000x: 11 K against 683 K, a
    whole half of the weight's factors); fc7 at 50,000x (no middle disentangler) keeps the
    halves' digits."""
    from adntn.networks import attn

    for shape, ratio in (((4096, 4096), 2000), ((4096, 25088), 2000), ((4096, 25088), 50000)):
        spec = spec_for_ratio("attn", shape, ratio, "tanh")
        out_dims, in_dims = oriented_leg_factors(*shape, spec.n_legs)
        halves_only = replace(spec, out_dims=out_dims, in_dims=in_dims)
        net = build(spec)
        chi, rank = net._digit_sizes()[4], net.middle.p.shape[1]
        assert 2 * attn.forward_cost(spec, chi, rank) <= attn.forward_cost(halves_only, chi, rank), (shape, ratio)
        for batch in (1, 32, 256):
            assert attn.forward_macs(spec, chi, rank, batch) <= attn.forward_macs(halves_only, chi, rank, batch)
        assert 10 * attn.forward_copies(spec, chi, rank, 1) <= attn.forward_copies(halves_only, chi, rank, 1)
        assert attn.forward_macs(spec, chi, rank, 256) == net.linear_macs(256)  # the fold's rule included
    spec = spec_for_ratio("attn", (4096, 4096), 50000, "tanh")
    assert spec.out_dims == oriented_leg_factors(4096, 4096, spec.n_legs)[0]


@pytest.mark.parametrize("arch", ["ttn", "attn"])
@pytest.mark.parametrize("shape", [(48, 160), (64, 36)])
def test_factorized_equals_dense_on_oriented_digits(arch, shape) -> None:
    """A spec whose digits were moved between the halves (at a floor of 2, so small shapes move):
    the factorized product and its gradients are the dense layer's."""
    base = make_spec(arch, shape, 4, bond=3, activation="tanh")
    out_dims, in_dims = oriented_leg_factors(*shape, 4, min_side=2)
    assert (out_dims, in_dims) != (base.out_dims, base.in_dims)
    torch.manual_seed(0)
    net = build(replace(base, out_dims=out_dims, in_dims=in_dims))
    perturb_mixers(net)
    x = torch.randn(5, shape[1], requires_grad=True)
    weight = net()
    expected = x @ weight.T
    (expected.square().sum()).backward()
    dense_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    actual = net.linear(x)
    assert_close_scaled(actual, expected, scale=product_scale(x, weight))
    actual.square().sum().backward()
    for got, want in zip((p.grad for p in net.parameters()), dense_grads):
        assert_close_scaled(got, want)


def tt_plans(net) -> list:
    """Every grouping ``TT.linear`` may take: cuts m1 <= m2, both orders."""
    spec, n_legs = net.spec, len(net.spec.leg_dims)
    return [TTPlan(m1, m2, order, (math.prod(spec.out_dims[:m1]), math.prod(spec.in_dims[:m1]),
                                   math.prod(spec.out_dims[m1:m2]), math.prod(spec.in_dims[m1:m2]),
                                   math.prod(spec.out_dims[m2:]), math.prod(spec.in_dims[m2:]),
                                   net.ranks[m1], net.ranks[m2]))
            for m1 in range(1, n_legs) for m2 in range(m1, n_legs) for order in ("left", "right")]


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(2, 30), cols=st.integers(2, 30), bond=st.integers(1, 4), batch=st.integers(1, 4),
       seed=st.integers(0, 99))
def test_tt_linear_is_x_times_the_weight_in_every_grouping(rows, cols, bond, batch, seed) -> None:
    """Whichever cuts and order the plan takes, the three groups' product is x W^T (padded
    shapes included), with the dense form's gradients wrt x and every core."""
    torch.manual_seed(seed)
    try:
        net = build(make_spec("tt", (rows, cols), 4, bond=bond))
    except Exception:  # a shape too small for that many legs
        return
    x = torch.randn(batch, cols, requires_grad=True)
    probe = torch.randn(batch, rows)
    weight = net()
    weight_grads = torch.autograd.grad(((x @ weight.T) * probe).sum(), [x, *net.cores])
    expected, scale = (x @ weight.T).detach(), product_scale(x.detach(), weight.detach())
    for plan in tt_plans(net):
        net.linear_plan = plan
        out = net.linear(x)
        assert_close_scaled(out.detach(), expected, scale=scale)
        for actual, wanted in zip(torch.autograd.grad((out * probe).sum(), [x, *net.cores]), weight_grads):
            assert_close_scaled(actual, wanted)


def test_tt_plan_on_vgg16_fc6_beats_the_halves_and_stays_small():
    """VGG-16's fc6 at 2,000x: the plan needs half the multiply-adds of the two halves at the
    fit's split and holds under 1% of the dense weight's values; no batched GEMM it chose is
    narrower than GEMM_FULL_WIDTH (the choice that ran 2.6x slower on fc7 had 8 columns)."""
    net = build(spec_for_ratio("tt", (4096, 25088), 2000, "none"))
    plan = net.linear_plan
    assert (plan.m1, plan.m2, plan.order) == (3, 4, "left")
    assert plan == min(tt_plans(net), key=lambda p: p.cost_per_row())
    halves = [p for p in tt_plans(net) if p.m1 == p.m2 == net.split and p.order == net.linear_order][0]
    assert net.linear_macs(1) == plan.macs_per_row() < 0.51 * halves.macs_per_row()
    assert net.linear_state_bytes() < 0.01 * 4 * 4096 * 25088
    assert all(width is None or width >= GEMM_FULL_WIDTH for _, width in plan._steps())


def test_a_generated_layer_moves_and_casts_like_any_module():
    """nn.Module's own methods (.to, .cpu, .double: nn.Module._apply) are not shadowed."""
    torch.manual_seed(0)
    layer = GeneratedLinear(build(spec_for_bond_dim("ttn", (12, 8), 2, "tanh")), torch.zeros(12)).cpu().double()
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    assert layer(torch.randn(3, 8, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("mix_ranks", [(0, 0, 0), (1, 0, 2), (0, 1, 0), (1, 0, 0)])
def test_attn_with_some_disentanglers_has_the_dense_layers_factorized_map(mix_ranks) -> None:
    """A budget may give disentanglers to some pairs only (0: none): the factorized linear map, the
    row blocks and the weight still agree (the middle pair is k = 3 of 8 legs)."""
    from dataclasses import replace

    torch.manual_seed(0)
    net = build(replace(make_spec("attn", LINEAR_SHAPE, 8), mix_ranks=mix_ranks))
    perturb_mixers(net)
    assert (net.middle is not None) == (mix_ranks[1] > 0)
    x = torch.randn(5, LINEAR_SHAPE[1])
    with torch.no_grad():
        weight = net()
        assert_close_scaled(net.linear(x), x @ weight.T, scale=product_scale(x, weight))
        assert_close_scaled(torch.cat([b.reshape(-1, LINEAR_SHAPE[1]).clone() for b in net.row_blocks()]), weight)  # reused buffers


@pytest.mark.parametrize("shape, order, fold", [((53, 30), "left", "right"), ((64, 64), "right", "left"),
                                                ((16, 256), "left", "left"), ((40, 128), "right", "right"),
                                                ((53, 30), "left", None), ((64, 64), "right", None)])
def test_attn_middle_correction_reads_the_main_operands(shape, order, fold, monkeypatch) -> None:
    """Q is folded into the smaller half (or, where that would not fit, kept apart) and the halves
    are read from the main GEMM operands, for both contraction orders and both folds: the
    factorized map and its gradients equal the dense layer's, and the cache holds exactly
    ``linear_state_bytes`` beyond the cores."""
    from adntn.networks import attn

    monkeypatch.setattr(attn, "FOLD_SHARE", float("inf") if fold else 0.0)
    torch.manual_seed(0)
    n_legs = default_legs(*shape, "attn")
    net = build(attn.ATTN.make_spec(shape, (2,) * attn.ATTN.levels(n_legs), "tanh", n_legs))  # digits not ``placed``
    perturb_mixers(net)
    assert (net.linear_order, net._middle_fold()) == (order, fold)
    x = torch.randn(6, shape[1], requires_grad=True)
    with torch.no_grad():
        assert_close_scaled(net.linear(x), x @ net().T)
        ops = net.cached("linear", net.linear_operands)
    cores = {p.untyped_storage().data_ptr() for p in net.parameters()}
    tensors = [t for t in (ops["a"], ops["b"], *ops["middle"][1])]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                if t.untyped_storage().data_ptr() not in cores}
    assert sum(storages.values()) == net.linear_state_bytes()
    grads = torch.autograd.grad(net.linear(x).square().sum(), [x, *net.parameters()])
    dense = torch.autograd.grad((x @ net().T).square().sum(), [x, *net.parameters()])
    assert_close_scaled(grads, dense)


@pytest.mark.parametrize("shape, folds", [((4096, 4096), False), ((4096, 25088), True)])
def test_attn_holds_under_one_percent_of_vgg_weights_at_2000x(shape, folds) -> None:
    """VGG's fc7 (4096x4096) and fc6 (4096x25088) at 2,000x: the cores and the operands aTTN caches
    for its factorized map stay within 1% of the dense weight's bytes; fc6 has room for the folded
    half (Q in it), fc7 does not and keeps Q apart."""
    net = build(spec_for_ratio("attn", shape, 2000, "tanh"))
    assert net.middle is not None
    assert (net._middle_fold() is not None) == folds
    cores = sum(4 * p.numel() for p in net.parameters())
    assert cores + net.linear_state_bytes() <= 0.01 * 4 * net.spec.dense_params


def test_auto_choice_is_remembered_per_batch_and_follows_a_new_generator() -> None:
    """``auto`` remembers its choice per batch size for the generator it holds; a generator put in
    its place is costed afresh (here one without a factorized form: blocked)."""
    layer = GeneratedLinear(generator("ttn", LINEAR_SHAPE), None).eval()
    x = torch.randn(2, LINEAR_SHAPE[1])
    with torch.no_grad():
        first = layer.resolve_schedule(2, x)
        cost = inference_cost(layer.generator, 2)
        assert first == ("factorized" if cost["factorized"]["flops"] < cost["dense"]["flops"] else "blocked")
        assert layer.resolve_schedule(2, x) == first
        layer.generator = identity_leaf_mera(LINEAR_SHAPE)
        assert layer.resolve_schedule(2, x) == "blocked"
