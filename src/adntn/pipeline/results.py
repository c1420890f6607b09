"""The value each compress stage passes on for one layer."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from adntn.io.archive import CompressedLayer
from adntn.models.architectures import LayerInfo


@dataclass(frozen=True)
class LayerResult:
    """One compressed layer and what its stages measured (the report row's numbers)."""

    layer: LayerInfo
    compressed: CompressedLayer
    stats: Mapping[str, float | int] = field(default_factory=dict)

    def with_stats(self, **more: float | int) -> LayerResult:
        return replace(self, stats={**self.stats, **more})


def copy_generator(result: LayerResult) -> LayerResult:
    """The same layer with a copy of its generator (for a stage that trains it)."""
    return replace(result, compressed=replace(result.compressed, generator=copy.deepcopy(result.compressed.generator)))
