"""The compress pipeline: a model or checkpoint in, a :class:`Compressed` value out.

    read_source -> Source.select -> plan_layers (each layer's spec, chosen once)
      -> [with data] task.task_run (trunk features cached, or images opened, once)
      -> [with --budget] allocate (candidate sizes measured: distillation probes with data)
      -> fit_weight_space (SVD-based init, then ||W - G|| / ||W||; --steps, --lr)
      -> [with data] task.run_task_stages: activation space (the layer's outputs on recorded
         inputs), then task-aware fine-tuning of all compressed layers together by distillation
      -> weight errors -> build_report -> Compressed (``.save(dir)`` writes the archive)

Each stage takes the values the previous one returned and returns new ones: the source's tensors,
the fitted generators and the report rows are never edited in place. ``progress`` receives bars,
notes and each stage's wall time (``Progress.stage``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from adntn import distributed
from adntn.core.registry import generator_class
from adntn.core.spec import FORMAT_VERSION, GeneratorSpec
from adntn.errors import AdntnError
from adntn.io.archive import CompressedLayer, check_destination, materialize_rows, write_archive
from adntn.io.checkpoint import check_finite
from adntn.memory import release_pages
from adntn.models.architectures import LayerInfo
from adntn.networks.budget import spec_for_bond_dim, spec_for_ratio
from adntn.pipeline.assemble import assemble_model
from adntn.pipeline.options import CompressOptions, resolve_device
from adntn.pipeline.results import LayerResult
from adntn.pipeline.source import Source, read_source
from adntn.progress import Progress
from adntn.training.fit import fit
from adntn.training.objectives import WeightObjective, relative_error
from adntn.version import __version__

DATA_FREE_WARNING = 0.5  # relative weight error above which a data-free layer is unlikely to work
BIAS_POLICY = "dense: each compressed layer keeps its bias as stored values (bias_params), not counted in core_params"


@dataclass(frozen=True)
class Compressed:
    """What ``compress`` returns.

    Attributes:
        report: the report (what ``report.json`` holds, bar ``total.stored_bytes`` until saved).
        layers: the compressed layers (generators and biases).
        dense: every other tensor of the source, in its order (trained ones included).
        model: the source's model with the generated layers in place (built on first use).
    """

    report: dict
    layers: tuple[CompressedLayer, ...]
    dense: Mapping[str, torch.Tensor] = field(repr=False)
    source: Source = field(repr=False)

    @functools.cached_property
    def model(self) -> nn.Module:
        return assemble_model(self.dense, self.layers, info=self.source.info, template=self.source.module)

    def save(self, directory: str | Path, *, force: bool = False) -> Path:
        """Write the archive ``directory`` (what ``adntn compress`` writes); returns its path."""
        write_archive(Path(directory), self.dense, list(self.layers), self.report, force=force)
        return Path(directory)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan_layers(source: Source, layers: tuple[LayerInfo, ...], options: CompressOptions) -> tuple[GeneratorSpec, ...]:
    """Each layer's generator spec, from ``--bond-dim`` or its ``--ratio`` (all checked before any
    fitting: an impossible budget or a ratio for a layer not compressed fails first)."""
    chosen = {name for layer in layers for name in (layer.alias, layer.module) if name}
    stray = [name for name in options.layer_ratios if name not in chosen]
    if stray:
        known = source.layer(stray[0])  # an unknown name is refused here
        raise AdntnError(f"--ratio names {stray[0]} ({known.module}), which is not among the compressed layers.")
    for layer in layers:
        named = [name for name in (layer.alias, layer.module) if name and name in options.layer_ratios]
        if len(named) > 1:
            raise AdntnError(f"--ratio names {layer.label} twice, as {named[0]} and {named[1]}; give each layer one ratio.")
    specs = []
    for layer in layers:
        if options.bond_dim is not None:
            specs.append(spec_for_bond_dim(options.arch, layer.weight_shape, options.bond_dim, options.activation,
                                           label=layer.label))
            continue
        ratio = options.ratio_for((layer.alias, layer.module))
        if ratio is None:
            raise AdntnError(f"--ratio gives no ratio for {layer.label}; name every compressed layer.")
        specs.append(spec_for_ratio(options.arch, layer.weight_shape, ratio, options.activation, label=layer.label))
    return tuple(specs)


def fit_weight_space(source: Source, layer: LayerInfo, spec: GeneratorSpec, options: CompressOptions,
                     progress: Progress) -> LayerResult:
    """Stage 1 for one layer: SVD-based initialisation, then ``options.steps`` Adam steps.

    The one full-size copy is the fit's target, built from a mapped checkpoint block by block.
    With data the disentanglers stay at the identity until fine-tuning (``fit(mix=False)``): moved
    by the fits at 10,000x, they left attn (seed 1) and mera (seed 2) at a start from which
    fine-tuning never took off (top-1 0.10); kept there, attn at seed 1 reached 0.8769.
    ``init_weight_rel_error`` is the fit's initial objective (on the target's padded leg form).
    """
    start = time.perf_counter()
    weight = source.state[layer.weight_key]
    cls = generator_class(spec.arch)
    with progress.stage("fit_target"):
        target = cls.fit_target(spec, weight, after_block=release_pages, dtype=options.target_torch_dtype)
    with progress.stage("from_target"):
        generator = cls.from_target(spec, target)
    device = resolve_device(options.device)
    generator.to(device)
    objective = WeightObjective(target.to(device))
    del target
    advance = progress.task(f"fit {layer.label} ({spec.arch})", options.steps)
    with progress.stage("fit"):
        result = fit(generator, objective, steps=options.steps, lr=options.lr, mix=options.data is None,
                     on_step=lambda step, loss: advance(step, math.sqrt(max(loss, 0.0))))
    del objective
    bias = source.state.get(layer.bias_key) if layer.has_bias else None
    compressed = CompressedLayer(layer.module, layer.alias, generator.cpu(), bias, weight.dtype)
    return LayerResult(layer, compressed, {
        "init_weight_rel_error": math.sqrt(max(result.initial_loss, 0.0)),
        "weight_steps": result.steps,
        "fit_seconds": time.perf_counter() - start,
    })


def check_converged(results: list[LayerResult], *, fine_tuned: bool) -> None:
    """Refuse to go on with a layer whose cores or bias came out NaN or infinite (a learning rate
    far too large): nothing non-finite is ever written."""
    for result in results:
        tensors = dict(result.compressed.generator.named_parameters())
        if result.compressed.bias is not None:
            tensors["bias"] = result.compressed.bias
        bad = next((name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())), None)
        if bad is not None:
            rates = "--lr or --finetune-lr" if fine_tuned else "--lr"
            raise AdntnError(f"The fit of {result.layer.label} diverged (its {bad} is not finite); "
                             f"try a smaller {rates}.")


def weight_errors(source: Source, results: list[LayerResult], progress: Progress) -> list[LayerResult]:
    """Each layer's ||W - G|| / ||W||, from row blocks of G (no whole generated weight)."""
    measured = []
    for result in results:
        with progress.stage("relative_error"):
            error = relative_error(source.state[result.layer.weight_key],
                                   materialize_rows(result.compressed.generator, result.compressed.dtype))
        measured.append(result.with_stats(weight_rel_error=error))
    return measured


