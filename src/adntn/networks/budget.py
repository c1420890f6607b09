"""Choosing a generator's structure from a budget.

Given a layer's weight shape and either a bond dimension or a compression ratio R, build the
:class:`GeneratorSpec`. For a ratio, the chosen spec has ``core_params <= dense_params / R`` and as
many parameters as the structure allows under that bound: bond dims per level take the values
chi or chi+1 (larger near the leaves), which interpolates between uniform bonds, and the leg count
is searched when the default one cannot meet the budget or lands far below it. Everything
arch-specific comes from the arch's registered class (``levels``, ``leg_counts``,
``default_leg_count``, ``make_spec``, ``param_count``, and ``placed``, which places the chosen
spec's digits for its forward).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

from adntn.core.registry import generator_class
from adntn.core.spec import GeneratorSpec
from adntn.errors import AdntnError

MAX_BOND = 1024
PREFER_DEFAULT_LEGS = 0.75  # keep the default leg count if it gets within this share of the best


def _matrix_sides(shape: tuple[int, ...]) -> tuple[int, int]:
    """(out, in*kh*kw) of a weight shape."""
    return shape[0], math.prod(shape[1:])


def default_legs(rows: int, cols: int, arch: str = "ttn") -> int:
    """The leg count ``arch`` uses for a (rows, cols) weight unless the budget needs another."""
    return generator_class(arch).default_leg_count(rows, cols)


def _check_nonempty(shape: tuple[int, ...], label: str) -> None:
    """Refuse a weight with a zero dimension: it has no entries to generate."""
    if not shape or 0 in shape:
        raise AdntnError(f"{label} has a weight of shape ({'x'.join(map(str, shape))}) with no entries; "
                         "adntn cannot compress a layer without weights.")


def _shown_ratio(ratio: float) -> str:
    """A ratio as the messages show it: 2,010x, 11.5x, 0.667x."""
    return f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.3g}x"


def make_spec(arch: str, shape: tuple[int, ...], bond_dims: tuple[int, ...], activation: str,
              n_legs: int) -> GeneratorSpec:
    """The spec of ``arch`` for ``shape`` with ``n_legs`` legs and the given per-level bond dims."""
    return generator_class(arch).make_spec(tuple(shape), tuple(bond_dims), activation, n_legs)


def spec_for_bond_dim(arch: str, shape: tuple[int, ...], bond_dim: int, activation: str,
                      label: str = "layer") -> GeneratorSpec:
    """Uniform bond dimension ``bond_dim`` (the SVD rank for ``svd``) on the default legs."""
    _check_nonempty(shape, label)
    if bond_dim < 1:
        raise AdntnError(f"The bond dimension must be at least 1, not {bond_dim}.")
    cls = generator_class(arch)
    n_legs = cls.default_leg_count(*_matrix_sides(shape))
    return cls.placed(cls.make_spec(tuple(shape), (bond_dim,) * cls.levels(n_legs), activation, n_legs))


def _candidates(arch: str, shape: tuple[int, ...], activation: str, n_legs: int,
                budget: int) -> Iterator[GeneratorSpec]:
    """Specs with bond dims (chi+1,)*t + (chi,)*(levels-t), growing until over budget."""
    cls = generator_class(arch)
    levels = cls.levels(n_legs)
    previous = -1
    for chi in range(1, MAX_BOND + 1):
        for t in range(levels):
            spec = cls.make_spec(tuple(shape), (chi + 1,) * t + (chi,) * (levels - t), activation, n_legs)
            params = spec.core_params
            if params > budget:
                return
            yield spec
        if params == previous:  # every bond is capped by the legs: larger chi changes nothing
            return
        previous = params


def has_disentanglers(arch: str) -> bool:
    """Whether ``arch`` is a tree with disentanglers (attn, mera): its budget goes to the tree first."""
    return generator_class(arch).mix_rank > 0


def smallest_spec(arch: str, shape: tuple[int, ...], activation: str) -> GeneratorSpec:
    """The spec of ``arch`` with the fewest parameters for ``shape`` (every bond 1, best leg count;
    no disentanglers: attn's and mera's smallest is the TTN's)."""
    cls = generator_class(arch)
    specs = []
    for k in cls.leg_counts(*_matrix_sides(shape)):
        spec = cls.make_spec(tuple(shape), (1,) * cls.levels(k), activation, k)
        if has_disentanglers(arch):
            spec = replace(spec, mix_ranks=(0,) * len(cls.disentangler_sides(spec)))
        specs.append(spec)
    return min(specs, key=lambda s: s.core_params)


def useful_disentangler(sides: tuple[int, int]) -> bool:
    """Whether a disentangler on legs of these dims can do what the cores cannot: on a leg of
    dim 1 it acts on the other leg alone, a linear map the core that makes it already has."""
    return min(sides) > 1


def add_disentanglers(spec: GeneratorSpec, budget: int) -> GeneratorSpec:
    """``spec``'s tree (its bonds, as chosen) with disentanglers bought from what ``budget`` leaves:
    rank 1 in the arch's order (``disentangler_order``) wherever one fits, then a second round of
    ranks, and so on (at most D/2 each); none on a leg of dim 1 (``useful_disentangler``)."""
    cls = generator_class(spec.arch)
    sides = cls.disentangler_sides(spec)
    ranks = [0] * len(sides)
    bare = replace(spec, mix_ranks=tuple(ranks))
    left = budget - bare.core_params
    order = [i for i in cls.disentangler_order(bare) if useful_disentangler(sides[i])]
    while True:
        added = False
        for i in order:
            dim = sides[i][0] * sides[i][1]
            cost = 2 * dim  # Disentangler.param_count(dim, 1)
            if cost <= left and ranks[i] < dim // 2:
                ranks[i] += 1
                left -= cost
                added = True
        if not added:
            break
    return replace(spec, mix_ranks=tuple(ranks))


def _largest(arch: str, shape: tuple[int, ...], budget: int, activation: str) -> GeneratorSpec | None:
    """The largest spec of ``arch`` (no disentanglers added) with at most ``budget`` parameters,
    on the default leg count unless another gets much more (``PREFER_DEFAULT_LEGS``); None if none fits."""
    cls = generator_class(arch)
    rows, cols = _matrix_sides(shape)
    best: dict[int, GeneratorSpec] = {}
    for n_legs in cls.leg_counts(rows, cols):
        fitting = list(_candidates(arch, shape, activation, n_legs, budget))
        if fitting:
            best[n_legs] = max(fitting, key=lambda s: s.core_params)
    if not best:
        return None
    top = max(best.values(), key=lambda s: s.core_params)
    preferred = best.get(cls.default_leg_count(rows, cols))
    if preferred is not None and preferred.core_params >= PREFER_DEFAULT_LEGS * top.core_params:
        return preferred
    return top


def spec_for_ratio(arch: str, shape: tuple[int, ...], ratio: float, activation: str,
                   label: str = "layer") -> GeneratorSpec:
    """The largest spec of ``arch`` with dense_params / core_params >= ``ratio``."""
    _check_nonempty(shape, label)
    if not ratio > 1:
        raise AdntnError(f"The compression ratio must be greater than 1, not {ratio}.")
    # dense / ratio rounded down, forgiving float rounding: a spec's own ``ratio`` reaches it
    budget = math.floor(math.prod(shape) / ratio * (1 + 1e-12))
    return spec_for_budget(arch, shape, budget, activation, label=label, asked=ratio)


def spec_for_budget(arch: str, shape: tuple[int, ...], budget: int, activation: str,
                    label: str = "layer", asked: float | None = None) -> GeneratorSpec:
    """The largest spec of ``arch`` with at most ``budget`` core parameters.

    For attn and mera, the tree is the TTN's for that budget (same legs and bonds) and the
    disentanglers get what it leaves (``add_disentanglers``): at equal parameters they contain
    that TTN (their disentanglers start at the identity), so they need never be worse.
    """
    _check_nonempty(shape, label)
    mixed = has_disentanglers(arch)
    tree = _largest("ttn" if mixed else arch, shape, budget, activation) if budget >= 1 else None
    if tree is None:
        smallest = smallest_spec(arch, shape, activation)
        reach = f"reach {_shown_ratio(asked)}" if asked is not None else f"fit in {budget:,} parameters"
        noun = "parameter" if smallest.core_params == 1 else "parameters"
        raise AdntnError(
            f"{label} ({'x'.join(map(str, shape))}) cannot {reach} with --arch {arch}: its smallest "
            f"generator has {smallest.core_params:,} {noun} ({_shown_ratio(smallest.ratio)})."
        )
    cls = generator_class(arch)
    if not mixed:
        return cls.placed(tree)
    spec = cls.make_spec(tuple(shape), tree.bond_dims, activation, tree.n_legs)
    return cls.placed(add_disentanglers(spec, budget))
