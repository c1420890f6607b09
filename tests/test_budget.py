import math

import pytest

from adntn.networks.budget import default_legs, smallest_spec, spec_for_bond_dim, spec_for_ratio
from adntn.errors import AdntnError


@pytest.mark.parametrize("arch", ["ttn", "attn", "mera", "tt", "svd"])
@pytest.mark.parametrize("shape,ratio", [((4096, 512), 2000), ((4096, 4096), 10000), ((256, 64, 3, 3), 50)])
def test_ratio_is_met_and_close(arch, shape, ratio):
    if arch == "svd" and ratio * (shape[0] + math.prod(shape[1:])) > math.prod(shape):
        with pytest.raises(AdntnError, match="cannot reach"):  # even rank 1 is too large
            spec_for_ratio(arch, shape, ratio, "tanh")
        return
    spec = spec_for_ratio(arch, shape, ratio, "tanh")
    assert spec.dense_params / spec.core_params >= ratio
    # as close as the structure allows: the next larger bond would break the budget
    assert spec.core_params > 0.3 * spec.dense_params / ratio


def test_unreachable_ratio_names_the_smallest_generator():
    with pytest.raises(AdntnError, match="cannot reach 1,000,000x with --arch ttn: its smallest generator has"):
        spec_for_ratio("ttn", (4096, 512), 1e6, "tanh", label="fc6")


def test_ratio_must_exceed_one():
    with pytest.raises(AdntnError, match="greater than 1"):
        spec_for_ratio("ttn", (64, 64), 0.5, "tanh")


def test_bond_dim_must_be_positive():
    with pytest.raises(AdntnError, match="at least 1"):
        spec_for_bond_dim("mera", (64, 64), 0, "tanh")


def test_bond_dim_spec_uses_default_legs():
    spec = spec_for_bond_dim("ttn", (4096, 4096), 4, "gelu")
    assert spec.n_legs == default_legs(4096, 4096) == 8
    assert spec.bond_dims == (4, 4, 4) and spec.activation == "gelu"


def test_baselines_are_linear():
    assert spec_for_bond_dim("tt", (64, 64), 2, "tanh").activation == "none"
    assert spec_for_bond_dim("svd", (64, 64), 2, "tanh").bond_dims == (2,)


def test_the_smallest_spec_is_exactly_reachable():
    smallest = smallest_spec("ttn", (4096, 512), "tanh")
    assert smallest.core_params == 60
    assert spec_for_ratio("ttn", (4096, 512), smallest.ratio, "tanh").core_params == 60


def test_a_new_arch_is_one_class(monkeypatch):
    """Defining a Generator subclass with an ``arch`` registers it: the spec, the budget solver,
    the options and ``build`` all take it, with nothing else edited."""
    from adntn.core import registry
    from adntn.networks import build
    from adntn.networks.svd import SVD
    from adntn.pipeline.options import CompressOptions

    monkeypatch.setattr(registry, "_CLASSES", dict(registry._CLASSES))

    class HalfRankSVD(SVD):
        arch = "svd-half"

        @classmethod
        def param_count(cls, spec):
            return SVD.param_count(spec)

    assert registry.archs()[-1] == "svd-half"
    spec = spec_for_ratio("svd-half", (64, 48), 4, "tanh")
    assert spec.arch == "svd-half" and spec.ratio >= 4
    assert isinstance(build(spec), HalfRankSVD)
    assert CompressOptions(arch="svd-half").arch == "svd-half"
    with pytest.raises(AdntnError, match="Unknown arch 'nope'; choose one of ttn, attn, mera, tt, svd, svd-half"):
        CompressOptions(arch="nope")


@pytest.mark.parametrize("shape", [(0, 64), (64, 0), (64, 0, 3, 3)])
@pytest.mark.parametrize("arch", ["ttn", "mera", "tt", "svd"])
def test_zero_width_weight_is_one_error(arch, shape):
    for make in (lambda: spec_for_ratio(arch, shape, 10, "tanh", label="fc6"),
                 lambda: spec_for_bond_dim(arch, shape, 4, "tanh", label="fc6")):
        with pytest.raises(AdntnError, match=r"^fc6 has a weight of shape .* with no entries; .*\.$") as caught:
            make()
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("arch", ["attn", "mera"])
@pytest.mark.parametrize("shape,ratio", [((4096, 512), 10000), ((4096, 512), 2000), ((4096, 4096), 50000),
                                         ((256, 64, 3, 3), 50)])
def test_disentanglers_get_only_what_the_ttn_tree_leaves(arch, shape, ratio):
    """At a ratio attn and mera hold the TTN's tree for that budget (same legs and bonds, so they
    contain it) and spend only the rest on disentanglers."""
    from dataclasses import replace

    from adntn.networks import build

    tree = spec_for_ratio("ttn", shape, ratio, "tanh")
    spec = spec_for_ratio(arch, shape, ratio, "tanh")
    assert (spec.leg_dims, spec.bond_dims) == (tree.leg_dims, tree.bond_dims)
    assert tree.core_params <= spec.core_params <= math.prod(shape) // ratio
    assert spec.mix_ranks is not None
    bare = replace(spec, mix_ranks=(0,) * len(spec.mix_ranks))
    assert bare.core_params == tree.core_params
    assert sum(p.numel() for p in build(spec).parameters()) == spec.core_params


@pytest.mark.parametrize("arch", ["attn", "mera"])
@pytest.mark.parametrize("shape", [(4096, 512), (4096, 4096)])
def test_the_smallest_attn_and_mera_are_the_smallest_ttn(arch, shape):
    smallest = smallest_spec(arch, shape, "tanh")
    assert smallest.core_params == smallest_spec("ttn", shape, "tanh").core_params
    assert set(smallest.mix_ranks) == {0}
    assert spec_for_ratio(arch, shape, smallest.ratio, "tanh").core_params == smallest.core_params


def test_a_budget_in_parameters():
    from adntn.networks.budget import spec_for_budget

    assert spec_for_budget("ttn", (4096, 512), 158, "tanh").core_params == 158
    assert spec_for_budget("attn", (4096, 512), 200, "tanh").core_params <= 200
    with pytest.raises(AdntnError, match=r"cannot fit in 10 parameters with --arch mera: its smallest generator has 60"):
        spec_for_budget("mera", (4096, 512), 10, "tanh", label="fc6")


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 1, 1, 1)])
@pytest.mark.parametrize("arch", ["ttn", "attn", "mera", "tt"])
def test_a_weight_with_under_two_prime_factors_gets_two_legs(arch, shape):
    """1x3 cannot be cut into two legs of dim >= 2; it gets two legs anyway (some of dim 1), the
    same structure ``--bond-dim`` builds, and a ratio it cannot reach is one sentence."""
    from adntn.networks import build
    from adntn.networks.budget import spec_for_budget

    smallest = smallest_spec(arch, shape, "tanh")
    assert smallest.n_legs == 2 == spec_for_bond_dim(arch, shape, 1, "tanh").n_legs
    assert sum(p.numel() for p in build(smallest).parameters()) == smallest.core_params
    assert build(smallest)().shape == shape
    assert spec_for_budget(arch, shape, smallest.core_params, "tanh") == smallest
    with pytest.raises(AdntnError, match=rf"^fc \(.*\) cannot reach 2x with --arch {arch}: its smallest "
                                         rf"generator has {smallest.core_params} parameters? \((0\.\d+|1)x\)\.$"):
        spec_for_ratio(arch, shape, 2, "tanh", label="fc")
