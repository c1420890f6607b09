"""The generator spec: the single source of truth for one compressed layer.

A :class:`GeneratorSpec` says which tensor network generates a weight and how that weight is cut
into legs. Construction (``adntn.networks.build``), parameter counting (``spec.core_params``, from
the arch's registered class), the safetensors metadata and the report are all derived from it.

Tensorisation: a weight of ``shape`` (out, in) or (out, in, kh, kw) is viewed as a matrix
(out, in*kh*kw), zero-padded to (prod(out_dims), prod(in_dims)) and reshaped so that row digit
o_k and column digit i_k form physical leg k of dimension ``leg_dims[k] = out_dims[k]*in_dims[k]``
(the MPO / TT-matrix pairing, coarse to fine).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from adntn.core.registry import generator_class
from adntn.errors import AdntnError

ACTIVATIONS = ("tanh", "gelu", "relu", "none")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class GeneratorSpec:
    """Structure of one generator.

    Attributes:
        arch: a registered generator (``core.registry.archs()``): ``ttn`` | ``attn`` | ``mera``
            (ADNTN generators) or ``tt`` | ``svd`` (baselines).
        shape: the dense weight's shape, e.g. ``(4096, 25088)`` or ``(64, 3, 3, 3)``.
        out_dims: K factors of the padded row count (``svd``: ``(rows,)``).
        in_dims: K factors of the padded column count (``svd``: ``(cols,)``).
        bond_dims: maximum bond dimension per tree level for ttn/attn/mera (level 0 is the bond
            above a leaf, level L-1 the bonds into the root); per TT bond for ``tt`` (K-1 values);
            ``(rank,)`` for ``svd``. Each actual bond is further capped by what the legs below
            and above it can carry.
        activation: the nonlinearity sigma between levels (``none`` gives a linear network).
        mix_rank: rank of each disentangler (attn, mera); 0 for the other archs.
        mix_ranks: the rank of each disentangler on its own, in the arch's order (attn: the boundary
            pairs k = 1, 3, ...; mera: those of level 0, the physical legs, then level 1, ...),
            0 where there is none; None (the default, and every archive written before it
            existed): every disentangler at ``mix_rank``. Budgets set it, so a tree can keep the
            bonds the TTN would get and disentanglers go only where parameters are left.
    """

    arch: str
    shape: tuple[int, ...]
    out_dims: tuple[int, ...]
    in_dims: tuple[int, ...]
    bond_dims: tuple[int, ...]
    activation: str = "tanh"
    mix_rank: int = 0
    version: int = field(default=FORMAT_VERSION)
    mix_ranks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        generator_class(self.arch)  # a registered arch, else the user's error
        if self.activation not in ACTIVATIONS:
            raise AdntnError(
                f"Unknown activation '{self.activation}'; choose one of {', '.join(ACTIVATIONS)}."
            )
        if len(self.out_dims) != len(self.in_dims):
            raise ValueError("out_dims and in_dims must have one factor per leg")
        if any(b < 1 for b in self.bond_dims):
            raise AdntnError("Bond dimensions must be at least 1.")
        if self.mix_ranks is not None:
            if any(r < 0 for r in self.mix_ranks):
                raise AdntnError("Disentangler ranks must be 0 or more.")
            count = len(generator_class(self.arch).disentangler_dims(self))
            if len(self.mix_ranks) != count:
                raise ValueError(f"mix_ranks has {len(self.mix_ranks)} values for {count} disentanglers")
        if self.rows < self.matrix_shape[0] or self.cols < self.matrix_shape[1]:
            raise ValueError("leg factors must cover the weight matrix")

    @property
    def n_legs(self) -> int:
        return len(self.out_dims)

    @property
    def leg_dims(self) -> tuple[int, ...]:
        return tuple(o * i for o, i in zip(self.out_dims, self.in_dims))

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The weight as a matrix: (out, in*kh*kw)."""
        return self.shape[0], math.prod(self.shape[1:])

    @property
    def rows(self) -> int:
        return math.prod(self.out_dims)

    @property
    def cols(self) -> int:
        return math.prod(self.in_dims)

    @property
    def disentangler_ranks(self) -> tuple[int, ...]:
        """The rank of each disentangler (``mix_ranks``, else ``mix_rank`` for every one)."""
        if self.mix_ranks is not None:
            return self.mix_ranks
        return (self.mix_rank,) * len(generator_class(self.arch).disentangler_dims(self))

    @property
    def dense_params(self) -> int:
        return math.prod(self.shape)

    @property
    def core_params(self) -> int:
        """Number of stored values that generate the weight (bias not included)."""
        return generator_class(self.arch).param_count(self)

    @property
    def ratio(self) -> float:
        return self.dense_params / self.core_params

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GeneratorSpec:
        raw = json.loads(text)
        for key in ("shape", "out_dims", "in_dims", "bond_dims"):
            raw[key] = tuple(raw[key])
        if raw.get("mix_ranks") is not None:
            raw["mix_ranks"] = tuple(raw["mix_ranks"])
        return cls(**raw)
