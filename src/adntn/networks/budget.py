"""Choosing a generator's structure from a budget.

Given a layer's weight shape and either a bond dimension or a compression ratio R, build the
:class:`GeneratorSpec`. For a ratio, the chosen spec has ``core_params <= dense_params / R`` and as
many parameters as the structure allows under that bound: bond dims per level take the values
chi or chi+1 (larger near the leaves), which interpolates between uniform bonds, and the leg count
is searched when the default one cannot meet the budget or lands far below it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from adntn.errors import AdntnError
from adntn.core.spec import GeneratorSpec
from adntn.core.tensorize import choose_leg_factors, max_legs, smooth_ceiling

TREE_ARCHS = ("ttn", "attn", "mera")
DEFAULT_MIX_RANK = 1
MAX_BOND = 1024
PREFER_DEFAULT_LEGS = 0.75  # keep the default leg count if it gets within this share of the best


def default_legs(rows: int, cols: int) -> int:
    """About 2^3-sized legs: K = 2^round(log2(log2(N) / 3)), between 2 and :func:`max_legs`."""
    n = smooth_ceiling(rows) * smooth_ceiling(cols)
    k = 1 << max(1, round(math.log2(max(math.log2(n) / 3, 2))))
    return max(2, min(k, max_legs(rows, cols)))


def _check_nonempty(shape: tuple[int, ...], label: str) -> None:
    """Refuse a weight with a zero dimension: it has no entries to generate."""
    if not shape or 0 in shape:
        raise AdntnError(f"{label} has a weight of shape ({'x'.join(map(str, shape))}) with no entries; "
                         "adntn cannot compress a layer without weights.")


def _level_count(arch: str, n_legs: int) -> int:
    return 1 if arch == "svd" else (int(math.log2(n_legs)) if arch in TREE_ARCHS else n_legs - 1)


def make_spec(arch: str, shape: tuple[int, ...], bond_dims: tuple[int, ...], activation: str,
              n_legs: int) -> GeneratorSpec:
    """The spec of ``arch`` for ``shape`` with ``n_legs`` legs and the given per-level bond dims."""
    rows, cols = shape[0], math.prod(shape[1:])
    if arch == "svd":
        return GeneratorSpec("svd", tuple(shape), (rows,), (cols,), bond_dims, "none")
    out_dims, in_dims = choose_leg_factors(rows, cols, n_legs)
    return GeneratorSpec(
        arch, tuple(shape), out_dims, in_dims, bond_dims,
        activation="none" if arch == "tt" else activation,
        mix_rank=DEFAULT_MIX_RANK if arch in ("attn", "mera") else 0,
    )


def spec_for_bond_dim(arch: str, shape: tuple[int, ...], bond_dim: int, activation: str,
                      label: str = "layer") -> GeneratorSpec:
    """Uniform bond dimension ``bond_dim`` (the SVD rank for ``svd``) on the default legs."""
    _check_nonempty(shape, label)
    if bond_dim < 1:
        raise AdntnError(f"The bond dimension must be at least 1, not {bond_dim}.")
    n_legs = default_legs(shape[0], math.prod(shape[1:]))
    return make_spec(arch, shape, (bond_dim,) * _level_count(arch, n_legs), activation, n_legs)


def _leg_counts(arch: str, rows: int, cols: int) -> list[int]:
    if arch == "svd":
        return [1]
    top = max_legs(rows, cols)
    return [1 << e for e in range(1, int(math.log2(top)) + 1)]


def _candidates(arch: str, shape: tuple[int, ...], activation: str, n_legs: int,
                budget: int) -> Iterator[GeneratorSpec]:
    """Specs with bond dims (chi+1,)*t + (chi,)*(levels-t), growing until over budget."""
    levels = _level_count(arch, n_legs)
    previous = -1
    for chi in range(1, MAX_BOND + 1):
        for t in range(levels):
            spec = make_spec(arch, shape, (chi + 1,) * t + (chi,) * (levels - t), activation, n_legs)
            params = spec.core_params
            if params > budget:
                return
            yield spec
        if params == previous:  # every bond is capped by the legs: larger chi changes nothing
            return
        previous = params


def smallest_spec(arch: str, shape: tuple[int, ...], activation: str) -> GeneratorSpec:
    """The spec of ``arch`` with the fewest parameters for ``shape`` (every bond 1, best leg count)."""
    rows, cols = shape[0], math.prod(shape[1:])
    return min((make_spec(arch, shape, (1,) * _level_count(arch, k), activation, k) for k in _leg_counts(arch, rows, cols)),
               key=lambda s: s.core_params)


def spec_for_ratio(arch: str, shape: tuple[int, ...], ratio: float, activation: str,
                   label: str = "layer") -> GeneratorSpec:
    """The largest spec of ``arch`` with dense_params / core_params >= ``ratio``."""
    _check_nonempty(shape, label)
    if not ratio > 1:
        raise AdntnError(f"The compression ratio must be greater than 1, not {ratio}.")
    dense = math.prod(shape)
    budget = int(dense // ratio)
    rows, cols = shape[0], math.prod(shape[1:])
    best: dict[int, GeneratorSpec] = {}
    for n_legs in _leg_counts(arch, rows, cols):
        fitting = list(_candidates(arch, shape, activation, n_legs, budget))
        if fitting:
            best[n_legs] = max(fitting, key=lambda s: s.core_params)
    if not best:
        smallest = smallest_spec(arch, shape, activation)
        asked = f"{ratio:,.0f}" if ratio >= 1000 else f"{ratio:g}"
        raise AdntnError(
            f"{label} ({'x'.join(map(str, shape))}) cannot reach {asked}x with --arch {arch}: its smallest "
            f"generator has {smallest.core_params} parameters ({smallest.ratio:,.0f}x)."
        )
    top = max(best.values(), key=lambda s: s.core_params)
    preferred = best.get(default_legs(rows, cols))
    if preferred is not None and preferred.core_params >= PREFER_DEFAULT_LEGS * top.core_params:
        return preferred
    return top