def report_row(result: LayerResult) -> dict:
    """The report's row for one layer: its structure (from the spec) and its stages' numbers."""
    layer, spec = result.layer, result.compressed.generator.spec
    bias = result.compressed.bias
    return {
        "name": layer.module, "alias": layer.alias, "kind": layer.kind, "shape": list(layer.weight_shape),
        "arch": spec.arch, "activation": spec.activation, "leg_dims": list(spec.leg_dims),
        "bond_dims": list(spec.bond_dims), "mix_rank": spec.mix_rank,
        "mix_ranks": list(spec.disentangler_ranks),
        "dense_params": spec.dense_params, "core_params": spec.core_params,
        "ratio": spec.dense_params / spec.core_params,
        **result.stats,
        "bias_params": 0 if bias is None else bias.numel(),
    }


def build_report(source: Source, results: list[LayerResult], options: CompressOptions, seconds: float,
                 task: Mapping | None = None) -> dict:
    """The report (report.json's content but ``total.stored_bytes``, filled in when written)."""
    rows = [report_row(result) for result in results]
    total_dense = sum(t.numel() for t in source.state.values())
    replaced = sum(row["dense_params"] + row["bias_params"] for row in rows)
    kept = sum(row["core_params"] + row["bias_params"] for row in rows)
    return {
        "format_version": FORMAT_VERSION,
        "adntn_version": __version__,
        "source": source.describe(),
        "settings": options.describe(),
        "bias": BIAS_POLICY,
        "layers": rows,
        "total": {
            "dense_params": total_dense,
            "stored_params": total_dense - replaced + kept,
            "compressed_dense_params": sum(row["dense_params"] for row in rows),
            "compressed_core_params": sum(row["core_params"] for row in rows),
            "dense_bytes": source.bytes,
            "stored_bytes": None,
        },
        **(task or {}),
        "keys": list(source.state),
        "seconds": seconds,
    }


