"""One parameter budget for all compressed layers: ``--budget N`` and ``--ratio total:R``.

The budget is split by measured sensitivity, not in proportion to the layers' sizes. For each
layer, a ladder of candidate sizes (from its smallest generator up, each about sqrt(2) times the
last, via ``networks.budget.spec_for_budget``) is measured by a *measure*: a function from a
candidate spec to a number, lower is better. With data and every compressed layer in the
classifier, the measure is a short distillation probe (``pipeline.task.distillation_measures``):
the candidate alone replaces its layer, is fitted briefly and fine-tuned for a few steps on
cached trunk features, and its distillation loss is measured on training rows it did not see.
(Errors before fine-tuning do not rank sizes: at 10,000x the activation error of VGG-16's fc6
moves 0.830 -> 0.827 from 60 to 329 parameters and its weight error stays at 0.998, while the
fine-tuned accuracy moves by points.) Otherwise it is the relative error after a brief fit
(``PROBE_STEPS`` Adam steps from the SVD-based init): in activation space,
||X W^T - X G^T|| / ||X W^T|| on inputs X recorded from the dense model, with data; in weight
space, ||W - G|| / ||W||, without.

Then, starting from every layer at its smallest candidate, the next parameters go, again and
again, to the layer and larger candidate whose measure drops most *relatively* per parameter
added (the drop in log measure), as long as the total fits: a greedy marginal allocation of the
summed log measures, i.e. of their product. Relative, not absolute: the layers are fine-tuned
together, and a layer whose probe loss is large on its own can still be carried by the others.
On the CIFAR-10 VGG-16-BN at ``--budget 200`` for fc6+fc7 (3 epochs, seed 0), absolute drops chose
82 + 106 parameters (probe losses 3.22 + 1.81) and reached 0.8539 top-1; relative drops choose
125 + 73 (0.52 and 5.37), which reached 0.8737 (0.8741 over three seeds; dense 0.8780). At
``--budget 424`` both choose 158 + 260. ``Allocation`` keeps every candidate with its measure and the choice, for the report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from adntn.core.registry import generator_class
from adntn.core.spec import GeneratorSpec
from adntn.errors import AdntnError
from adntn.networks.base import Generator
from adntn.networks.budget import smallest_spec, spec_for_budget
from adntn.training.fit import fit
from adntn.training.objectives import ActivationObjective, WeightObjective

PROBE_STEPS = 20  # Adam steps of each candidate's probe fit
LADDER = math.sqrt(2)  # each candidate budget is this times the last
MEASURE_FLOOR = 1e-12  # a measure of 0 counts as this in the log (an exact fit)
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
    value: float  # the measure of this size (lower is better): see the module docstring

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
                    "candidate with the largest relative drop in the measure (in log measure) per "
                    "parameter added, while the total fits",
            "layers": [
                {"layer": label, "core_params": cands[i].params, "measure": round(cands[i].value, 5),
                 "candidates": [{"core_params": c.params, "bond_dims": list(c.spec.bond_dims),
                                 "n_legs": c.spec.n_legs, "mix_ranks": list(c.spec.mix_ranks or []),
                                 "measure": round(c.value, 5)} for c in cands]}
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
    """Distinct specs of ``arch`` for ``shape`` from its smallest up to ``largest`` parameters.

    For attn and mera each candidate's tree is offered bare as well (its disentanglers at rank
    0: the TTN of those cores), so the allocation never has to pay for disentanglers to get a
    tree: at --budget 424 on the CIFAR-10 VGG-16-BN, mera's fc6 ladder jumped from 114 to 166
    parameters (the 158-parameter tree plus one disentangler, probe 0.44 against the bare tree's
    0.40), and the split went 238 + 182 (0.8754 top-1) where the TTN's went 158 + 260 (0.8775)."""
    specs: dict[int, GeneratorSpec] = {}
    low = smallest_spec(arch, shape, activation).core_params
    for budget in candidate_budgets(low, max(low, min(largest, math.prod(shape)))):
        spec = spec_for_budget(arch, shape, budget, activation, label=label)
        if spec.mix_ranks:
            bare = replace(spec, mix_ranks=(0,) * len(spec.mix_ranks))
            specs.setdefault(bare.core_params, bare)
        specs.setdefault(spec.core_params, spec)
    return [specs[k] for k in sorted(specs)]


Measure = Callable[[GeneratorSpec], float]  # a candidate's measure, lower is better


def fit_measure(weight: torch.Tensor, objective: ActivationObjective | None = None, *, steps: int = PROBE_STEPS,
                lr: float = 1e-2, seed: int = 0) -> Measure:
    """A candidate's relative error after :func:`probe_fit` to ``weight`` (on ``objective`` when
    given, with the disentanglers at the identity as the data-aware stages keep them)."""
    targets: dict = {}
    return lambda spec: probe_fit(weight, spec, targets, objective, steps=steps, lr=lr, seed=seed,
                                  mix=objective is None)[1]


