"""Loading a compressed directory as a model: the generated layers hold their cores, every other
layer the stored tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adntn.errors import AdntnError
from adntn.io.archive import CompressedLayer, archive_layout, read_dense, read_layers, read_report
from adntn.models.architectures import MODEL_NAMES, ModelInfo, detect_model
from adntn.models.layers import SCHEDULES, GeneratedLayer, inference_cost
from adntn.pipeline.assemble import assemble_model
from adntn.pipeline.options import resolve_device


def read_archive(directory: Path) -> tuple[dict, list[CompressedLayer], dict, ModelInfo | None]:
    """report.json, the layers, the expanded layout (``archive_layout``) and the torchvision model
    of an archive, every part checked against the others before any dense tensor is read: a
    report that names a torchvision model must have that model's keys and shapes."""
    report = read_report(directory)
    layers = read_layers(directory, report)
    layout = archive_layout(directory, report, layers)
    return report, layers, layout, archive_model_info(directory, report, layout)


def archive_model_info(directory: Path, report: dict, layout: dict) -> ModelInfo | None:
    """The torchvision model of an archive, recognised from the shapes alone (no tensor read), or
    None when it is not one; refused when report.json names a torchvision model the shapes do not fit."""
    shapes = {key: torch.empty(shape, dtype=dtype, device="meta") for key, (dtype, shape) in layout.items()}
    name = report["source"]["model"]
    if name in MODEL_NAMES:
        try:
            return detect_model(shapes, override=name)
        except AdntnError as error:
            reason = str(error).partition(": ")[2].rstrip(".") or str(error).rstrip(".")
            raise AdntnError(f"{directory} does not hold the {name} its report.json describes: {reason}.") from None
    try:
        return detect_model(shapes)
    except AdntnError:
        return None


def set_schedule(model: nn.Module, schedule: str) -> nn.Module:
    """Every generated layer of ``model`` runs by ``schedule`` ("factorized" falls back to
    "blocked" for an arch without a factorized form, mera); returns ``model``."""
    if schedule not in SCHEDULES:
        raise AdntnError(f"Unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}.")
    for module in model.modules():
        if isinstance(module, GeneratedLayer):
            module.schedule = "blocked" if schedule == "factorized" and not module.generator.has_factorized else schedule
    return model


def load(directory: str | Path, *, model: nn.Module | None = None, schedule: str = "auto",
         device: str | None = None) -> nn.Module:
    """The compressed model of ``directory`` in eval mode: a torchvision AlexNet/VGG rebuilt from
    the archive, or, for a module that is not one, a copy of ``model`` (the module it was
    compressed from, or one of the same structure).

    Its generated layers hold the cores as parameters (it fine-tunes) and never a dense weight in
    the ``factorized`` and ``blocked`` schedules; ``auto`` picks per forward from the batch's flop
    count (see ``models.layers``); ``factorized`` runs mera layers ``blocked``. Uncompressed layers
    hold the stored tensors. Moved to ``device`` when given."""
    return _load_with_report(Path(directory), model, schedule, device)[0]


def _load_with_report(directory: Path, model: nn.Module | None, schedule: str,
                      device: str | None) -> tuple[nn.Module, dict]:
    """``load``'s model and the report.json it was built from (read once)."""
    report, layers, layout, info = read_archive(directory)
    if model is not None:
        info = None
    if model is None and info is None:
        raise AdntnError(f"{directory} holds no torchvision AlexNet or VGG; pass the module it was compressed "
                         "from as model=... to load it.")
    loaded = set_schedule(assemble_model(read_dense(directory), layers, info=info, template=model), schedule)
    return (loaded.to(resolve_device(device)) if device is not None else loaded), report


def inference_plan(directory: str | Path, batch: int = 1) -> list[dict]:
    """Per compressed layer of ``directory`` (module path and alias), for inference (no gradient)
    on ``batch`` rows (for a convolution, a row is one output position): the schedule ``auto``
    runs, the bytes it holds (cores + cached operands, or row blocks) against the dense weight's,
    and its flops per row against dense."""
    if batch < 1:
        raise AdntnError(f"--batch must be at least 1, not {batch}.")
    network, report = _load_with_report(Path(directory), None, "auto", None)
    aliases = {row["name"]: row.get("alias") for row in report["layers"]}
    rows = []
    for name, module in network.named_modules():
        if not isinstance(module, GeneratedLayer):
            continue
        generator = module.generator
        cost = inference_cost(generator, batch)
        with torch.no_grad():
            chosen = module.resolve_schedule(batch, torch.empty(0))
        used = cost[chosen]
        rows.append({
            "layer": name, "alias": aliases.get(name), "arch": generator.spec.arch, "schedule": chosen,
            "bytes": used["bytes"], "dense_bytes": generator.spec.dense_params * 4,
            "flops_per_sample": used["flops"] // batch,
            "dense_flops_per_sample": 2 * generator.spec.dense_params,
        })
    return rows
