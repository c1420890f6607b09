"""One parameter budget for all compressed layers: ``--budget N`` and ``--ratio total:R``.

The budget is split by measured sensitivity, not in proportion to the layers' sizes. For each
layer, a ladder of candidate sizes (from its smallest generator up, each about sqrt(2) times the
last, via ``networks.budget.spec_for_budget``) is fitted briefly (the SVD-based initialisation,
then ``PROBE_STEPS`` Adam steps) and its relative error measured: in activation space,
||X W^T - X G^T|| / ||X W^T|| on inputs X recorded from the dense model on a few training images,
when there is data (``--data``); else in weight space, ||W - G|| / ||W||. (At 10,000x the weight
error of VGG-16's fc6 is 0.998 for every candidate: weight space cannot tell them apart there.)
Then, starting from every layer at its smallest candidate, the next parameters go, again
and again, to the layer and larger candidate whose error drops most per parameter added, as long
as the total fits: a greedy marginal allocation of the summed relative errors. ``Allocation``
keeps every candidate with its error and the choice, for the report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from adntn.core.registry import generator_class
from adntn.core.spec import GeneratorSpec
from adntn.errors import AdntnError
from adntn.networks.budget import smallest_spec, spec_for_budget
from adntn.training.fit import fit
from adntn.training.objectives import ActivationObjective, WeightObjective

PROBE_STEPS = 20  # Adam steps of each candidate's probe fit
PROBE_IMAGES = 1024  # training images whose layer inputs the probes fit (stratified by class)
PROBE_RANK = 256  # input directions kept by a linear layer's activation probe (as the activation stage)
LADDER = math.sqrt(2)  # each candidate budget is this times the last
_SUFFIXES = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def parse_budget(text: str | int) -> int:
    """``--budget``: a parameter count, ``424``, ``10k``, ``1.5M`` (k, M, G; any case)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmg]?)\s*", str(text), flags=re.IGNORECASE)
        if match is None:
            raise AdntnError(f"--budget takes a parameter count such as 424, 10k or 1.5M, not '{text}'.")
        value = float(match.group(1)) * _SUFFIXES[match.group(2).lower()]
        if value != int(value):
            raise AdntnError(f"--budget must be a whole number of parameters, not {text} ({value:g}).")
        value = int(value)
    if value < 1:
        raise AdntnError(f"--budget must be at least 1 parameter, not {value}.")
    return value


@dataclass(frozen=True)
class Candidate:
    spec: GeneratorSpec
    error: float  # relative error after the probe fit (activation space with data, else weight space)

    @property
    def params(self) -> int:
        return self.spec.core_params


@dataclass(frozen=True)
class Allocation:
    """The chosen spec per layer and why: each layer's candidates and the greedy steps."""

    total: int
    labels: tuple[str, ...]
    candidates: tuple[tuple[Candidate, ...], ...]
    chosen: tuple[int, ...]  # index into each layer's candidates
    measure: str

    @property
    def specs(self) -> tuple[GeneratorSpec, ...]:
        return tuple(c[i].spec for c, i in zip(self.candidates, self.chosen))

    @property
    def used(self) -> int:
        return sum(spec.core_params for spec in self.specs)

    def describe(self) -> dict:
        return {
            "budget": self.total,
            "core_params": self.used,
            "measure": self.measure,
            "rule": "from each layer's smallest candidate, the next parameters go to the layer and larger "
                    "candidate with the largest drop in relative error per parameter added, while the "
                    "total fits",
            "layers": [
                {"layer": label, "core_params": cands[i].params, "rel_error": round(cands[i].error, 4),
                 "candidates": [{"core_params": c.params, "bond_dims": list(c.spec.bond_dims),
                                 "n_legs": c.spec.n_legs, "mix_ranks": list(c.spec.mix_ranks or []),
                                 "rel_error": round(c.error, 4)} for c in cands]}
                for label, cands, i in zip(self.labels, self.candidates, self.chosen)
            ],
        }


def candidate_budgets(smallest: int, largest: int) -> list[int]:
    """``smallest``, then about ``LADDER`` times the last, up to ``largest`` (included)."""
    budgets, value = [], float(smallest)
    while value < largest:
        budgets.append(int(value))
        value *= LADDER
    return [*budgets, largest]


def ladder(arch: str, shape: tuple[int, ...], activation: str, largest: int, label: str) -> list[GeneratorSpec]:
    """Distinct specs of ``arch`` for ``shape`` from its smallest up to ``largest`` parameters."""
    specs: dict[int, GeneratorSpec] = {}
    low = smallest_spec(arch, shape, activation).core_params
    for budget in candidate_budgets(low, max(low, min(largest, math.prod(shape)))):
        spec = spec_for_budget(arch, shape, budget, activation, label=label)
        specs.setdefault(spec.core_params, spec)
    return [specs[k] for k in sorted(specs)]


