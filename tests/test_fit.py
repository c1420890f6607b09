import pytest
import torch
from torch import nn

from adntn.networks.budget import spec_for_bond_dim
from adntn.training.fit import fit
from adntn.networks.ttn import TTN
from adntn.training.objectives import ActivationObjective, WeightObjective, relative_error
from tolerances import assert_close_scaled


def _low_rank_weight(rows=64, cols=48, bond=2, seed=0):
    """A weight that a linear TTN of the given bond represents exactly."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return TTN(spec_for_bond_dim("ttn", (rows, cols), bond, "none"))()


def test_weight_objective_matches_direct_relative_error():
    torch.manual_seed(0)
    weight = _low_rank_weight()
    spec = spec_for_bond_dim("ttn", tuple(weight.shape), 2, "tanh")
    net = TTN(spec)
    with torch.no_grad():
        loss = WeightObjective(TTN.fit_target(net.spec, weight))(net)
    assert_close_scaled(float(loss), relative_error(weight, net()) ** 2)  # a float32 loss


def test_fit_improves_and_never_ends_worse_than_it_started():
    torch.manual_seed(0)
    weight = _low_rank_weight()
    spec = spec_for_bond_dim("ttn", tuple(weight.shape), 2, "tanh")
    net = TTN(spec)  # random start
    result = fit(net, WeightObjective(TTN.fit_target(net.spec, weight)), steps=150, lr=3e-2)
    assert result.best_loss < 0.5 * result.initial_loss
    assert_close_scaled(relative_error(weight, net()) ** 2, result.best_loss)


def test_fit_keeps_the_cores_its_best_value_was_measured_at():
    """A value is measured before the step that follows it moves the cores. On (x - 1)^2 from 0
    at lr 1, Adam's first step lands on the minimum and its second jumps past it (to about 1.5);
    the cores kept are the minimum's, and ``best_loss`` is their loss."""
    point = nn.Module()
    point.x = nn.Parameter(torch.zeros(()))

    def objective(module: nn.Module) -> torch.Tensor:
        return (module.x - 1) ** 2

    result = fit(point, objective, steps=3, lr=1.0)
    assert float(point.x.detach()) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        assert float(objective(point)) == result.best_loss


def test_svd_initialisation_beats_random():
    torch.manual_seed(0)
    weight = _low_rank_weight()
    spec = spec_for_bond_dim("ttn", tuple(weight.shape), 3, "tanh")
    assert relative_error(weight, TTN.from_weight(spec, weight)()) < 0.5 * relative_error(weight, TTN(spec)())


def test_activation_objective_only_sees_the_data_subspace():
    torch.manual_seed(0)
    weight = torch.randn(16, 32)
    inputs = torch.zeros(100, 32)
    inputs[:, :4] = torch.randn(100, 4)  # data lives in 4 of 32 input directions
    masked = weight.clone()
    masked[:, 4:] = 0
    spec = spec_for_bond_dim("ttn", (16, 32), 64, "none")
    net = TTN.from_weight(spec, masked)
    # a squared relative error that is zero up to float32 rounding: its root is a few eps of 1
    assert_close_scaled(float(ActivationObjective(weight, inputs)(net).detach()) ** 0.5, 0.0, scale=1.0)
    assert float(WeightObjective(TTN.fit_target(net.spec, weight))(net).detach()) > 0.5


def test_fit_is_reproducible_with_the_same_seed():
    weight = _low_rank_weight()
    spec = spec_for_bond_dim("ttn", tuple(weight.shape), 2, "tanh")
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        net = TTN(spec)
        fit(net, WeightObjective(TTN.fit_target(net.spec, weight)), steps=20, lr=1e-2)
        outputs.append(net())
    assert torch.equal(outputs[0], outputs[1])


def test_covariance_form_equals_the_direct_activation_loss_when_rank_covers_the_data():
    torch.manual_seed(0)
    weight = torch.randn(24, 32)
    inputs = torch.randn(200, 6) @ torch.randn(6, 32)  # data of rank 6
    spec = spec_for_bond_dim("ttn", (24, 32), 2, "tanh")
    net = TTN(spec)
    exact = ActivationObjective(weight, inputs)
    reduced = ActivationObjective(weight, inputs, max_rank=8)
    assert reduced.inputs.shape == (8, 32) and reduced.energy > 0.999999
    with torch.no_grad():
        assert_close_scaled(float(reduced(net)), float(exact(net)))


def test_relative_error_in_chunks_equals_the_direct_formula():
    torch.manual_seed(0)
    a, b = torch.randn(1000, 7, 3), torch.randn(1000, 7, 3)
    direct = float((a.double() - b.double()).norm() / a.double().norm())
    assert_close_scaled(relative_error(a, b, chunk_rows=64), direct, dtype=torch.float64)


def test_relative_error_of_row_blocks_equals_that_of_the_whole() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(50, 3, 2), torch.randn(50, 3, 2)
    whole = relative_error(a, b, chunk_rows=7)
    assert_close_scaled(relative_error(a, iter(b.split(11)), chunk_rows=7), whole, dtype=torch.float64)
    with pytest.raises(ValueError, match="49 rows, not 50"):
        relative_error(a, b[:49].split(11))
    with pytest.raises(ValueError, match="more rows"):
        relative_error(a[:40], b.split(11))


