"""One parameter budget for all compressed layers (--budget, --ratio total:R), split by sensitivity."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from adntn.cli import app
from adntn.errors import AdntnError
from adntn.networks.budget import smallest_spec, spec_for_budget
from adntn.pipeline.allocate import (Candidate, allocate, candidate_budgets, fit_measures, greedy, ladder,
                                     parse_budget)
from adntn.pipeline.options import CompressOptions


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text,value", [("424", 424), ("10k", 10_000), ("1.5M", 1_500_000), ("2K", 2000), (77, 77)])
def test_budget_spellings(text, value):
    assert parse_budget(text) == value


@pytest.mark.parametrize("text", ["ten", "1.5", "0", "-3", "1.2345k"])
def test_bad_budgets_are_one_sentence(text):
    with pytest.raises(AdntnError, match="--budget"):
        parse_budget(text)


def test_options_take_one_sizing_only():
    assert CompressOptions(budget="10k").budget == 10_000
    assert CompressOptions.from_kwargs(ratio="total:5000").total_ratio == 5000
    assert CompressOptions.from_kwargs(ratio="fc6=20,fc7=30").layer_ratios == {"fc6": 20, "fc7": 30}
    with pytest.raises(AdntnError, match="Give one of --budget and --bond-dim"):
        CompressOptions(budget=400, bond_dim=3)
    with pytest.raises(AdntnError, match="R greater than 1"):
        CompressOptions(total_ratio=0.5)


def _spec(params):  # a stand-in: Candidate reads only core_params off the spec
    return type("Spec", (), {"core_params": params})()


def test_greedy_gives_parameters_where_the_error_drops_most_per_parameter():
    flat = [Candidate(_spec(10), 0.5), Candidate(_spec(20), 0.49), Candidate(_spec(40), 0.48)]
    steep = [Candidate(_spec(10), 0.9), Candidate(_spec(20), 0.5), Candidate(_spec(40), 0.2)]
    assert greedy([flat, steep], 50) == (0, 2)
    assert greedy([flat, steep], 20) == (0, 0)
    # a larger candidate may be worth it even when the next one is not (non-convex ladders)
    bumpy = [Candidate(_spec(10), 0.9), Candidate(_spec(15), 0.9), Candidate(_spec(30), 0.1)]
    assert greedy([flat, bumpy], 40) == (0, 2)


def test_greedy_weighs_relative_drops():
    # the probe losses of fc6 and fc7 of the CIFAR-10 VGG-16-BN at --budget 200: absolute drops
    # chose 82 + 106 (0.8539 top-1 after fine-tuning), relative ones 125 + 73 (0.8737)
    fc6 = [Candidate(_spec(60), 9.83), Candidate(_spec(82), 3.22), Candidate(_spec(125), 0.52)]
    fc7 = [Candidate(_spec(66), 7.08), Candidate(_spec(73), 5.37), Candidate(_spec(106), 1.81)]
    assert greedy([fc6, fc7], 200) == (2, 1)
    # an exact fit (measure 0) is the best a layer can get, not an error
    exact = [Candidate(_spec(10), 0.5), Candidate(_spec(20), 0.0)]
    assert greedy([exact, fc7], 86) == (1, 0)


def test_candidate_ladder_ends_at_the_largest():
    budgets = candidate_budgets(60, 400)
    assert budgets[0] == 60 and budgets[-1] == 400 and budgets == sorted(budgets)


@pytest.mark.parametrize("arch", ["attn", "mera"])
@pytest.mark.parametrize("shape, largest", [((4096, 512), 358), ((4096, 4096), 364), ((64, 48), 900)])
def test_a_mixed_ladder_offers_every_tree_bare(arch, shape, largest):
    """attn's and mera's ladders hold the TTN's trees with their disentanglers at rank 0, and the
    bare tree of each candidate that has some."""
    mixed = ladder(arch, shape, "tanh", largest, "x")
    trees = {(s.n_legs, s.bond_dims) for s in ladder("ttn", shape, "tanh", largest, "x")}
    bare = {(s.n_legs, s.bond_dims) for s in mixed if not any(s.mix_ranks)}
    assert bare == trees
    assert {(s.n_legs, s.bond_dims) for s in mixed} <= bare


@pytest.mark.parametrize("arch", ["attn", "mera"])
def test_disentanglers_that_do_not_pay_leave_the_ttn_allocation(arch):
    """A measure that finds every disentangler harmful (the tree's measure, 10% worse with any)
    gives attn and mera the TTN's split. The trees' measures are the TTN's probe losses at
    --budget 424 for fc6+fc7 of the CIFAR-10 VGG-16-BN; mera's ladder without bare trees bought
    fc6's 158-parameter tree with a disentangler (166) and could then afford only 182 in fc7."""
    probes = [{60: 9.83, 82: 3.22, 158: 0.396, 329: 0.168},
              {66: 7.08, 73: 5.37, 106: 1.81, 182: 0.375, 260: 0.159, 342: 0.263}]

    def measure(layer):
        def value(spec):
            mixed = any(spec.mix_ranks or ())
            tree = replace(spec, mix_ranks=(0,) * len(spec.mix_ranks)) if mixed else spec
            return probes[layer][tree.core_params] * (1.1 if mixed else 1.0)
        return value

    layers = [("fc6", (4096, 512)), ("fc7", (4096, 4096))]
    measures = [measure(0), measure(1)]
    tree = allocate(layers, 424, "ttn", "tanh", measures, "synthetic")
    assert [s.core_params for s in tree.specs] == [158, 260]
    mixed = allocate(layers, 424, arch, "tanh", measures, "synthetic")
    assert [(s.n_legs, s.bond_dims) for s in mixed.specs] == [(s.n_legs, s.bond_dims) for s in tree.specs]
    assert not any(any(s.mix_ranks) for s in mixed.specs)


@pytest.mark.parametrize("arch", ["ttn", "attn"])
def test_allocation_stays_within_the_budget_and_reports_why(arch):
    torch.manual_seed(0)
    # a low-rank layer (cheap to fit) and a full-rank one: the budget goes where it helps
    low = torch.randn(64, 2) @ torch.randn(2, 48)
    full = torch.randn(64, 64)
    total = smallest_spec(arch, (64, 48), "tanh").core_params + smallest_spec(arch, (64, 64), "tanh").core_params + 300
    measures, name = fit_measures([low, full], None, steps=3)
    allocation = allocate([("a", tuple(low.shape)), ("b", tuple(full.shape))], total, arch, "tanh", measures, name)
    assert allocation.used <= total
    described = allocation.describe()
    json.dumps(described)
    assert [row["layer"] for row in described["layers"]] == ["a", "b"]
    for row, spec in zip(described["layers"], allocation.specs):
        assert row["core_params"] == spec.core_params
        assert any(c["core_params"] == spec.core_params for c in row["candidates"])
        errors = [c["measure"] for c in row["candidates"]]
        assert errors[0] >= errors[-1]


def test_a_budget_below_the_smallest_generators_is_refused():
    with pytest.raises(AdntnError, match="below the smallest generators of --arch ttn"):
        allocate([("a", (64, 48)), ("b", (64, 64))], 10, "ttn", "tanh", [], "unused")


def test_spec_for_budget_matches_the_ratio_solver():
    spec = spec_for_budget("ttn", (4096, 512), 209, "tanh")
    assert spec.core_params == 158


@pytest.mark.parametrize("flag", [("--budget", "1.2k"), ("--ratio", "total:40")])
def test_cli_budget_for_all_layers(checkpoint, tmp_path, flag):
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["compress", str(checkpoint), "--layers", "fc6,fc7", *flag, "--steps", "2",
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    total = report["allocation"]["budget"]
    if flag[0] == "--budget":
        assert total == 1200
    else:
        assert total == math.floor(sum(layer["dense_params"] for layer in report["layers"]) / 40)
    assert report["total"]["compressed_core_params"] == report["allocation"]["core_params"] <= total
    assert [row["core_params"] for row in report["allocation"]["layers"]] == [
        layer["core_params"] for layer in report["layers"]]