def probe_fit(weight: torch.Tensor, spec: GeneratorSpec, targets: dict, objective: ActivationObjective | None = None,
              *, steps: int = PROBE_STEPS, lr: float = 1e-2, seed: int = 0, mix: bool = True) -> tuple[Generator, float]:
    """``spec``'s generator fitted briefly to ``weight`` and its relative error: SVD-based init, then
    ``steps`` Adam steps (the best seen; ``fit``) on ``objective`` (activation space) when given,
    else in weight space (``mix``: the disentanglers train too). ``targets`` caches the leg-form
    targets by leg factorisation."""
    cls = generator_class(spec.arch)
    key = (spec.arch == "svd", spec.out_dims, spec.in_dims)
    if key not in targets:
        targets[key] = cls.fit_target(spec, weight)
    torch.manual_seed(seed)
    generator = cls.from_target(spec, targets[key])
    result = fit(generator, WeightObjective(targets[key]) if objective is None else objective, steps=steps, lr=lr,
                 mix=mix)
    return generator, math.sqrt(max(result.best_loss, 0.0))


def greedy(candidates: Sequence[Sequence[Candidate]], total: int) -> tuple[int, ...]:
    """Indices of the chosen candidate per layer (see the module docstring)."""
    chosen = [0] * len(candidates)
    left = total - sum(c[0].params for c in candidates)
    logs = [[math.log(max(c.value, MEASURE_FLOOR)) for c in cands] for cands in candidates]
    while True:
        best, move = 0.0, None
        for layer, cands in enumerate(candidates):
            now = cands[chosen[layer]]
            for j in range(chosen[layer] + 1, len(cands)):
                extra = cands[j].params - now.params
                if 0 < extra <= left:
                    gain = (logs[layer][chosen[layer]] - logs[layer][j]) / extra
                    if gain > best:
                        best, move = gain, (layer, j, extra)
        if move is None:
            return tuple(chosen)
        layer, j, extra = move
        chosen[layer], left = j, left - extra


def allocate(layers: Sequence[tuple[str, tuple[int, ...]]], total: int, arch: str, activation: str,
             measures: Sequence[Measure], measure_name: str,
             on_layer: Callable[[str, int], None] | None = None) -> Allocation:
    """Split ``total`` core parameters between ``layers`` ((label, weight shape) pairs) by
    sensitivity: every candidate size of layer i is measured by ``measures[i]``."""
    smallest = [smallest_spec(arch, shape, activation).core_params for _, shape in layers]
    if sum(smallest) > total:
        parts = ", ".join(f"{label} {n:,}" for (label, _), n in zip(layers, smallest))
        raise AdntnError(f"--budget {total:,} is below the smallest generators of --arch {arch} for these layers: "
                         f"{sum(smallest):,} parameters ({parts}).")
    all_candidates = []
    for (label, shape), low, measure in zip(layers, smallest, measures):
        specs = ladder(arch, shape, activation, total - (sum(smallest) - low), label)
        if on_layer is not None:
            on_layer(label, len(specs))
        all_candidates.append(tuple(Candidate(spec, measure(spec)) for spec in specs))
    chosen = greedy(all_candidates, total)
    return Allocation(total, tuple(label for label, _ in layers), tuple(all_candidates), chosen, measure_name)


def fit_measures(weights: Sequence[torch.Tensor], objectives: Sequence[ActivationObjective] | None, *,
                 steps: int = PROBE_STEPS, lr: float = 1e-2, seed: int = 0) -> tuple[list[Measure], str]:
    """:func:`fit_measure` for each layer (activation space when ``objectives`` are given) and
    the report's words for it."""
    objectives = list(objectives) if objectives is not None else [None] * len(weights)
    space = ("weight error ||W - G|| / ||W||" if objectives[0] is None else
             "activation error ||X W^T - X G^T|| / ||X W^T|| on the layer's recorded inputs X")
    name = f"relative {space}, after the SVD-based init and {steps} Adam steps (lr {lr:g}) on it"
    return [fit_measure(w, o, steps=steps, lr=lr, seed=seed) for w, o in zip(weights, objectives)], name


def total_budget(layers, options) -> int:
    """``options.budget``, or the layers' dense parameters / ``options.total_ratio`` (rounded down)."""
    if options.budget is not None:
        return options.budget
    dense = sum(math.prod(layer.weight_shape) for layer in layers)
    return math.floor(dense / options.total_ratio * (1 + 1e-12))


def allocate_layers(layers, options, progress, measures: Sequence[Measure], measure_name: str) -> Allocation:
    """``allocate`` for the compressed ``layers`` (``LayerInfo``) under ``--budget`` /
    ``--ratio total:R``, each measured by its entry of ``measures``."""
    total = total_budget(layers, options)
    with progress.stage("allocate"):
        allocation = allocate([(layer.label, tuple(layer.weight_shape)) for layer in layers], total, options.arch,
                              options.activation, measures, measure_name,
                              on_layer=lambda label, n: progress.note(
                                  f"allocating the budget of {total:,}: probing {n} sizes of {label}"))
    for row in allocation.describe()["layers"]:
        progress.note(f"{row['layer']}: {row['core_params']:,} core parameters (measure {row['measure']:.4g})")
    return allocation