def probe_error(weight: torch.Tensor, spec: GeneratorSpec, steps: int = PROBE_STEPS, lr: float = 1e-2,
                seed: int = 0, targets: dict | None = None, activation: ActivationObjective | None = None) -> float:
    """Relative error of ``spec`` fitted to ``weight``: SVD-based init, then ``steps`` Adam steps
    (the best seen; ``fit``) on ``activation`` (an ``ActivationObjective``) when given, else in
    weight space. ``targets`` caches the leg-form targets by leg factors."""
    cls = generator_class(spec.arch)
    key = (spec.arch == "svd", spec.out_dims, spec.in_dims)
    target = None if targets is None else targets.get(key)
    if target is None:
        target = cls.fit_target(spec, weight)
        if targets is not None:
            targets[key] = target
    torch.manual_seed(seed)
    generator = cls.from_target(spec, target)
    result = fit(generator, WeightObjective(target) if activation is None else activation, steps=steps, lr=lr)
    return math.sqrt(max(result.best_loss, 0.0))


def greedy(candidates: Sequence[Sequence[Candidate]], total: int) -> tuple[int, ...]:
    """Indices of the chosen candidate per layer (see the module docstring)."""
    chosen = [0] * len(candidates)
    left = total - sum(c[0].params for c in candidates)
    while True:
        best, move = 0.0, None
        for layer, cands in enumerate(candidates):
            now = cands[chosen[layer]]
            for j in range(chosen[layer] + 1, len(cands)):
                extra = cands[j].params - now.params
                if 0 < extra <= left:
                    gain = (now.error - cands[j].error) / extra
                    if gain > best:
                        best, move = gain, (layer, j, extra)
        if move is None:
            return tuple(chosen)
        layer, j, extra = move
        chosen[layer], left = j, left - extra


def allocate(layers: Sequence[tuple[str, torch.Tensor]], total: int, arch: str, activation: str, *,
             steps: int = PROBE_STEPS, lr: float = 1e-2, seed: int = 0,
             objectives: Sequence[ActivationObjective | None] | None = None,
             on_layer: Callable[[str, int], None] | None = None) -> Allocation:
    """Split ``total`` core parameters between ``layers`` ((label, weight) pairs) by sensitivity:
    each layer's probes are fitted on its ``objectives`` entry (activation space) when given."""
    objectives = list(objectives) if objectives is not None else [None] * len(layers)
    smallest = [smallest_spec(arch, tuple(w.shape), activation).core_params for _, w in layers]
    if sum(smallest) > total:
        parts = ", ".join(f"{label} {n:,}" for (label, _), n in zip(layers, smallest))
        raise AdntnError(f"--budget {total:,} is below the smallest generators of --arch {arch} for these layers: "
                         f"{sum(smallest):,} parameters ({parts}).")
    all_candidates = []
    for (label, weight), low, objective in zip(layers, smallest, objectives):
        specs = ladder(arch, tuple(weight.shape), activation, total - (sum(smallest) - low), label)
        if on_layer is not None:
            on_layer(label, len(specs))
        targets: dict = {}
        all_candidates.append(tuple(Candidate(spec, probe_error(weight, spec, steps, lr, seed, targets, objective))
                                    for spec in specs))
        del targets
    chosen = greedy(all_candidates, total)
    space = ("weight error ||W - G|| / ||W||" if all(o is None for o in objectives) else
             "activation error ||X W^T - X G^T|| / ||X W^T|| on the layer's recorded inputs X")
    measure = f"relative {space}, after the SVD-based init and {steps} Adam steps (lr {lr:g}) on it"
    return Allocation(total, tuple(label for label, _ in layers), tuple(all_candidates), chosen, measure)


def total_budget(layers, options) -> int:
    """``options.budget``, or the layers' dense parameters / ``options.total_ratio`` (rounded down)."""
    if options.budget is not None:
        return options.budget
    dense = sum(math.prod(layer.weight_shape) for layer in layers)
    return math.floor(dense / options.total_ratio * (1 + 1e-12))


def allocate_layers(source, layers, options, progress, inputs: dict[str, torch.Tensor] | None = None) -> Allocation:
    """``allocate`` for the compressed ``layers`` of ``source`` under ``--budget`` / ``--ratio total:R``;
    ``inputs`` (module name -> recorded layer inputs) makes the probes activation-space ones."""
    total = total_budget(layers, options)
    pairs = [(layer.label, source.state[layer.weight_key]) for layer in layers]
    objectives = None
    if inputs is not None:
        objectives = [ActivationObjective(source.state[layer.weight_key], inputs[layer.module], layer.stride,
                                          layer.padding, max_rank=PROBE_RANK) for layer in layers]
    with progress.stage("allocate"):
        allocation = allocate(pairs, total, options.arch, options.activation, lr=options.lr, seed=options.seed,
                              objectives=objectives,
                              on_layer=lambda label, n: progress.note(
                                  f"allocating the budget of {total:,}: probing {n} sizes of {label}"))
    for row in allocation.describe()["layers"]:
        progress.note(f"{row['layer']}: {row['core_params']:,} core parameters (relative error "
                      f"{row['rel_error']:.3f} after the probe fit)")
    return allocation
