"""The generators: parameter counts, shapes, the fast paths against plain reference contractions,
SVD-based initialisation (exact where the format can represent the target) and gradients."""

from __future__ import annotations

import contextlib
import json

import math
from dataclasses import replace
from itertools import count

import opt_einsum
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from adntn.errors import AdntnError
from adntn.memory import memory_policy
from adntn.networks import GENERATORS, build, core_params
from adntn.networks.attn import ATTN
from adntn.networks.base import (INIT_PREACTIVATION, Disentangler, low_rank_update, scaled_squared_distance,
                                 sigma_mix_distance, tanh_by_sigmoid)
from adntn.networks.mera import MERA
from adntn.networks.svd import SVD
from adntn.networks.tt import TT, tt_ranks
from adntn.networks.ttn import TTN
from adntn.core.spec import GeneratorSpec
from adntn.core.tensorize import choose_leg_factors, legs_to_weight, weight_to_legs
from tolerances import assert_close_scaled

SHAPES = [(8, 3, 3, 3), (10, 64), (64, 48), (13, 34)]  # (13, 34): prime rows, padded
TREES = ("ttn", "attn", "mera")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_spec(arch: str, shape: tuple[int, ...], n_legs: int = 4, bond: int = 3,
              activation: str = "tanh", mix_rank: int = 2) -> GeneratorSpec:
    rows, cols = shape[0], math.prod(shape[1:])
    if arch == "svd":
        return GeneratorSpec("svd", shape, (rows,), (cols,), (bond,), "none")
    out_dims, in_dims = choose_leg_factors(rows, cols, n_legs)
    if arch == "tt":
        return GeneratorSpec("tt", shape, out_dims, in_dims, (bond,) * (n_legs - 1), "none")
    return GeneratorSpec(arch, shape, out_dims, in_dims, (bond,) * int(math.log2(n_legs)), activation,
                         mix_rank=mix_rank if arch in ("attn", "mera") else 0)


