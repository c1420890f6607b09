"""Weight generators, one file each. Importing this package registers every arch
(``core.registry``); ``build``, ``from_weight`` and ``core_params`` dispatch on ``spec.arch``."""

from __future__ import annotations

import torch

from adntn.core.registry import archs, generator_class
from adntn.core.spec import GeneratorSpec
from adntn.networks.base import Generator
from adntn.networks.ttn import TTN
from adntn.networks.attn import ATTN
from adntn.networks.mera import MERA
from adntn.networks.tt import TT
from adntn.networks.svd import SVD

GENERATORS: dict[str, type[Generator]] = {arch: generator_class(arch) for arch in archs()}


def build(spec: GeneratorSpec) -> Generator:
    """A randomly initialised generator for ``spec`` (uses torch's global RNG)."""
    return generator_class(spec.arch)(spec)


def from_weight(spec: GeneratorSpec, weight: torch.Tensor) -> Generator:
    """A generator for ``spec`` initialised to fit ``weight`` (its SVD-based fit)."""
    return generator_class(spec.arch).from_weight(spec, weight)


def core_params(spec: GeneratorSpec) -> int:
    return spec.core_params


__all__ = ["ATTN", "GENERATORS", "MERA", "SVD", "TT", "TTN", "Generator", "archs", "build", "core_params",
           "from_weight", "generator_class"]