@pytest.mark.parametrize("arch", ["attn", "mera"])
def test_fit_without_mix_trains_the_tree_and_leaves_the_disentanglers(arch):
    """``mix=False``: the disentanglers stay bit for bit and keep no gradient; the tree moves."""
    from adntn.core.registry import generator_class
    from adntn.networks.base import Disentangler

    torch.manual_seed(0)
    weight = torch.randn(16, 16)
    from adntn.core.spec import GeneratorSpec
    from adntn.core.tensorize import choose_leg_factors

    spec = GeneratorSpec(arch, (16, 16), *choose_leg_factors(16, 16, 4), (3, 3), "tanh", mix_rank=2)
    for mix in (False, True):
        generator = generator_class(arch).from_target(spec, generator_class(arch).fit_target(spec, weight))
        mixers = [m for m in generator.modules() if isinstance(m, Disentangler)]
        assert mixers
        before = {name: value.clone() for name, value in generator.state_dict().items()}
        fit(generator, WeightObjective(generator_class(arch).fit_target(spec, weight)), steps=5, lr=1e-2, mix=mix)
        ids = {id(p) for m in mixers for p in m.parameters()}
        mixing = {name for name, p in generator.named_parameters() if id(p) in ids}
        moved = {name for name, value in generator.state_dict().items() if not torch.equal(value, before[name])}
        assert moved - mixing, "the tree must train"
        assert bool(moved & mixing) == mix
        assert all(p.requires_grad for m in mixers for p in m.parameters())
        if not mix:
            assert all(p.grad is None for m in mixers for p in m.parameters())


@pytest.mark.parametrize("objective_kind", ["weight", "activation"])
def test_an_attn_at_the_identity_fits_as_its_tree(objective_kind, monkeypatch):
    """``fit(mix=False)`` of an attn whose disentanglers are the identity trains its tree alone:
    the same cores as fitting the attn itself, and the same weight; off the identity it is the attn."""
    from adntn.core.spec import GeneratorSpec
    from adntn.core.tensorize import choose_leg_factors
    from adntn.networks.attn import ATTN

    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    spec = GeneratorSpec("attn", (48, 64), *choose_leg_factors(48, 64, 4), (3, 3), "tanh", mix_rank=2)
    start = ATTN.from_target(spec, ATTN.fit_target(spec, weight))
    assert start.mixers and start.unmixed() is start.tree

    inputs = torch.randn(40, 64)

    def objective():
        if objective_kind == "weight":
            return WeightObjective(ATTN.fit_target(spec, weight))
        return ActivationObjective(weight, inputs)

    fitted, results = {}, {}
    for route in ("tree", "attn"):
        generator = ATTN(spec)
        generator.load_state_dict(start.state_dict())
        with monkeypatch.context() as patch:
            if route == "attn":
                patch.setattr(ATTN, "unmixed", lambda self: self)
            results[route] = fit(generator, objective(), steps=8, lr=1e-2, mix=False)
        fitted[route] = generator
    # the same objective and gradients to rounding; Adam turns rounding in near-zero gradients
    # into lr-sized moves, so the cores differ by about lr, the losses far less
    assert results["tree"].initial_loss == pytest.approx(results["attn"].initial_loss, rel=1e-6)
    assert results["tree"].best_loss == pytest.approx(results["attn"].best_loss, rel=1e-3)
    assert results["tree"].best_loss < results["tree"].initial_loss
    for key, value in fitted["attn"].state_dict().items():
        assert float((fitted["tree"].state_dict()[key] - value).abs().max()) <= 8 * 1e-2 * 1.5
    assert torch.equal(fitted["tree"].mixers[0].p, start.mixers[0].p)
    with torch.no_grad():
        assert_close_scaled(fitted["tree"](), fitted["tree"].tree())
        fitted["tree"].mixers[0].p.add_(0.1)
    assert fitted["tree"].unmixed() is fitted["tree"]


@pytest.mark.parametrize("kind", ["linear", "linear-covariance", "conv"])
def test_the_mean_residual_moves_the_mean_output_onto_the_dense_one(kind):
    """Adding ``mean_residual`` to the bias gives the compressed layer the dense layer's mean
    output over the recorded inputs (per output; a convolution's over its positions too), for
    inputs with a large mean as ReLU features have; the covariance form keeps the exact mean."""
    from torch.nn import functional as F

    from adntn.networks import build

    torch.manual_seed(0)
    if kind == "conv":
        weight, inputs, bias = torch.randn(6, 3, 3, 3), torch.rand(20, 3, 8, 8) + 1.0, torch.randn(6)
        objective = ActivationObjective(weight, inputs, padding=(1, 1))
        layer = lambda w, b: F.conv2d(inputs, w, b, padding=1).mean((0, 2, 3))  # noqa: E731
    else:
        weight, inputs, bias = torch.randn(16, 32), torch.rand(100, 32) + 1.0, torch.randn(16)
        objective = ActivationObjective(weight, inputs, max_rank=4 if kind == "linear-covariance" else None)
        layer = lambda w, b: (inputs @ w.T + b).mean(0)  # noqa: E731
    net = build(spec_for_bond_dim("ttn", tuple(weight.shape), 1, "tanh"))
    with torch.no_grad():
        generated = net()
        before = (layer(generated, bias) - layer(weight, bias)).abs().max()
        corrected = layer(generated, bias + objective.mean_residual(weight, net))
    assert before > 0.1
    assert_close_scaled(corrected, layer(weight, bias), scale=float(layer(weight, bias).abs().max()))