def perturb_mixers(net: torch.nn.Module, scale: float = 0.3) -> None:
    """Move every disentangler off the identity (they start with P = 0)."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, Disentangler):
                module.p.normal_(0, scale / math.sqrt(module.p.shape[0]))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def all_specs():
    for shape in SHAPES:
        for n_legs, activation in ((2, "tanh"), (4, "gelu"), (8, "relu"), (4, "none")):
            for arch in ("ttn", "attn", "mera", "tt"):
                yield make_spec(arch, shape, n_legs, activation=activation)
        yield make_spec("svd", shape)
        for arch in ("attn", "mera"):  # disentanglers on some pairs only, of their own ranks
            spec = make_spec(arch, shape, 8, activation="tanh")
            count = len(GENERATORS[arch].disentangler_dims(spec))
            yield replace(spec, mix_ranks=tuple((0, 1, 2)[i % 3] for i in range(count)))
            yield replace(spec, mix_ranks=(0,) * count)


# ----------------------------------------------------------------------------- structure

@pytest.mark.parametrize("spec", list(all_specs()), ids=lambda s: f"{s.arch}-{s.shape}-{s.n_legs}-{s.activation}")
def test_counts_shapes_and_forward_matches_legs(spec: GeneratorSpec) -> None:
    torch.manual_seed(0)
    net = build(spec)
    perturb_mixers(net)
    assert type(net) is GENERATORS[spec.arch]
    assert sum(p.numel() for p in net.parameters()) == net.param_count(spec) == core_params(spec)
    weight = net()
    assert weight.shape == spec.shape
    with torch.no_grad():
        legs = net.legs()
        if spec.arch == "svd":
            assert legs.shape == (spec.rows, spec.cols)
            assert_close_scaled(weight, legs.reshape(spec.shape))
        else:
            assert legs.shape == spec.leg_dims
            assert_close_scaled(weight, legs_to_weight(legs, spec.out_dims, spec.in_dims, spec.shape))


@pytest.mark.parametrize("arch", ["ttn", "attn", "mera", "tt", "svd"])
@pytest.mark.parametrize("shape", [(64, 48), (53, 30)])
def test_inference_forward_and_out_equal_the_autograd_forward(arch: str, shape: tuple, ) -> None:
    """Without autograd the tree generators write the weight by their own schedule, into ``out``
    when given (the same storage comes back): the same values as the autograd forward."""
    torch.manual_seed(0)
    net = build(make_spec(arch, shape, 4))
    perturb_mixers(net)
    expected = net()
    out = torch.full(expected.shape, float("nan"))
    with torch.no_grad():
        assert_close_scaled(net(), expected)
        written = net(out=out)
    assert written.data_ptr() == out.data_ptr()
    assert_close_scaled(out, expected)
    with pytest.raises(ValueError, match="contiguous tensor of shape") if arch in ("ttn", "attn", "tt") \
            else contextlib.nullcontext():
        net(out=torch.empty(expected.shape[::-1]).T)


@pytest.mark.parametrize("shape", [(64, 48), (53, 30), (16, 4, 3, 3)])
@pytest.mark.parametrize("n_legs, bond", [(4, 3), (4, 64), (8, 64), (2, 64)])
@pytest.mark.parametrize("batch", [1, 5])
def test_mera_blocked_linear_is_x_times_the_weight(shape: tuple, n_legs: int, bond: int, batch: int) -> None:
    """One value of leg 0 at a time (identity or matrix leaf 0, padded rows and columns, a
    convolution's unfolded input): x W^T of the generated weight."""
    torch.manual_seed(0)
    net = build(make_spec("mera", shape, n_legs, bond=bond, mix_rank=1))
    perturb_mixers(net)
    with torch.no_grad():
        for site in net.activations:
            site.log_gain.fill_(0.5)
        weight = net().reshape(shape[0], -1)
        x = torch.randn(batch, 2, weight.shape[1])
        assert_close_scaled(net.blocked_linear(x), x @ weight.T)


def active_mera(spec: GeneratorSpec, active: tuple) -> MERA:
    """A MERA of ``spec`` whose disentanglers ``active`` (in the spec's order) have rank 1 and
    the others rank 0, off the identity, gains off 1 (seed 0)."""
    ranks = tuple(1 if i in active else 0 for i in range(len(spec.disentangler_ranks)))
    torch.manual_seed(0)
    net = build(replace(spec, mix_ranks=ranks))
    perturb_mixers(net)
    with torch.no_grad():
        for site in net.activations:
            site.log_gain.fill_(0.5)
    return net


@pytest.mark.parametrize("shape", [(64, 48), (53, 30), (16, 4, 3, 3)])
@pytest.mark.parametrize("n_legs, active", [(2, ()), (4, ()), (8, ()), (8, (1,)), (8, (2,)), (8, (3,)), (16, ())])
@pytest.mark.parametrize("batch", [1, 5])
def test_mera_blocked_tiles_fix_the_free_end_legs_and_give_x_times_the_weight(
        shape: tuple, n_legs: int, active: tuple, batch: int) -> None:
    """With small blocks, tiles fix leg 1 and the last legs too, where no disentangler
    touches them (identity leaves: bond 64; ``active``: the disentanglers with rank 1, in the
    spec's order): x W^T still, for padded and convolution shapes; the tile legs are exactly the
    free ones the order 1, K-1, K-2 reaches, and ``block_values`` shrinks with the tile."""
    net = active_mera(make_spec("mera", shape, n_legs, bond=64, mix_rank=1), active)
    with torch.no_grad():
        weight = net().reshape(shape[0], -1)
        x = torch.randn(batch, weight.shape[1])
        whole = net.block_values()
        with memory_policy(block_bytes=4, cache_bytes=4):
            head, tail = net._tile_legs()
            touched = {leg for level in net.pairs[:2] for k in level for leg in (k, k + 1)}
            expected_head = (0, 1) if n_legs > 2 and 1 not in touched else (0,)
            expected_tail: tuple[int, ...] = ()
            for k in (n_legs - 1, n_legs - 2):
                if (len(expected_head) + len(expected_tail) + 1 < n_legs and k not in touched
                        and (k == n_legs - 1 or expected_tail)):
                    expected_tail = (k, *expected_tail)
            assert (head, tail) == (expected_head, expected_tail)
            assert net.block_values() <= whole
            assert_close_scaled(net.blocked_linear(x), x @ weight.T)


@pytest.mark.parametrize("cache_bytes, head", [(1 << 20, (0,)), (4, (0, 1))])
def test_mera_tiles_fix_leg_1_beyond_a_cache_block_and_the_tail_beyond_a_streamed_block(cache_bytes, head) -> None:
    """Leg 1 is fixed once a tile of leg 0 holds more than one cache block, the end legs only
    beyond a streamed block: here the streamed block holds a tile of leg 0 (64 x 48 / 4 values)."""
    net = active_mera(make_spec("mera", (64, 48), 8, bond=64, mix_rank=1), ())
    with torch.no_grad():
        weight = net()
        x = torch.randn(3, 48)
        with memory_policy(block_bytes=4 * 64 * 48, cache_bytes=cache_bytes):
            assert net._tile_legs() == (head, ())
            assert_close_scaled(net.blocked_linear(x), x @ weight.T)


@pytest.mark.parametrize("n_legs, active", [(2, ()), (4, ()), (8, ()), (8, (1,)), (8, (3,)), (16, ())])
@pytest.mark.parametrize("bond", [2, 64])
def test_mera_weight_written_in_tiles_is_the_autograd_weight(n_legs: int, active: tuple, bond: int) -> None:
    """Without autograd the weight is written a tile at a time into its strided blocks of
    ``out``: with a small streamed block (tiles fixing leg 0, leg 1 and the free end legs; a
    matrix leaf 0 at bond 2) it equals the autograd forward, and ``out`` is the tensor returned."""
    net = active_mera(make_spec("mera", (64, 48), n_legs, bond=bond, mix_rank=1), active)
    expected = net().detach()
    out = torch.full(expected.shape, float("nan"))
    with torch.no_grad(), memory_policy(block_bytes=4, cache_bytes=4):
        assert net(out=out).data_ptr() == out.data_ptr()
    assert_close_scaled(out, expected)


@pytest.mark.parametrize("leg_1_mixed", [False, True])
def test_mera_blocked_tiles_with_matrix_leaves_cut_legs_0_and_1_through_their_rows(leg_1_mixed: bool) -> None:
    """Matrix leaves are cut through their rows, the state above the leaves shared by every tile:
    leg 0 and, unless a physical disentangler acts on it, leg 1, however small the block; no
    other leg. The product is still x W^T and the weight written in tiles the weight."""
    spec = make_spec("mera", (64, 48), 8, bond=2, mix_rank=1)
    net = active_mera(spec, (0,) if leg_1_mixed else (1,))  # the physical pair (1, 2), or (3, 4)
    with torch.no_grad():
        assert not net.leaf_is_identity[0] and not net.leaf_is_identity[1]
        weight = net()
        x = torch.randn(3, 48)
        with memory_policy(block_bytes=4):
            assert net._tile_legs() == (((0,) if leg_1_mixed else (0, 1)), ())
            assert_close_scaled(net.blocked_linear(x), x @ weight.T)
            out = torch.full(weight.shape, float("nan"))
            assert_close_scaled(net(out=out), weight)


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu"])
@pytest.mark.parametrize("n_legs, bond", [(2, 64), (4, 3), (4, 64), (8, 64)])
def test_mera_inference_paths_equal_autograd_and_leave_the_cores_alone(activation: str, n_legs: int,
                                                                       bond: int) -> None:
    """Without autograd MERA overwrites its own states (disentanglers, sigma in place) and writes
    the last layer's scale with the permutation into weight order: same values as the autograd
    forward, whether the leaves are identities (bond 64: the scale is left to that write) or
    matrices, with one level or more; and no core is overwritten."""
    torch.manual_seed(0)
    net = build(make_spec("mera", (64, 48), n_legs, bond=bond, activation=activation, mix_rank=1))
    perturb_mixers(net)
    with torch.no_grad():
        for site in net.activations:
            site.log_gain.fill_(0.5)
    before = [p.detach().clone() for p in net.parameters()]
    expected = net().detach()
    with torch.no_grad():
        assert_close_scaled(net(), expected)
        assert_close_scaled(net.legs(), weight_to_legs(expected, net.spec.out_dims, net.spec.in_dims))
        assert_close_scaled(torch.cat([block.clone() for block in net.row_blocks()]), expected)
        with pytest.raises(ValueError, match="contiguous tensor of shape"):
            net(out=torch.empty(expected.shape[::-1]).T)
    for b, p in zip(before, net.parameters()):
        assert torch.equal(b, p)


def test_materialize_runs_the_generator_without_autograd() -> None:
    """expand and the reported errors generate weights without a graph (the inference schedules)."""
    from adntn.io.archive import materialize

    torch.manual_seed(0)
    net = build(make_spec("ttn", (64, 48), 4))
    grad_modes = []
    net.register_forward_hook(lambda module, args, output: grad_modes.append(torch.is_grad_enabled()))
    weight = materialize(net, torch.float64)
    assert grad_modes == [False] and weight.dtype == torch.float64 and not weight.requires_grad
    torch.testing.assert_close(weight, net().detach().double())


def test_param_counts_by_formula() -> None:
    spec = make_spec("ttn", (64, 48), 8, bond=2)
    dims, tree = spec.leg_dims, TTN.param_count(spec)
    assert ATTN.param_count(replace(spec, arch="attn", mix_rank=3)) == tree + sum(
        2 * dims[k] * dims[k + 1] * 3 for k in (1, 3, 5))
    # MERA: the physical pairs as in the aTTN, plus one disentangler per pair of neighbouring legs
    # with different parents: legs 1-2, 3-4, 5-6 of bonds[0] and 1-2 of bonds[1], all bonds 2.
    assert MERA.param_count(replace(spec, arch="mera", mix_rank=3)) == tree + sum(
        2 * dims[k] * dims[k + 1] * 3 for k in (1, 3, 5)) + 4 * (2 * 4 * 3)
    assert SVD.param_count(make_spec("svd", (64, 48), bond=5)) == 5 * (64 + 48)
    # per-disentangler ranks: 0 is none, so all zeros is the TTN itself
    attn = replace(spec, arch="attn", mix_rank=1, mix_ranks=(0, 2, 0))
    assert ATTN.param_count(attn) == tree + 2 * dims[3] * dims[4] * 2
    assert ATTN.param_count(replace(attn, mix_ranks=(0, 0, 0))) == tree
    mera = replace(spec, arch="mera", mix_rank=1, mix_ranks=(0,) * 7)
    assert MERA.param_count(mera) == tree == MERA.param_count(replace(mera, mix_ranks=(0,) * 6 + (1,))) - 2 * 4


def test_mix_ranks_round_trip_and_old_specs_load() -> None:
    spec = replace(make_spec("attn", (64, 48), 8, bond=2), mix_ranks=(0, 1, 0))
    assert GeneratorSpec.from_json(spec.to_json()) == spec
    old = json.loads(spec.to_json())
    del old["mix_ranks"]  # an archive written before the field existed: every pair at mix_rank
    loaded = GeneratorSpec.from_json(json.dumps(old))
    assert loaded.mix_ranks is None and loaded.disentangler_ranks == (2, 2, 2)
    with pytest.raises(ValueError, match="mix_ranks has 2 values for 3 disentanglers"):
        replace(spec, mix_ranks=(1, 1))


def test_tt_ranks_are_capped() -> None:
    spec = GeneratorSpec("tt", (4, 6), (2, 2), (2, 3), (100,), "none")  # legs 4 and 6
    assert tt_ranks(spec) == [1, 4, 1]
    spec = GeneratorSpec("tt", (8, 8), (2, 2, 2), (2, 2, 2), (100, 2), "none")
    assert tt_ranks(spec) == [1, 4, 2, 1]
    with pytest.raises(AdntnError):
        TT(replace(spec, bond_dims=(3,)))
    with pytest.raises(AdntnError):
        SVD(GeneratorSpec("svd", (10, 64), (2, 5), (8, 8), (3,), "none"))


# ----------------------------------------------------------------------------- references

def tree_einsum(net: TTN) -> torch.Tensor:
    """The linear TTN as one einsum over all its cores, the equation built from the tree."""
    symbols = (opt_einsum.get_symbol(i) for i in count())
    physical = [next(symbols) for _ in net.spec.leg_dims]
    terms, operands, below = [], [], []
    leaves = iter(net.leaves)
    for p, identity in zip(physical, net.leaf_is_identity):
        if identity:
            below.append(p)
        else:
            below.append(next(symbols))
            terms.append(p + below[-1])
            operands.append(next(leaves))
    cores = iter(net.nodes)
    for _ in range(1, net.levels):
        above = [next(symbols) for _ in range(len(below) // 2)]
        for j, c in enumerate(above):
            terms.append(below[2 * j] + below[2 * j + 1] + c)
            operands.append(next(cores))
        below = above
    terms.append(below[0] + below[1])
    operands.append(net.root)
    return opt_einsum.contract(",".join(terms) + "->" + "".join(physical), *operands)


def mix_reference(mixer: Disentangler, state: torch.Tensor, k: int) -> torch.Tensor:
    """Disentangler on legs (k, k+1) of ``state``: merge the two axes, apply, un-merge."""
    dims = state.shape
    view = state.reshape(math.prod(dims[:k]), dims[k] * dims[k + 1], -1)
    coeff = torch.einsum("pdq,dr->prq", view, mixer.q)
    return (view + torch.einsum("prq,dr->pdq", coeff, mixer.p)).reshape(dims)


def attn_reference(net: ATTN) -> torch.Tensor:
    legs = net.tree.legs()
    for k, mixer in zip(net.pairs, net.mixers):
        legs = mix_reference(mixer, legs, k)
    return legs


def mera_reference(net: MERA) -> torch.Tensor:
    """Top-down, one tensordot per isometry and leaf, the disentanglers applied as modules."""
    state, nodes = net.root, list(net.nodes)
    first = len(nodes)
    for h in range(net.levels - 1, 0, -1):
        first -= len(net.bonds[h])
        for j, core in enumerate(nodes[first:first + len(net.bonds[h])]):
            state = torch.tensordot(state, core, dims=([2 * j], [2])).movedim((-2, -1), (2 * j, 2 * j + 1))
        for k, mixer in zip(net.pairs[h], net.mixers[h]):
            state = mix_reference(mixer, state, k)
        if len(net.activations):
            state = net.activations[h - 1](state)
    leaves = iter(net.leaves)
    for k, identity in enumerate(net.leaf_is_identity):
        if not identity:
            state = torch.tensordot(state, next(leaves), dims=([k], [1])).movedim(-1, k)
    for k, mixer in zip(net.pairs[0], net.mixers[0]):
        state = mix_reference(mixer, state, k)
    return state


def tt_reference(net: TT) -> torch.Tensor:
    state = torch.ones(1, 1, dtype=net.cores[0].dtype)
    for core in net.cores:
        state = torch.tensordot(state, core, dims=([-1], [0]))
    return state.reshape(net.spec.leg_dims)


@st.composite
def tree_specs(draw, arch: str = "ttn", activation: str | None = None) -> GeneratorSpec:
    n_legs = draw(st.sampled_from([2, 4, 8]))
    out_dims = tuple(draw(st.lists(st.integers(1, 3), min_size=n_legs, max_size=n_legs)))
    in_dims = tuple(draw(st.lists(st.integers(1, 3), min_size=n_legs, max_size=n_legs)))
    levels = int(math.log2(n_legs))
    bonds = tuple(draw(st.lists(st.integers(1, 5), min_size=levels, max_size=levels)))
    rows, cols = math.prod(out_dims), math.prod(in_dims)
    shape = (draw(st.integers(1, rows)), draw(st.integers(1, cols)))
    activation = activation or draw(st.sampled_from(["none", "tanh", "gelu", "relu"]))
    spec = GeneratorSpec(arch, shape, out_dims, in_dims, bonds, activation,
                         mix_rank=draw(st.integers(1, 2)) if arch in ("attn", "mera") else 0)
    if arch in ("attn", "mera") and draw(st.booleans()):  # each disentangler its own rank, 0: none
        count = len(GENERATORS[arch].disentangler_dims(spec))
        spec = replace(spec, mix_ranks=tuple(draw(st.lists(st.integers(0, 2), min_size=count, max_size=count))))
    return spec


@settings(max_examples=25, deadline=None)
@given(spec=tree_specs(activation="none"), seed=st.integers(0, 2**16))
def test_linear_ttn_is_the_tree_einsum(spec: GeneratorSpec, seed: int) -> None:
    torch.manual_seed(seed)
    net = TTN(spec).double()
    with torch.no_grad():
        torch.testing.assert_close(net.legs(), tree_einsum(net))


@settings(max_examples=25, deadline=None)
@given(spec=tree_specs(), seed=st.integers(0, 2**16))
def test_ttn_forward_is_legs_to_weight(spec: GeneratorSpec, seed: int) -> None:
    torch.manual_seed(seed)
    net = TTN(spec).double()
    with torch.no_grad():
        expected = legs_to_weight(net.legs(), spec.out_dims, spec.in_dims, spec.shape)
        torch.testing.assert_close(net(), expected, rtol=1e-12, atol=1e-14)


@settings(max_examples=20, deadline=None)
@given(spec=tree_specs("attn"), seed=st.integers(0, 2**16))
@example(spec=GeneratorSpec(arch="attn", shape=(12, 1), out_dims=(2, 2, 1, 3), in_dims=(1, 1, 1, 1), bond_dims=(1, 1),
                            activation="none", mix_rank=1), seed=0)  # four row blocks in two buffers
def test_attn_matches_disentanglers_applied_to_the_ttn(spec: GeneratorSpec, seed: int) -> None:
    torch.manual_seed(seed)
    net = ATTN(spec).double()
    perturb_mixers(net)
    reference = attn_reference(net)
    torch.testing.assert_close(net.legs(), reference)
    weight = legs_to_weight(reference, spec.out_dims, spec.in_dims, spec.shape)
    torch.testing.assert_close(net(), weight)
    with torch.no_grad():  # the correction added to each piece of the product as it is made
        torch.testing.assert_close(net(), weight)
        # a block may be a reused buffer, valid until the next-but-one: copied as it comes
        torch.testing.assert_close(torch.cat([block.clone() for block in net.row_blocks()]), weight)


@settings(max_examples=20, deadline=None)
@given(spec=tree_specs("mera"), seed=st.integers(0, 2**16))
def test_mera_matches_the_plain_top_down_contraction(spec: GeneratorSpec, seed: int) -> None:
    net = perturbed_mera(spec, seed)
    with torch.no_grad():
        torch.testing.assert_close(net.legs(), mera_reference(net))


def perturbed_mera(spec: GeneratorSpec, seed: int) -> MERA:
    """A float64 MERA of ``spec`` with disentanglers off the identity and gains off 1."""
    torch.manual_seed(seed)
    net = MERA(spec).double()
    perturb_mixers(net)
    with torch.no_grad():
        for site in net.activations:
            site.log_gain.fill_(0.5)
    return net


@settings(max_examples=20, deadline=None)
@given(spec=tree_specs("mera"), seed=st.integers(0, 2**16))
def test_mera_gradients_match_the_plain_top_down_contraction(spec: GeneratorSpec, seed: int) -> None:
    """Gradients through the chain of GEMMs, the disentanglers and the gains equal the reference's."""
    net = perturbed_mera(spec, seed)
    probe = torch.randn(spec.leg_dims, dtype=torch.float64)
    params = [p for p in net.parameters() if p.requires_grad]
    mine = torch.autograd.grad((net.legs() * probe).sum(), params, allow_unused=True)
    reference = torch.autograd.grad((mera_reference(net) * probe).sum(), params, allow_unused=True)
    for got, expected in zip(mine, reference):
        if expected is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("bond", [4, 2])
def test_mera_with_identity_leaves_matches_the_reference(bond: int) -> None:
    """Legs (4, 4, 2, 2, 4, 2, 3, 2). bond 4: every leaf is the identity (the physical disentanglers
    stay low-rank); bond 2: the legs of dim 2 are, so every pair mixes a dense and an identity leaf.
    The gains are not 1: the last layer's 1 / (a sigma'(0)) is folded into a leaf group, or with
    no dense group left applied to the state."""
    torch.manual_seed(12)
    spec = GeneratorSpec("mera", (64, 48), (2, 2, 2, 2, 2, 2, 1, 1), (2, 2, 1, 1, 2, 1, 3, 2), (bond, 6, 3),
                         "gelu", mix_rank=2)
    net = MERA(spec).double()
    perturb_mixers(net)
    with torch.no_grad():
        for h, site in enumerate(net.activations):
            site.log_gain.fill_(0.4 - 0.7 * h)
    assert all(net.leaf_is_identity) == (bond == 4) and any(net.leaf_is_identity)
    torch.testing.assert_close(net.legs(), mera_reference(net))


@settings(max_examples=20, deadline=None)
@given(spec=tree_specs("mera", activation="none"), seed=st.integers(0, 2**16))
def test_linear_mera_with_identity_disentanglers_is_the_ttn(spec: GeneratorSpec, seed: int) -> None:
    torch.manual_seed(seed)
    mera = MERA(spec).double()
    tree = TTN(replace(spec, arch="ttn", mix_rank=0, mix_ranks=None)).double()
    tree.load_state_dict({name: value for name, value in mera.state_dict().items() if name in tree.state_dict()})
    with torch.no_grad():
        torch.testing.assert_close(mera.legs(), tree.legs())


@settings(max_examples=20, deadline=None)
@given(n_legs=st.integers(2, 6), seed=st.integers(0, 2**16), data=st.data())
def test_tt_matches_the_chain(n_legs: int, seed: int, data) -> None:
    out_dims = tuple(data.draw(st.lists(st.integers(1, 3), min_size=n_legs, max_size=n_legs)))
    in_dims = tuple(data.draw(st.lists(st.integers(1, 3), min_size=n_legs, max_size=n_legs)))
    bonds = tuple(data.draw(st.lists(st.integers(1, 6), min_size=n_legs - 1, max_size=n_legs - 1)))
    shape = (math.prod(out_dims), math.prod(in_dims))
    spec = GeneratorSpec("tt", shape, out_dims, in_dims, bonds, "none")
    torch.manual_seed(seed)
    net = TT(spec).double()
    with torch.no_grad():
        reference = tt_reference(net)
        torch.testing.assert_close(net.legs(), reference)
        torch.testing.assert_close(net(), legs_to_weight(reference, out_dims, in_dims, shape))


def test_tt_is_cut_where_neither_half_is_nearly_the_whole_weight() -> None:
    """fc6 of VGG-16 at 2,000x: the least rank (8) is at the last bond, where the left half would
    have N/8 rows; the cut goes to the balanced bond instead."""
    from adntn.networks.tt import tt_split

    dims, ranks = (16, 14, 14, 8, 8, 8, 8, 8), [1, 16, 33, 33, 33, 33, 33, 8, 1]
    assert tt_split(ranks, dims) == 4
    assert tt_split([1, 4, 1, 4, 1], (4, 4, 4, 4)) == 2  # a rank-1 bond in the middle: cut there


# ----------------------------------------------------------------------------- squared distance

@pytest.mark.parametrize("arch", ["ttn", "attn", "mera", "tt", "svd"])
@pytest.mark.parametrize("shape,n_legs", [((64, 48), 8), ((13, 34), 4), ((8, 3, 3, 3), 2)])
def test_squared_distance_equals_materialised(arch: str, shape: tuple[int, ...], n_legs: int) -> None:
    torch.manual_seed(1)
    spec = make_spec(arch, shape, n_legs)
    net = build(spec).double()
    perturb_mixers(net)
    weight = torch.randn(shape, dtype=torch.float64)
    if arch == "svd":
        target = weight.reshape(spec.rows, spec.cols)
    else:
        target = weight_to_legs(weight, spec.out_dims, spec.in_dims)
    expected = (net.legs() - target).pow(2).sum()
    torch.testing.assert_close(net.squared_distance(target, target.pow(2).sum()), expected)


@pytest.mark.parametrize("arch", ["ttn", "tt"])
def test_squared_distance_gradients_equal_the_materialised_ones(arch: str) -> None:
    """The bilinear form's custom backward gives the gradients of ||Y - G||^2 itself."""
    torch.manual_seed(2)
    spec = make_spec(arch, (64, 48), 8)
    net = build(spec).double()
    target = weight_to_legs(torch.randn(64, 48, dtype=torch.float64), spec.out_dims, spec.in_dims)
    params = list(net.parameters())
    expected = torch.autograd.grad((net.legs() - target).pow(2).sum(), params)
    actual = torch.autograd.grad(net.squared_distance(target, target.pow(2).sum()), params)
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e)


@settings(max_examples=15, deadline=None)
@given(pre=st.integers(1, 4), dim=st.integers(1, 6), post=st.integers(1, 5), rank=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_low_rank_update_is_i_plus_pw_with_its_autograd_gradients(pre: int, dim: int, post: int, rank: int,
                                                                  seed: int) -> None:
    """The hand-written backward (``_LowRankUpdate``) is the gradient of view + P (W view)."""
    torch.manual_seed(seed)
    view, p, w = (torch.randn(*shape, dtype=torch.float64, requires_grad=True)
                  for shape in ((pre, dim, post), (dim, rank), (rank, dim)))
    out = low_rank_update(view, p, w)
    reference = view + torch.einsum("dr,re,xey->xdy", p, w, view)
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    actual = torch.autograd.grad(out, (view, p, w), grad)
    expected = torch.autograd.grad(reference, (view, p, w), grad)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("scaled", [True, False])
def test_scaled_squared_distance_is_the_distance_with_its_gradients(scaled: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True) if scaled else None
    target = torch.randn(5, 7, dtype=torch.float64)
    inputs = (x, scale) if scaled else (x,)
    value = scaled_squared_distance(x, scale, target)
    reference = ((x * scale if scaled else x) - target).pow(2).sum()
    torch.testing.assert_close(value, reference)
    for a, e in zip(torch.autograd.grad(value, inputs), torch.autograd.grad(reference, inputs)):
        torch.testing.assert_close(a, e)
    with torch.no_grad():
        torch.testing.assert_close(scaled_squared_distance(x, scale, target), reference.detach())


@given(pre=st.integers(1, 3), dim=st.integers(1, 5), post=st.integers(1, 4), rank=st.integers(1, 3),
       sigma=st.sampled_from([None, "tanh", "relu"]), mixed=st.booleans(), scaled=st.booleans(),
       seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_sigma_mix_distance_is_its_parts_with_their_gradients(pre: int, dim: int, post: int, rank: int,
                                                              sigma: str | None, mixed: bool, scaled: bool,
                                                              seed: int) -> None:
    """The fused tile end (``sigma_mix_distance``) is ||s (I + P W) sigma(z) - T||^2 made from
    its parts, value and gradients, and refuses a second backward (its buffers are reused)."""
    torch.manual_seed(seed)
    z, p, w = (torch.randn(*shape, dtype=torch.float64, requires_grad=True)
               for shape in ((pre, dim, post), (dim, rank), (rank, dim)))
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True) if scaled else None
    target = torch.randn(pre, post, dim, dtype=torch.float64).transpose(1, 2)  # strided, as a tile's
    inputs = [z, *((p, w) if mixed else ()), *((scale,) if scaled else ())]
    value = sigma_mix_distance(z, sigma, (p, w, (pre, dim, post)) if mixed else None, scale, target)
    y = {None: z, "tanh": torch.tanh(z), "relu": torch.relu(z)}[sigma]
    u = y + torch.einsum("dr,re,xey->xdy", p, w, y) if mixed else y
    reference = ((u * scale if scaled else u) - target).pow(2).sum()
    torch.testing.assert_close(value, reference)
    for a, e in zip(torch.autograd.grad(value, inputs, retain_graph=True), torch.autograd.grad(reference, inputs)):
        torch.testing.assert_close(a, e)
    with pytest.raises(RuntimeError, match="once"):
        value.backward()


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 2.0**-21), (torch.float64, 2.0**-50)])
def test_tanh_by_sigmoid_is_tanh_to_a_few_ulp_of_one(dtype: torch.dtype, bound: float) -> None:
    """The fit's tanh (2 sigmoid(2z) - 1) is within a few units in the last place of 1 of the
    exact tanh (float64 of the same inputs) on every scale, saturates to exactly +-1, and keeps
    infinities and NaN as tanh does."""
    magnitudes = torch.logspace(-30, 2, 4001, dtype=torch.float64)
    z = torch.cat([magnitudes, -magnitudes, torch.linspace(-20, 20, 8001, dtype=torch.float64)]).to(dtype)
    error = (tanh_by_sigmoid(z).double() - torch.tanh(z.double())).abs().max()
    assert error <= bound
    special = torch.tensor([0.0, 60.0, -60.0, math.inf, -math.inf, math.nan], dtype=dtype)
    torch.testing.assert_close(tanh_by_sigmoid(special), torch.tanh(special), equal_nan=True, rtol=0, atol=0)


