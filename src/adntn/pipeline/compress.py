"""The compress pipeline: checkpoint -> generators -> compressed directory.

Stages, in order:
1. weight space: each chosen layer's generator is initialised by an SVD-based fit of its weight
   and refined on ||W - G|| / ||W|| (``--steps``, ``--lr``);
2. activation space (with ``--data``): refined on the layer's outputs for inputs recorded from the
   dense model on training images;
3. task-aware (with ``--data``): all compressed layers fine-tuned together by cross-entropy plus
   distillation from the dense model (see :mod:`adntn.task`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from adntn.version import __version__
from adntn.models.architectures import LayerInfo, ModelInfo, detect_model, resolve_layers
from adntn.io.archive import CompressedLayer, check_destination, materialize_rows, write_archive
from adntn.networks.budget import spec_for_bond_dim, spec_for_ratio
from adntn.io.checkpoint import check_finite, file_sha256, load_state_dict
from adntn.memory import release_pages
from adntn.errors import AdntnError
from adntn.training.fit import fit
from adntn.networks import generator_class
from adntn.training.objectives import WeightObjective, relative_error
from adntn.progress import Progress
from adntn.core.spec import ARCHS, FORMAT_VERSION

DEFAULT_RATIO = 2000.0
TARGET_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --target-dtype
DATA_FREE_WARNING = 0.5  # relative weight error above which a data-free layer is unlikely to work
BIAS_POLICY = "dense: each compressed layer keeps its bias as stored values (bias_params), not counted in core_params"


@dataclass
class FitSettings:
    """How each layer's generator is chosen and fitted (``adntn compress`` flags)."""

    arch: str = "ttn"
    ratio: float | None = None
    bond_dim: int | None = None
    layer_ratios: dict[str, float] = field(default_factory=dict)
    activation: str = "tanh"
    steps: int = 200
    lr: float = 1e-2
    seed: int = 0
    device: str = "cpu"
    target_dtype: str = "float32"

    def __post_init__(self) -> None:
        resolve_device(self.device)
        if self.arch not in ARCHS:
            raise AdntnError(f"Unknown arch '{self.arch}'; choose one of {', '.join(ARCHS)}.")
        if (self.ratio is not None or self.layer_ratios) and self.bond_dim is not None:
            raise AdntnError("Give either --ratio or --bond-dim, not both.")
        if self.ratio is None and self.bond_dim is None and not self.layer_ratios:
            self.ratio = DEFAULT_RATIO
        if self.steps < 0:
            raise AdntnError(f"--steps must be 0 or more, not {self.steps}.")
        if not self.lr > 0:
            raise AdntnError(f"--lr must be positive, not {self.lr}.")
        if self.target_dtype not in TARGET_DTYPES:
            raise AdntnError(f"--target-dtype must be one of {', '.join(TARGET_DTYPES)}, not '{self.target_dtype}'.")


