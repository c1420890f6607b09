"""Weight generators, one file each; ``build`` and ``core_params`` dispatch on ``spec.arch``."""

from __future__ import annotations

from adntn.core.spec import GeneratorSpec
from adntn.networks.attn import ATTN
from adntn.networks.base import Generator
from adntn.networks.mera import MERA
from adntn.networks.svd import SVD
from adntn.networks.tt import TT
from adntn.networks.ttn import TTN

GENERATORS: dict[str, type[Generator]] = {cls.arch: cls for cls in (TTN, ATTN, MERA, TT, SVD)}


def generator_class(spec: GeneratorSpec) -> type[Generator]:
    return GENERATORS[spec.arch]


def build(spec: GeneratorSpec) -> Generator:
    """A randomly initialised generator (uses torch's global RNG)."""
    return generator_class(spec)(spec)


def core_params(spec: GeneratorSpec) -> int:
    return generator_class(spec).param_count(spec)


__all__ = ["GENERATORS", "Generator", "build", "core_params", "generator_class"]