# ----------------------------------------------------------------------------- initialisation

def linear_ttn_weight(spec: GeneratorSpec, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    tree = TTN(replace(spec, arch="ttn", activation="none", mix_rank=0))
    with torch.no_grad():
        return tree()


@pytest.mark.parametrize("arch", TREES)
@pytest.mark.parametrize("shape,n_legs,bond", [((64, 48), 8, 3), ((64, 48), 4, 5), ((8, 3, 3, 3), 4, 2),
                                                ((10, 64), 2, 4)])
def test_linear_trees_fit_a_representable_target_exactly(arch: str, shape, n_legs: int, bond: int) -> None:
    spec = make_spec(arch, shape, n_legs, bond, activation="none")
    target = linear_ttn_weight(spec, seed=2)
    net = GENERATORS[arch].from_weight(spec, target)
    with torch.no_grad():
        assert rel(net(), target) < 1e-5


@pytest.mark.parametrize("arch", TREES)
def test_full_bonds_fit_any_target(arch: str) -> None:
    spec = make_spec(arch, (10, 64), 4, bond=64, activation="none")
    target = torch.randn(10, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel(GENERATORS[arch].from_weight(spec, target)(), target) < 1e-5


def test_tt_svd_is_exact_for_full_and_representable_ranks() -> None:
    generator = torch.Generator().manual_seed(4)
    full = make_spec("tt", (64, 48), 4, bond=4096)
    target = torch.randn(64, 48, generator=generator)
    with torch.no_grad():
        net = TT.from_weight(full, target)
        assert rel(net(), target) < 1e-5
        first = net.cores[0]  # full rank r_1 = d_1: the identity, the leg carried as it is
        assert torch.equal(first.reshape(first.shape[1], -1), torch.eye(first.shape[1]))
        low = make_spec("tt", (64, 48), 8, bond=3)
        torch.manual_seed(5)
        target = TT(low)()
        assert rel(TT.from_weight(low, target)(), target) < 1e-5


@pytest.mark.parametrize("shape,rank", [((64, 48), 48), ((64, 48), 5), ((1100, 1200), 5)])
def test_svd_is_exact_for_full_and_low_ranks(shape: tuple[int, int], rank: int) -> None:
    """(1100, 1200) at rank 5 takes the randomised range finder."""
    generator = torch.Generator().manual_seed(6)
    target = torch.randn(shape[0], rank, generator=generator) @ torch.randn(rank, shape[1], generator=generator)
    with torch.no_grad():
        assert rel(SVD.from_weight(make_spec("svd", shape, bond=rank), target)(), target) < 1e-5


def test_svd_from_weight_is_the_eckart_young_optimum() -> None:
    target = torch.randn(40, 30, generator=torch.Generator().manual_seed(7))
    values = torch.linalg.svdvals(target.double())
    with torch.no_grad():
        error = (SVD.from_weight(make_spec("svd", (40, 30), bond=4), target)() - target).double().norm()
    assert float(error) == pytest.approx(float(values[4:].norm()), rel=1e-5)


def structured_weight(shape: tuple[int, ...]) -> torch.Tensor:
    """A smooth, conv-like weight plus a little noise: what a trained layer looks like to a fit."""
    rows, cols = shape[0], math.prod(shape[1:])
    r = torch.linspace(0, 1, rows).unsqueeze(1)
    c = torch.linspace(0, 1, cols).unsqueeze(0)
    smooth = torch.cos(3 * r + 5 * c) + 0.5 * torch.sin(7 * r * c) + torch.exp(-((r - c) ** 2) * 4)
    noise = 0.01 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(8))
    return (smooth + noise).reshape(shape)


@pytest.mark.parametrize("arch", ["ttn", "attn", "mera", "tt", "svd"])
@pytest.mark.parametrize("shape,n_legs", [((64, 48), 8), ((64, 3, 3, 3), 4)])
def test_from_weight_beats_random_init(arch: str, shape: tuple[int, ...], n_legs: int) -> None:
    spec = make_spec(arch, shape, n_legs, bond=3)
    target = structured_weight(shape)
    torch.manual_seed(9)
    with torch.no_grad():
        fitted = rel(GENERATORS[arch].from_weight(spec, target)(), target)
        random = rel(build(spec)(), target)
    assert fitted < 0.25 and fitted < 0.25 * random


@pytest.mark.parametrize("arch", TREES)
def test_nonlinear_init_starts_at_the_linear_fit(arch: str) -> None:
    """The gains are calibrated so that sigma is nearly linear: the fit matches the linear TTN's."""
    spec = make_spec(arch, (64, 48), 8, bond=3, activation="tanh")
    target = structured_weight((64, 48))
    with torch.no_grad():
        linear = rel(TTN.from_weight(replace(spec, arch="ttn", activation="none", mix_rank=0), target)(), target)
        nonlinear = rel(GENERATORS[arch].from_weight(spec, target)(), target)
    assert nonlinear == pytest.approx(linear, rel=0.02)


@pytest.mark.parametrize("bond", [3, 64])
def test_mera_gains_put_each_layers_largest_preactivation_at_the_init_value(bond: int, memory_policy,
                                                                          monkeypatch) -> None:
    """The gains are calibrated on the largest pre-activation over every slice of the state (the
    largest |z| sigma sees, gain folded in, is INIT_PREACTIVATION at each layer), whether leaf 0
    is a matrix (bond 3) or an identity (bond 64, the state sliced along leg 0)."""
    memory_policy(block_bytes=4 * 300)
    spec = make_spec("mera", (64, 48), 8, bond=bond, activation="tanh")
    with torch.no_grad():
        net = MERA.from_weight(spec, structured_weight((64, 48)))
        assert len(net._state_slices()) > 1
        seen: list[float] = []
        sigma = type(net.activations[0]).sigma
        monkeypatch.setattr(type(net.activations[0]), "sigma",
                            lambda site, z, inplace=False: seen.append(float(z.abs().max())) or sigma(site, z, inplace))
        net.legs()
    assert len(seen) == len(net.activations)
    # sigma is tanh at |z| <= 0.05: it changes the states below it by at most 0.1%
    assert seen == pytest.approx([INIT_PREACTIVATION] * len(seen), rel=2e-3)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("arch", TREES)
@pytest.mark.parametrize("output", ["forward", "legs", "squared_distance"])
def test_gradients_reach_every_parameter(arch: str, output: str) -> None:
    torch.manual_seed(10)
    spec = make_spec(arch, (64, 48), 8, bond=3, activation="tanh")
    net = build(spec)
    perturb_mixers(net)
    if output == "squared_distance":
        target = weight_to_legs(structured_weight((64, 48)), spec.out_dims, spec.in_dims)
        loss = net.squared_distance(target, target.pow(2).sum())
    else:
        loss = getattr(net, output)().pow(3).sum()
    loss.backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("output", ["forward", "legs"])
def test_attn_in_place_paths_have_the_reference_gradients(output: str) -> None:
    torch.manual_seed(11)
    spec = make_spec("attn", (13, 34), 8, bond=3, activation="gelu")
    net = ATTN(spec).double()
    perturb_mixers(net)
    reference = attn_reference(net)
    if output == "forward":
        reference = legs_to_weight(reference, spec.out_dims, spec.in_dims, spec.shape)
    weights = torch.randn(reference.shape, dtype=torch.float64)
    expected = torch.autograd.grad((reference * weights).sum(), list(net.parameters()))
    actual = torch.autograd.grad((getattr(net, output)() * weights).sum(), list(net.parameters()))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def assert_tiles_give_the_whole_gradient(net: MERA, whole: torch.Tensor) -> None:
    """``accumulate_squared_distance``, tile by tile, gives ||whole - T||^2 (T random) and its
    gradient, ``whole`` being the net's legs with their graph."""
    target = torch.randn(net.spec.leg_dims)
    expected = (whole - target).pow(2).sum()
    expected.backward()
    expected_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    value = net.accumulate_squared_distance(target, target.pow(2).sum(), torch.tensor(1.0))
    assert_close_scaled(value, float(expected.detach()))
    # one group: every gradient of one loss carries the rounding of terms of the largest one's size
    assert_close_scaled([p.grad for p in net.parameters()], expected_grads)


@pytest.mark.parametrize("n_legs, bond", [(2, 3), (4, 3), (4, 64), (8, 2), (8, 64)])
def test_mera_slices_of_leg_0_give_the_whole_distance_and_gradient(n_legs: int, bond: int, memory_policy) -> None:
    """Whether leg 0's leaf is an identity (bond 64: the first node core is sliced) or a matrix
    (its rows are sliced), the slices are the slices of the whole, and accumulating slice by
    slice gives the whole objective's gradient."""
    memory_policy(block_bytes=4 * 500)
    torch.manual_seed(0)
    net = build(make_spec("mera", (96, 80), n_legs, bond=bond))
    perturb_mixers(net)
    with torch.no_grad():
        for site in net.activations:
            site.log_gain.fill_(0.5)
    slices = net.row_slices()
    assert len(slices) > 1 and slices[0].start == 0 and slices[-1].stop == net.spec.leg_dims[0]
    whole = net.legs()
    assert_close_scaled(torch.cat([net.legs(rows) for rows in slices]), whole)
    assert_tiles_give_the_whole_gradient(net, whole)


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu", "none"])
def test_mera_tiles_give_the_whole_gradient_for_every_activation(activation: str, memory_policy) -> None:
    """Identity leaves and one physical disentangler: the tiles end in ``sigma_mix_distance``
    (tanh, relu, none) or in its parts (gelu); either way the whole objective's gradient."""
    memory_policy(block_bytes=4 * 9000)
    torch.manual_seed(0)
    spec = make_spec("mera", (256, 256), 8, bond=64, activation=activation)
    ranks = list(spec.disentangler_ranks)
    ranks[:3] = [0, 1, 0]  # one physical pair, on legs (3, 4)
    net = build(replace(spec, mix_ranks=tuple(ranks)))
    perturb_mixers(net)
    with torch.no_grad():
        for site in net.activations:
            site.log_gain.fill_(0.5)
    assert len(net.fit_tiles()) > 1
    assert_tiles_give_the_whole_gradient(net, net.legs())


@pytest.mark.parametrize("leg_1_mixed", [False, True])
@pytest.mark.parametrize("bond", [64, 2])
def test_mera_fit_tiles_cut_leg_1_where_a_value_of_leg_0_exceeds_a_block(leg_1_mixed: bool, bond: int,
                                                                        memory_policy) -> None:
    """One value of leg 0 holds 16,384 of the 65,536 values; with 9,000-value blocks each is cut
    in two along leg 1, unless a disentangler acts on leg 1: in the state with identity leaves
    (bond 64), through leaf 1's rows with matrix leaves (bond 2). The tiles are the pieces of the
    whole leg tensor, and accumulating tile by tile gives the whole objective's gradient."""
    memory_policy(block_bytes=4 * 9000)
    torch.manual_seed(0)
    spec = make_spec("mera", (256, 256), 8, bond=bond)
    ranks = spec.disentangler_ranks  # physical pairs (1, 3, 5), then level 1's, then level 2's
    spec = replace(spec, mix_ranks=ranks if leg_1_mixed else (0, *ranks[1:3], 0, *ranks[4:]))
    net = build(spec)
    perturb_mixers(net)
    with torch.no_grad():
        for site in net.activations:
            site.log_gain.fill_(0.5)
    tiles = net.fit_tiles()
    expected_cuts = [()] if leg_1_mixed else [((1, slice(0, 2)),), ((1, slice(2, 4)),)]
    assert tiles == [(slice(r, r + 1), fixed) for r in range(4) for fixed in expected_cuts]
    whole = net.legs()
    for rows, fixed in tiles:
        legs, scale = net._scaled_legs(rows, fixed=fixed)
        index = (rows, *[dict(fixed).get(k, slice(None)) for k in range(1, 8)])
        assert_close_scaled(legs if scale is None else legs * scale, whole[index])
    assert_tiles_give_the_whole_gradient(net, whole)


@pytest.mark.parametrize("arch", ["ttn", "attn", "mera", "tt", "svd"])
@pytest.mark.parametrize("shape", [(64, 48), (53, 30), (16, 4, 3, 3)])
def test_row_blocks_are_the_weight_in_order(arch: str, shape: tuple, memory_policy) -> None:
    """Blocks of whole rows that concatenate to the weight; a block is still intact while the
    next one is made (the writer's contract)."""
    memory_policy(block_bytes=4 * 500)
    torch.manual_seed(0)
    net = build(make_spec(arch, shape, 4))
    perturb_mixers(net)
    with torch.no_grad():
        expected = net()
        previous, copies = None, []
        for block in net.row_blocks():
            assert block.shape[1:] == expected.shape[1:]
            if previous is not None:
                torch.testing.assert_close(previous[0], copies[-1])
            copies.append(block.clone())
            previous = (block,)
    assert_close_scaled(torch.cat(copies), expected)
    assert (len(copies) > 1) == (arch in ("mera", "svd") or shape != (53, 30))


@pytest.mark.parametrize("arch", ["ttn", "attn", "mera", "tt", "svd"])
def test_a_bfloat16_target_is_read_in_float32_blocks(arch: str, memory_policy) -> None:
    """Init, distance and gradients from a bfloat16 target equal those from its float32 values,
    whatever the blocks it is read in."""
    memory_policy(cache_bytes=4 * 97)
    torch.manual_seed(0)
    spec = make_spec(arch, (64, 48), 4, bond=3)
    cls = GENERATORS[arch]
    half = cls.fit_target(spec, torch.randn(64, 48), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    full = half.float()
    nets = []
    for t in (half, full):
        torch.manual_seed(1)  # the same random disentangler factors Q
        nets.append(cls.from_target(spec, t))
    assert_close_scaled(list(nets[0].parameters()), list(nets[1].parameters()))
    perturb_mixers(nets[0])
    if arch == "svd":  # its init is the Eckart-Young optimum: the gradient there is rounding noise around 0
        with torch.no_grad():
            nets[0].u.mul_(2.0)
    nets[1].load_state_dict(nets[0].state_dict())
    values = []
    for net, t in zip(nets, (half, full)):
        norm_sq = t.float().pow(2).sum()
        value = net.accumulate_squared_distance(t, norm_sq, 1 / norm_sq)
        values.append(value)
    assert_close_scaled(values[0], values[1])
    assert_close_scaled([p.grad for p in nets[0].parameters()], [p.grad for p in nets[1].parameters()])