def resolve_device(name: str) -> torch.device:
    """``--device``: cpu, cuda or cuda:N, refused with a sentence when it is not there."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AdntnError(f"Unknown device '{name}'; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdntnError(f"--device {name} was asked for, but no CUDA GPU is available here.")
    if device.type not in ("cpu", "cuda"):
        raise AdntnError(f"Device '{name}' is not supported; use cpu, cuda or cuda:N.")
    return device


@dataclass
class LoadedCheckpoint:
    path: Path
    state: dict[str, torch.Tensor]
    metadata: dict[str, str]
    model: ModelInfo
    sha256: str = field(repr=False, default="")


def load_checkpoint(path: Path, *, model: str | None = None, allow_pickle: bool = False,
                    mmap: bool = False) -> LoadedCheckpoint:
    """Read (or with ``mmap``, map: see ``load_state_dict``) a checkpoint and recognise its
    architecture."""
    state, metadata = load_state_dict(Path(path), allow_pickle=allow_pickle, mmap=mmap)
    info = detect_model(state, override=model)
    return LoadedCheckpoint(Path(path), state, metadata, info, file_sha256(Path(path)))


def parse_ratio(text: str) -> tuple[float | None, dict[str, float]]:
    """``--ratio``: one number for every layer, or ``fc6=20000,fc7=80000`` per layer."""
    try:
        if "=" not in text:
            return float(text), {}
        pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
        return None, {name.strip(): float(value) for name, value in pairs}
    except ValueError:
        raise AdntnError(f"--ratio takes a number or LAYER=NUMBER pairs separated by commas, not '{text}'.") from None


def choose_spec(settings: FitSettings, layer: LayerInfo):
    label = layer.alias or layer.module
    if settings.bond_dim is not None:
        return spec_for_bond_dim(settings.arch, layer.weight_shape, settings.bond_dim, settings.activation)
    ratio = next((settings.layer_ratios[name] for name in (layer.alias, layer.module)
                  if name in settings.layer_ratios), settings.ratio)
    if ratio is None:
        raise AdntnError(f"--ratio gives no ratio for {label}; name every compressed layer.")
    return spec_for_ratio(settings.arch, layer.weight_shape, ratio, settings.activation, label=label)


def fit_weight_space(weight: torch.Tensor, layer: LayerInfo, settings: FitSettings,
                     progress: Progress) -> tuple[CompressedLayer, dict]:
    """Stage 1 for one layer: SVD-based initialisation, then ``settings.steps`` Adam steps.

    ``init_weight_rel_error`` is the fit's initial objective (on the target's padded leg form).
    """
    spec = choose_spec(settings, layer)
    start = time.perf_counter()
    cls = generator_class(spec)
    # the one full-size copy: the target, built from a mapped checkpoint block by block
    target = cls.fit_target(spec, weight, after_block=release_pages, dtype=TARGET_DTYPES[settings.target_dtype])
    generator = cls.from_target(spec, target)
    advance = progress.task(f"fit {layer.alias or layer.module} ({spec.arch})", settings.steps)
    device = resolve_device(settings.device)
    generator.to(device)
    objective = WeightObjective(target.to(device))
    del target
    result = fit(generator, objective, steps=settings.steps, lr=settings.lr,
                 on_step=lambda step, loss: advance(step, math.sqrt(max(loss, 0.0))))
    del objective
    init_error = math.sqrt(max(result.initial_loss, 0.0))
    generator.cpu()
    compressed = CompressedLayer(layer.module, layer.alias, generator, None, weight.dtype)
    row = {
        "name": layer.module,
        "alias": layer.alias,
        "kind": layer.kind,
        "shape": list(layer.weight_shape),
        "arch": spec.arch,
        "activation": spec.activation,
        "leg_dims": list(spec.leg_dims),
        "bond_dims": list(spec.bond_dims),
        "mix_rank": spec.mix_rank,
        "dense_params": spec.dense_params,
        "core_params": spec.core_params,
        "ratio": spec.dense_params / spec.core_params,
        "init_weight_rel_error": init_error,
        "weight_steps": result.steps,
        "fit_seconds": time.perf_counter() - start,
    }
    return compressed, row


def compress_checkpoint(checkpoint: Path, layer_names: list[str], settings: FitSettings, out_dir: Path, *,
                        model: str | None = None, allow_pickle: bool = False, force: bool = False,
                        task=None, progress: Progress | None = None) -> dict:
    """Compress ``layer_names`` of ``checkpoint`` into ``out_dir``; returns the report.

    ``task`` (an :class:`adntn.task.TaskSettings`) adds the data-aware stages 2 and 3.
    """
    progress = progress or Progress()
    out_dir = Path(out_dir)
    check_destination(out_dir, force=force)
    started = time.perf_counter()
    loaded = load_checkpoint(checkpoint, model=model, allow_pickle=allow_pickle, mmap=True)
    layers = resolve_layers(loaded.model, layer_names)
    check_finite(loaded.state, list(loaded.state))
    for layer in layers:  # fail on an impossible budget or bad data before any fitting
        choose_spec(settings, layer)
    if task is not None:
        from adntn.pipeline.task import open_data, run_task_stages

        opened = open_data(task.data, task.config, loaded.metadata, loaded.model)

    torch.manual_seed(settings.seed)
    compressed, rows = [], []
    for layer in layers:
        weight = loaded.state[layer.weight_key]
        item, row = fit_weight_space(weight, layer, settings, progress)
        item.bias = loaded.state.get(layer.bias_key) if layer.has_bias else None
        compressed.append(item)
        rows.append(row)

    report_extra: dict = {}
    if task is not None:
        report_extra = run_task_stages(loaded, layers, compressed, rows, task, opened, settings, progress)

    for item, row, layer in zip(compressed, rows, layers):
        weight = loaded.state[layer.weight_key]
        row["weight_rel_error"] = relative_error(weight, materialize_rows(item.generator, item.dtype))
        row["bias_params"] = 0 if item.bias is None else item.bias.numel()
        if task is None and row["weight_rel_error"] > DATA_FREE_WARNING:
            progress.note(
                f"{layer.alias or layer.module} is reproduced with relative weight error "
                f"{row['weight_rel_error']:.2f} at {row['ratio']:,.0f}x without data, so it is unlikely to "
                "work as is; pass --data to fit it to its task."
            )

    dense = {
        key: tensor for key, tensor in loaded.state.items()
        if key not in {k for item in compressed for k in (item.weight_key, item.bias_key)}
    }
    report = build_report(loaded, compressed, rows, settings, started)
    report.update(report_extra)
    return write_archive(out_dir, dense, compressed, report, force=force)


def build_report(loaded: LoadedCheckpoint, compressed: list[CompressedLayer], rows: list[dict],
                 settings: FitSettings, started: float) -> dict:
    total_dense = sum(t.numel() for t in loaded.state.values())
    replaced = sum(row["dense_params"] + row["bias_params"] for row in rows)
    kept = sum(row["core_params"] + row["bias_params"] for row in rows)
    return {
        "format_version": FORMAT_VERSION,
        "adntn_version": __version__,
        "source": {
            "path": loaded.path.name,
            "sha256": loaded.sha256,
            "bytes": loaded.path.stat().st_size,
            "model": loaded.model.name,
            "num_classes": loaded.model.num_classes,
            "metadata": loaded.metadata,
        },
        "settings": asdict(settings),
        "bias": BIAS_POLICY,
        "layers": rows,
        "total": {
            "dense_params": total_dense,
            "stored_params": total_dense - replaced + kept,
            "compressed_dense_params": sum(row["dense_params"] for row in rows),
            "compressed_core_params": sum(row["core_params"] for row in rows),
            "dense_bytes": loaded.path.stat().st_size,
            "stored_bytes": None,
        },
        "keys": list(loaded.state),
        "seconds": time.perf_counter() - started,
    }