def compress(model_or_path: nn.Module | str | Path, layers: list[str] | str, *,
             options: CompressOptions | None = None, progress: Progress | None = None,
             resume_state: Path | None = None, before_fitting: Callable[[], None] | None = None,
             **kwargs) -> Compressed:
    """Compress ``layers`` of a model in memory or a checkpoint file; see ``adntn.compress``.

    ``resume_state``: a file where fine-tuning saves its state after every epoch (and resumes from
    it with ``resume``); ``compress_to`` keeps it beside the output. ``before_fitting`` is called
    once the layers, their sizes and the data are checked, before any fitting (``compress_to``
    checks its destination there, so a wrong layer name is reported before an existing output)."""
    progress = progress or Progress()
    options = CompressOptions.from_kwargs(**kwargs) if options is None else replace(options, **kwargs)
    if distributed.requested():  # torchrun: one process per device, cuda -> cuda:LOCAL_RANK
        options = replace(options, device=distributed.setup(options.device))
        if not distributed.is_main():
            progress = Progress()
    names = [name.strip() for name in layers.split(",")] if isinstance(layers, str) else list(layers)
    started = time.perf_counter()
    with progress.stage("load_checkpoint"):
        source = read_source(model_or_path, model=options.model, allow_pickle=options.allow_pickle)
    chosen = source.select(names)
    _check_weights(source, chosen, progress)
    allocated = options.budget is not None or options.total_ratio is not None  # one budget for all layers
    specs = None if allocated else plan_layers(source, chosen, options)
    data = None
    if options.data is not None:  # bad data fails before any fitting
        from adntn.pipeline.task import open_data, trained_layers

        data = open_data(options.data, options.config, source.metadata, source, class_map=options.class_map,
                         max_images=options.max_images, seed=options.seed, cache_dir=options.cache_dir)
        trained_layers(source, list(chosen), options)
    if before_fitting is not None:
        before_fitting()
    with _task_run(source, chosen, options, data, progress) as run:
        allocation = _allocate(source, chosen, options, progress, run) if allocated else None
        if allocation is not None:
            specs = allocation.specs
        torch.manual_seed(options.seed)
        results = [fit_weight_space(source, layer, spec, options, progress) for layer, spec in zip(chosen, specs)]
        trained: dict[str, torch.Tensor] = {}
        task = None
        if run is not None:
            from adntn.pipeline.task import run_task_stages

            outcome = run_task_stages(run, source, results, options, data, progress, resume_state)
            results, trained, task = outcome.results, outcome.trained, outcome.report
    check_converged(results, fine_tuned=data is not None)
    results = weight_errors(source, results, progress)
    if data is None:
        _warn_data_free(source, results, progress)
    _warn_not_smaller(results, progress)
    replaced = {key for result in results for key in (result.layer.weight_key, result.layer.bias_key) if key}
    dense = {key: trained.get(key, tensor) for key, tensor in source.state.items() if key not in replaced}
    if allocation is not None:
        task = {**(task or {}), "allocation": allocation.describe()}
    report = build_report(source, results, options, time.perf_counter() - started, task)
    return Compressed(report, tuple(result.compressed for result in results), dense, source)


def _check_weights(source: Source, layers: tuple[LayerInfo, ...], progress: Progress) -> None:
    """Refuse complex or integer weights in ``layers`` and any NaN/Inf or float32-overflowing tensor."""
    for layer in layers:
        dtype = source.state[layer.weight_key].dtype
        if dtype.is_complex or not dtype.is_floating_point:
            kind = "complex" if dtype.is_complex else "not floating-point"
            raise AdntnError(f"{layer.label} ({layer.module}) has a {kind} weight ({_dtype(dtype)}); adntn compresses "
                             "real floating-point weights only, so it would lose part of it.")
    with progress.stage("check_finite"):
        check_finite(source.state, list(source.state))


def _warn_data_free(source: Source, results: list[LayerResult], progress: Progress) -> None:
    """A note for each layer fitted without data whose weight error makes the model unlikely to work."""
    for result in results:
        error = result.stats["weight_rel_error"]
        if error > DATA_FREE_WARNING:
            checkpoint = source.name if source.module is None else "CHECKPOINT"
            progress.note(f"{result.layer.label} is reproduced with relative weight error {error:.2f} at "
                          f"{report_row(result)['ratio']:,.0f}x without data, so the compressed model is unlikely "
                          "to keep its accuracy (it may be no better than chance); fit it to its task with data: "
                          f"adntn compress {checkpoint} --layers {result.layer.label} --data IMAGEFOLDER "
                          "(train/ and val/ inside), or try a lower --ratio.")


def _warn_not_smaller(results: list[LayerResult], progress: Progress) -> None:
    """A note for each layer whose generator has at least as many parameters as its weight (a tiny
    layer under a whole-model budget, or a large ``--bond-dim``): it is stored, but not smaller."""
    for result in results:
        spec = result.compressed.generator.spec
        if spec.core_params >= spec.dense_params:
            progress.note(f"{result.layer.label}'s generator has {spec.core_params:,} parameters against "
                          f"{spec.dense_params:,} in its weight, so it is not compressed; leave it out of "
                          "--layers or give it a smaller structure.")


def _task_run(source: Source, layers: tuple[LayerInfo, ...], options: CompressOptions, data, progress: Progress):
    """``task.task_run`` when there is data (features cached or images opened once, for the
    budget's probes and the data-aware stages), else a context holding None."""
    if data is None:
        return contextlib.nullcontext()
    from adntn.pipeline.task import task_run

    return task_run(source, list(layers), options, data, progress)


def _allocate(source: Source, layers: tuple[LayerInfo, ...], options: CompressOptions, progress: Progress, run):
    """The split of ``--budget`` / ``--ratio total:R``: measured in ``run`` (with data), else by weight-space probes."""
    from adntn.pipeline.allocate import allocate_layers, fit_measures

    if run is None:
        measures, name = fit_measures([source.state[layer.weight_key] for layer in layers], None, lr=options.lr,
                                      seed=options.seed)
    else:
        from adntn.pipeline.task import allocation_measures

        measures, name = allocation_measures(run, source, list(layers), options)
    return allocate_layers(layers, options, progress, measures, name)


def compress_to(model_or_path: nn.Module | str | Path, layers: list[str] | str, out_dir: str | Path, *,
                force: bool = False, options: CompressOptions | None = None, progress: Progress | None = None,
                **kwargs) -> dict:
    """``compress`` then ``save``, the destination checked before any fitting; returns the report written.

    Under torchrun only rank 0 writes; the other ranks return the report unwritten.
    """
    progress = progress or Progress()
    if isinstance(model_or_path, (str, Path)):
        checkpoint, target = Path(model_or_path).resolve(), Path(out_dir).absolute().parent.resolve() / Path(out_dir).name
        if checkpoint == target or target in checkpoint.parents:
            raise AdntnError(f"--out {out_dir} would replace the checkpoint {model_or_path} that it is compressed from; "
                             "choose another output.")
    out_dir = Path(out_dir)
    state = resume_path(out_dir)

    def check_output() -> None:
        check_destination(out_dir, force=force)
        if (options.resume if options is not None else kwargs.get("resume")) and not state.is_file():
            progress.note(f"--resume: no saved fine-tuning state ({state}); starting from the first epoch.")

    compressed = compress(model_or_path, layers, options=options, progress=progress, resume_state=state,
                          before_fitting=check_output, **kwargs)
    if not distributed.is_main():
        return compressed.report
    with progress.stage("write_archive"):
        written = write_archive(out_dir, compressed.dense, list(compressed.layers), compressed.report, force=force)
    shutil.rmtree(state.parent, ignore_errors=True)
    return written


def resume_path(out_dir: Path) -> Path:
    """Where a run writing ``out_dir`` keeps its fine-tuning state between epochs (beside the
    staged output; removed once the output is written)."""
    return out_dir.resolve().parent / f".{out_dir.name}.resume" / "finetune.pt"
