"""The data-aware stages of ``compress --data`` and the held-out evaluation of ``adntn eval``.

Stage 2 (activation space): each generator is refined on ||X W^T - X G^T|| / ||X W^T|| for inputs
X of its layer recorded from the dense model on training images, and its bias then moved so that
its mean output on X is the dense layer's (``_bias_corrected``; the budget's distillation probes
do the same). Stage 3 (task-aware): all
compressed layers are fine-tuned together on cross-entropy plus distillation from the dense
model's logits. Every accuracy is measured on the held-out split (val/ or test/).

When every compressed layer is in the classifier of a torchvision model, the convolutional trunk
is run once per split and its features written to a file on disk (float16 by default; kept in
``cache_dir`` between runs, else in a temporary folder); fine-tuning and evaluation then read
the file in chunks and run the classifier alone (the dense head's logits are computed per
batch), so memory does not grow with the number of images and CPU fine-tuning takes minutes.
Convolutional layers take the full forward pass over the images.

Class folders are mapped to the model's outputs (``--class-map``, the checkpoint's ``classes``
metadata, or sorted order when the counts match; see :func:`adntn.data.images.class_indices`):
a subset of the classes is evaluated by argmax over all outputs. ``max_images`` keeps a
stratified, seeded share of each split. Under torchrun the stages run on every rank with the
work split as :mod:`adntn.distributed` describes.

Both stages work on copies of the generators they are given and return new layers: nothing they
receive is edited.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from torch.utils.data import Subset

from adntn import distributed
from adntn.errors import AdntnError
from adntn.data.images import (Preprocessing, Splits, class_indices, heldout_split, image_loader, image_splits,
                               relabel, resolve_preprocessing, stratified_subset, training_loader)
from adntn.io.archive import CompressedLayer
from adntn.models.architectures import LayerInfo
from adntn.networks import Generator
from adntn.pipeline.allocate import PROBE_STEPS, Measure, fit_measures, probe_fit
from adntn.pipeline.assemble import generated_module, swapped_copy
from adntn.pipeline.results import LayerResult, copy_generator
from adntn.pipeline.options import CompressOptions, resolve_device
from adntn.pipeline.source import Source
from adntn.progress import Progress
from adntn.training.distill import (EpochCheckpoint, FinetuneResult, distillation_loss, finetune, finetune_features,
                                   finetune_full, logits_of,
                                   generated_parameters)
from adntn.training.evaluate import Accuracy, Paired, Predictions, accuracy_of_counts, paired_counts, predict
from adntn.training.features import (FEATURE_DTYPES, FeatureFile, cached_features, feature_cache_key, record_inputs,
                                     split_at_classifier)
from adntn.training.fit import fit
from adntn.training.objectives import ActivationObjective

PROBE_ROWS = 5120  # training rows of a budget's distillation probes: PROBE_HELD measure, the rest train
PROBE_HELD = 1024
PROBE_EPOCHS = 6  # passes of each probe's fine-tuning over its rows (192 steps of PROBE_BATCH)
PROBE_BATCH = 128
CONV_RECORD_SAMPLES = 32  # conv inputs are whole feature maps (64x224x224 floats = 12.8 MB each)
COVARIANCE_RANK = 256  # input directions kept by the activation-space fit of a linear layer
HEAD = "classifier."
ACCURACY_WARNING = 0.05  # top-1 lost to dense after fine-tuning above which the report notes how little it trained


@dataclass(frozen=True)
class TaskData:
    """Everything a held-out evaluation or a fine-tuning needs, opened once."""

    splits: Splits  # labels are model output indices
    preprocessing: Preprocessing
    preprocessing_source: str
    classes_source: str = "sorted folder names"  # how folders were mapped to outputs
    outputs: int = 0  # the model's number of outputs


@dataclass(frozen=True)
class TaskOutcome:
    """What stages 2 and 3 return: the layers after them, the dense tensors ``--train`` trained
    (name -> tensor in the source's dtype) and the report's ``training`` and ``accuracy``."""

    results: list[LayerResult]
    trained: dict[str, torch.Tensor]
    report: dict


def check_cache_dir(cache_dir: Path) -> None:
    """``--cache-dir`` must be a folder this process can write, or creatable: checked before any fitting."""
    existing = next((folder for folder in (cache_dir, *cache_dir.parents) if folder.exists()), None)
    if existing is not None and not existing.is_dir():
        raise AdntnError(f"--cache-dir {cache_dir} cannot be used: {existing} is a file, not a folder.")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise AdntnError(f"--cache-dir {cache_dir} cannot be used: {existing} is not writable.")


def open_data(data: Path, config: Path | None, metadata: dict[str, str], source: Source, *,
              class_map: Path | None = None, max_images: int | None = None, seed: int = 0,
              cache_dir: Path | None = None) -> TaskData:
    """The image splits of ``data`` with their preprocessing, labels mapped to the model's outputs
    and each split cut to ``max_images`` (stratified by class, seeded)."""
    if source.info is None:
        raise AdntnError("Fitting on data needs a torchvision AlexNet or VGG (its number of classes and its "
                         "trunk); this model is not one.")
    preprocessing, origin = resolve_preprocessing(config, metadata)
    splits = image_splits(data, preprocessing)
    indices, classes_source = class_indices(splits.classes, source.info.num_classes, metadata, class_map)
    if cache_dir is not None:
        check_cache_dir(Path(cache_dir))
    splits = replace(splits, train=stratified_subset(relabel(splits.train, indices), max_images, seed),
                     heldout=stratified_subset(relabel(splits.heldout, indices), max_images, seed))
    return TaskData(splits, preprocessing, origin, classes_source, source.info.num_classes)


def _samples_digest(dataset) -> str:
    """What identifies a split's chosen images and their labels (for the feature cache key)."""
    import hashlib

    digest = hashlib.sha256()
    for path, label in dataset.samples:
        digest.update(f"{path}\0{label}\n".encode())
    return digest.hexdigest()


def _features_predictions(model: nn.Module, features: FeatureFile, batch_size: int) -> Predictions:
    """``model``'s predictions on this rank's shard of cached features."""
    first, last = distributed.shard(len(features))
    return predict(model, features.batches(batch_size, start=first, stop=last))


def _images_predictions(model: nn.Module, dataset, preprocessing: Preprocessing) -> Predictions:
    """``model``'s predictions on this rank's shard of an image split."""
    first, last = distributed.shard(len(dataset))
    return predict(model, image_loader(Subset(dataset, range(first, last)), preprocessing))


def _accuracy(predictions: Predictions) -> Accuracy:
    """The accuracy of every rank's shard together."""
    return accuracy_of_counts(*map(round, distributed.sum_all(list(predictions.counts()))))


def _paired(compressed: Predictions, dense: Predictions) -> Paired:
    """The compressed model against the dense one, every rank's shard together."""
    return Paired(*map(round, distributed.sum_all(list(paired_counts(compressed, dense)))))


def head_only(layers: list[LayerInfo]) -> bool:
    """Whether every layer is in the classifier (the trunk's features can then be cached)."""
    return all(layer.module.startswith(HEAD) for layer in layers)


def trained_layers(source: Source, layers: list[LayerInfo], options: CompressOptions) -> tuple[LayerInfo, ...]:
    """The dense layers ``--train`` adds (compressed ones train anyway), checked before any fitting."""
    extra = tuple(layer for layer in source.select(list(options.train)) if layer not in layers) if options.train else ()
    if head_only(layers):
        outside = next((layer for layer in extra if not layer.module.startswith(HEAD)), None)
        if outside is not None:
            raise AdntnError(f"--train {outside.label} is outside the classifier, but only classifier layers are "
                             "compressed, so fine-tuning runs on cached trunk features; compress a trunk layer "
                             "too to train it.")
    return extra


def _fit_activation_space(results: list[LayerResult], inputs: Mapping[str, torch.Tensor], source: Source,
                          options: CompressOptions, device: torch.device, progress: Progress) -> list[LayerResult]:
    fitted = []
    for result in map(copy_generator, results):
        layer, generator = result.layer, result.compressed.generator
        objective = ActivationObjective(source.state[layer.weight_key].to(device), inputs[layer.module].to(device),
                                        layer.stride, layer.padding, max_rank=COVARIANCE_RANK)
        generator.to(device)
        advance = progress.task(f"fit {layer.label} on data", options.steps)
        fit(generator, objective, steps=options.steps, lr=options.lr, mix=False,  # see compress.fit_weight_space
            on_step=lambda step, loss: advance(step, math.sqrt(max(loss, 0.0))))
        fitted.append(_bias_corrected(result.with_stats(activation_fit_energy=objective.energy), objective,
                                      source.state[layer.weight_key]))
    return fitted


def _bias_corrected(result: LayerResult, objective: ActivationObjective, weight: torch.Tensor) -> LayerResult:
    """``result`` with its bias moved by the mean residual on the recorded inputs
    (``ActivationObjective.mean_residual``), so that each output's mean is the dense layer's.

    At 10,000x the fitted generators capture ~20% of fc6's output energy and the per-unit offsets
    come out wrong: on the CIFAR-10 VGG-16-BN (seed 0) 0.1% of fc6's pre-activations were positive
    (dense: 21%) and 0.9% of its units ever fired, so fine-tuning started from a dead ReLU layer,
    stayed at loss 11.8 and scored 0.10. Corrected, 16% / 36%."""
    bias = result.compressed.bias
    if bias is None:
        return result
    corrected = _corrected_bias(bias, objective, weight, result.compressed.generator)
    moved = float((corrected.float() - bias.float()).norm() / bias.float().norm().clamp_min(1e-30))
    return replace(result, compressed=replace(result.compressed, bias=corrected)).with_stats(bias_shift=moved)


def _corrected_bias(bias: torch.Tensor, objective: ActivationObjective, weight: torch.Tensor,
                    generator: Generator) -> torch.Tensor:
    """``bias`` plus ``objective.mean_residual`` of ``generator``, in the bias's dtype and device."""
    shift = objective.mean_residual(weight.to(next(generator.parameters()).device), generator)
    return (bias.float() + shift.to(bias.device)).to(bias.dtype)


@torch.no_grad()
def _activation_errors(results: list[LayerResult], inputs: Mapping[str, torch.Tensor], source: Source,
                       steps: int) -> list[LayerResult]:
    measured = []
    for result in results:
        layer = result.layer
        objective = ActivationObjective(source.state[layer.weight_key], inputs[layer.module], layer.stride, layer.padding)
        error = math.sqrt(float(objective(result.compressed.generator)))
        measured.append(result.with_stats(activation_rel_error=error, activation_steps=steps))
    return measured


def _student(model: nn.Module, results: list[LayerResult], prefix: str) -> nn.Module:
    """A copy of ``model`` with each compressed layer generated (from copies of the generators)."""
    return swapped_copy(model, {
        result.layer.module.removeprefix(prefix): generated_module(
            copy_generator(result).compressed, stride=result.layer.stride, padding=result.layer.padding)
        for result in results})


def _extra_groups(student: nn.Module, extra: tuple[LayerInfo, ...], prefix: str) -> dict[str, list[nn.Parameter]]:
    """Groups ``layer:NAME`` for the dense layers that ``--train`` adds (weight and bias)."""
    return {f"layer:{layer.module}": list(student.get_submodule(layer.module.removeprefix(prefix)).parameters())
            for layer in extra}


@contextmanager
def task_run(source: Source, layers: list[LayerInfo], options: CompressOptions, data: TaskData,
             progress: Progress) -> Iterator[_Run]:
    """The :class:`_Run` of stages 2 and 3 for ``layers``: trunk features cached on disk when every
    layer is in the classifier (in ``options.cache_dir``, else in a temporary folder, rank 0's,
    shared with the other ranks under torchrun, removed on exit), else the whole model on images.
    ``data`` is :func:`open_data` of the options' data."""
    device = resolve_device(options.device)
    names = [layer.module for layer in layers]
    on = _on_features if head_only(layers) else _on_images
    if options.cache_dir is not None or not head_only(layers):
        yield on(source, source.dense_model(), names, data, options, options.cache_dir, device, progress)
        return
    temporary = tempfile.TemporaryDirectory(prefix="adntn-features-") if distributed.is_main() else None
    try:
        folder = Path(distributed.broadcast(temporary.name if temporary else None))
        yield on(source, source.dense_model(), names, data, options, folder, device, progress)
    finally:
        distributed.barrier()
        if temporary is not None:
            temporary.cleanup()


@dataclass(frozen=True)
class _Run:
    """Where stages 2 and 3 run: the head on cached trunk features (every compressed layer in the
    classifier), or the whole model on images. ``model`` is the dense part that runs, ``prefix``
    its module path inside the full model; the inputs recorded from it for the activation-space
    fit (train) and its error (held out); the dense model's predictions on this rank's shard of the
    held-out split; ``finetune(student, groups, checkpoint)`` and ``predictions(student)`` (the same
    shard) for a copy of ``model`` with generated layers; on features,
    ``train_sample(n)``: a stratified sample of n training rows (``FeatureFile.sample``)."""

    model: nn.Module
    prefix: str
    train_inputs: dict[str, torch.Tensor]
    heldout_inputs: dict[str, torch.Tensor]
    dense_predictions: Predictions
    train_images: int
    heldout_images: int
    finetune: Callable[[nn.Module, dict, EpochCheckpoint | None], FinetuneResult]
    predictions: Callable[[nn.Module], Predictions]
    features_cached: bool
    train_sample: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None  # (inputs, labels) of n rows


def _on_features(source: Source, teacher: nn.Module, names: list[str], data: TaskData, options: CompressOptions,
                 cache_dir: Path | None, device: torch.device, progress: Progress) -> _Run:
    splits, preprocessing, config = data.splits, data.preprocessing, options.finetune
    trunk, head = split_at_classifier(teacher)
    trunk.to(device)
    features = {}
    for split, dataset in (("train", splits.train), (splits.heldout_name, splits.heldout)):
        key = feature_cache_key(source.sha256, Path(dataset.root), preprocessing, _samples_digest(dataset))
        features[split] = cached_features(trunk, dataset, key, cache_dir, preprocessing.batch_size,
                                          preprocessing.workers, progress, dtype=FEATURE_DTYPES[options.feature_dtype],
                                          width=source.info.layer("fc6").weight_shape[1])
    trunk.cpu()
    train, heldout = features["train"], features[splits.heldout_name]
    head_names = [name.removeprefix(HEAD) for name in names]

    def recorded(split) -> dict[str, torch.Tensor]:  # a stratified sample: the file is in class order
        sample, _ = split.features.sample(options.record_samples, options.seed)
        inputs = record_inputs(head, head_names, [sample], options.record_samples)
        return {name: inputs[short] for name, short in zip(names, head_names)}

    head.to(device)
    return _Run(head, HEAD, recorded(train), recorded(heldout),
                _features_predictions(head, heldout.features, config.batch_size), len(train.labels), len(heldout.labels),
                lambda student, groups, checkpoint: finetune_features(student, head, train.features, groups, config,
                                                                      progress, checkpoint),
                lambda student: _features_predictions(student, heldout.features, config.batch_size), True,
                lambda count: train.features.sample(count, options.seed))


def _on_images(source: Source, teacher: nn.Module, names: list[str], data: TaskData, options: CompressOptions,
               cache_dir: Path | None, device: torch.device, progress: Progress) -> _Run:
    splits, preprocessing, config = data.splits, data.preprocessing, options.finetune
    teacher.to(device)
    train_loader = training_loader(splits.train, preprocessing, seed=options.seed)
    samples = min(options.record_samples, CONV_RECORD_SAMPLES)
    train_inputs, heldout_inputs = (  # stratified samples: folders are read in class order
        record_inputs(teacher, names, image_loader(stratified_subset(split, samples, options.seed), preprocessing),
                      samples) for split in (splits.train, splits.heldout))
    return _Run(teacher, "", train_inputs, heldout_inputs, _images_predictions(teacher, splits.heldout, preprocessing),
                len(splits.train), len(splits.heldout),
                lambda student, groups, checkpoint: finetune_full(student, teacher, train_loader, groups, config,
                                                                  progress, checkpoint),
                lambda student: _images_predictions(student, splits.heldout, preprocessing), False)


def _trained_values(student: nn.Module, results: list[LayerResult], extra: tuple[LayerInfo, ...], prefix: str,
                    source: Source) -> tuple[list[LayerResult], dict[str, torch.Tensor]]:
    """The layers as the fine-tuned ``student`` holds them, and the dense tensors ``--train`` trained
    (in the source's dtype)."""
    student.cpu()
    tuned = []
    for item in results:
        module = student.get_submodule(item.layer.module.removeprefix(prefix))
        bias = None if module.bias is None else module.bias.detach().clone()
        tuned.append(replace(item, compressed=replace(item.compressed, generator=module.generator, bias=bias)))
    trained = {f"{layer.module}.{key}": value.detach().clone().to(source.state[f"{layer.module}.{key}"].dtype)
               for layer in extra
               for key, value in student.get_submodule(layer.module.removeprefix(prefix)).state_dict().items()}
    return tuned, trained


def _run_key(source: Source, options: CompressOptions, student: nn.Module) -> str:
    """What a fine-tuning run is: the checkpoint, the settings (``resume`` aside) and the student
    it starts from (after the weight- and activation-space fits)."""
    digest = hashlib.sha256(json.dumps({**options.describe(), "resume": None, "source": source.sha256},
                                       sort_keys=True).encode())
    for key, value in student.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_task_stages(run: _Run, source: Source, results: list[LayerResult], options: CompressOptions,
                    data: TaskData, progress: Progress, state: Path | None = None) -> TaskOutcome:
    """Stages 2 and 3 on the weight-space ``results`` in ``run`` (:func:`task_run` of their layers).
    With ``state`` (a file path) the fine-tuning saves its state there after every epoch, and
    resumes from it with ``resume``."""
    layers = [result.layer for result in results]
    extra = trained_layers(source, layers, options)
    device = resolve_device(options.device)
    results = _fit_activation_space(results, run.train_inputs, source, options, device, progress)
    student = _student(run.model, results, run.prefix)
    groups = {f"{kind}:{run.prefix}{name}": params for kind_name, params in generated_parameters(student).items()
              for kind, name in [kind_name.split(":", 1)]}
    groups.update(_extra_groups(student, extra, run.prefix))
    checkpoint = None if state is None else EpochCheckpoint(state, _run_key(source, options, student), options.resume)
    result = run.finetune(student, groups, checkpoint)
    predictions = run.predictions(student)
    compressed_accuracy, dense_accuracy = _accuracy(predictions), _accuracy(run.dense_predictions)
    warning = accuracy_warning(compressed_accuracy, dense_accuracy, len(data.splits.classes), result)
    if warning is not None:
        progress.note(warning)
    tuned, trained = _trained_values(student, results, extra, run.prefix, source)
    tuned = _activation_errors(tuned, run.heldout_inputs, source, options.steps)
    report = {"training": _training_report(run, result, options, data),
              "accuracy": {"split": data.splits.heldout_name, "images": run.heldout_images,
                           "dense": dense_accuracy.describe(), "compressed": compressed_accuracy.describe(),
                           "paired": _paired(predictions, run.dense_predictions).describe()}}
    return TaskOutcome(tuned, trained, report)


def accuracy_warning(compressed: Accuracy, dense: Accuracy, classes: int, result: FinetuneResult) -> str | None:
    """A note when the fine-tuned model scores no better than guessing among ``classes`` (plus a
    margin of 3 standard errors) while the dense one does: its fine-tuning never took off from
    the plateau where the generators start (at 10,000x their outputs are nearly uncorrelated with
    the layer's: activation error ~1); or, short of that, when it is more than
    ``ACCURACY_WARNING`` top-1 below the dense one, saying how little it trained."""
    chance = 1 / max(classes, 1)
    margin = 3 * math.sqrt(chance * (1 - chance) / max(compressed.images, 1))
    if dense.top1 <= chance + margin:
        return None
    if compressed.top1 <= chance + margin:
        loss = "" if result.final_loss is None else f" (final training loss {result.final_loss:.3g})"
        return (f"The compressed model scores at chance, top-1 {compressed.top1:.3f} against the dense {dense.top1:.3f}: "
                f"its fine-tuning did not take off{loss}; try another --seed, more --epochs or a lower --ratio.")
    if dense.top1 - compressed.top1 <= ACCURACY_WARNING:
        return None
    steps = f"{result.steps:,} fine-tuning step{'' if result.steps == 1 else 's'}"
    return (f"The compressed model reaches top-1 {compressed.top1:.4f} against {dense.top1:.4f} for the dense one "
            f"after {steps} ({result.epochs} epoch{'' if result.epochs == 1 else 's'} of {result.images:,} images); "
            "give it more (--epochs, or more images than --max-images) or a lower --ratio.")


def allocation_measures(run: _Run, source: Source, layers: list[LayerInfo],
                        options: CompressOptions) -> tuple[list[Measure], str]:
    """How a budget's candidate sizes are measured in ``run`` (see ``pipeline.allocate``): by a
    distillation probe on cached features, else by the activation error on the recorded inputs.

    The probe must be long enough for a small generator to take off: on the CIFAR-10 VGG-16-BN,
    after 64 steps fc6 at 158 parameters measured 10.77, as bad as at 60, though it reaches
    0.8768 top-1 with 182 in fc7 after 3 epochs; after 192 steps it measured 0.578 (329
    parameters: 0.174; fc7 at 66: 8.10, at 182: 0.309, at 342: 0.202)."""
    if run.train_sample is None:
        objectives = [ActivationObjective(source.state[layer.weight_key], run.train_inputs[layer.module],
                                          layer.stride, layer.padding, max_rank=COVARIANCE_RANK) for layer in layers]
        return fit_measures([source.state[layer.weight_key] for layer in layers], objectives,
                            lr=options.lr, seed=options.seed)
    inputs, labels = run.train_sample(PROBE_ROWS)
    teacher_logits = logits_of(run.model, inputs, PROBE_BATCH)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(options.seed))
    held, rows = order[:min(PROBE_HELD, len(labels) // 5)], order[min(PROBE_HELD, len(labels) // 5):]
    config = replace(options.finetune, epochs=PROBE_EPOCHS, batch_size=PROBE_BATCH)

    def measure_for(layer: LayerInfo) -> Measure:
        weight, targets = source.state[layer.weight_key], {}
        objective = ActivationObjective(weight, run.train_inputs[layer.module], layer.stride, layer.padding,
                                        max_rank=COVARIANCE_RANK)
        bias = source.state.get(layer.bias_key) if layer.has_bias else None

        def measure(spec) -> float:
            generator, _ = probe_fit(weight, spec, targets, objective, lr=options.lr, seed=options.seed, mix=False)
            compressed = CompressedLayer(layer.module, layer.alias, generator, None if bias is None else
                                         _corrected_bias(bias.detach(), objective, weight, generator), weight.dtype)
            student = swapped_copy(run.model, {layer.module.removeprefix(run.prefix): generated_module(compressed)})
            device = next(run.model.parameters()).device
            student.to(device)
            finetune(student, teacher_logits[rows], inputs[rows], labels[rows], generated_parameters(student), config)
            logits = logits_of(student, inputs[held], PROBE_BATCH)
            return float(distillation_loss(logits, teacher_logits[held], labels[held].to(logits.device), config))

        return measure

    name = (f"distillation loss (T={config.temperature}, KD weight {config.kd_weight}) on {len(held):,} training "
            f"rows, after the SVD-based init, {PROBE_STEPS} activation-space Adam steps and {PROBE_EPOCHS} epochs "
            f"of fine-tuning (batch {PROBE_BATCH}) on {len(rows):,} other training rows, the layer alone compressed")
    return [measure_for(layer) for layer in layers], name


def _training_report(run: _Run, result: FinetuneResult, options: CompressOptions, data: TaskData) -> dict:
    """The report's ``training``: what was trained, on what, how."""
    config, splits = options.finetune, data.splits
    features = (f", from the cached {options.feature_dtype} trunk features ('adntn eval' runs the whole model)"
                if run.features_cached else "")
    summary = (f"task-aware: {result.epochs} epoch{'' if result.epochs == 1 else 's'} of CE+KD "
               f"(T={config.temperature}, KD weight {config.kd_weight}, {config.student_mode}) on "
               f"{run.train_images:,} train images of {options.data.name}; trained: {', '.join(result.trained)}; "
               f"accuracy on {run.heldout_images:,} {splits.heldout_name} images{features}")
    return {
        "summary": summary,
        "data": str(options.data),
        "train_images": run.train_images,
        "heldout_split": splits.heldout_name,
        "heldout_images": run.heldout_images,
        "preprocessing": data.preprocessing.describe(),
        "preprocessing_source": data.preprocessing_source,
        "features_cached": run.features_cached,
        **({"feature_dtype": options.feature_dtype} if run.features_cached else {}),
        "max_images": options.max_images,
        "classes": {"folders": len(splits.classes), "outputs": data.outputs or len(splits.classes),
                    "mapped_by": data.classes_source},
        "world_size": distributed.world_size(),
        "activation_fit": {"samples": len(next(iter(run.train_inputs.values()))), "steps": options.steps,
                           "lr": options.lr, "inputs_from": "dense model, train split (stratified sample)",
                           "trains": "the tree; disentanglers stay at the identity until fine-tuning",
                           "bias": "moved so each output's mean on the recorded inputs is the dense layer's "
                                   "(layers' bias_shift: the move relative to the dense bias)"},
        "activation_error_on": f"{len(next(iter(run.heldout_inputs.values())))} {splits.heldout_name} samples",
        "finetune": {**config.describe(), **result.describe()},
        "trained": result.trained,
    }


def evaluate_model(model: nn.Module, metadata: dict[str, str], num_classes: int, data: Path,
                   config: Path | None, *, class_map: Path | None = None, max_images: int | None = None,
                   seed: int = 0, against: nn.Module | None = None) -> dict:
    """Top-1/top-5 of ``model`` on the held-out split of ``data`` (only val/ or test/ is needed),
    class folders mapped to outputs as :func:`open_data` maps them. With ``against`` (another
    model of the same outputs, e.g. the dense one) that model is measured on the same images and
    preprocessing too, and the two are paired image by image (``against`` and ``paired``: the
    second model as the reference, :class:`~adntn.training.evaluate.Paired`)."""
    preprocessing, origin = resolve_preprocessing(config, metadata)
    name, heldout = heldout_split(data, preprocessing)
    indices, classes_source = class_indices(heldout.classes, num_classes, metadata, class_map)
    heldout = stratified_subset(relabel(heldout, indices), max_images, seed)
    predictions = _images_predictions(model, heldout, preprocessing)
    accuracy = _accuracy(predictions)
    result = {"split": name, "images": accuracy.images, **accuracy.describe(), "preprocessing_source": origin,
              "classes": {"folders": len(heldout.classes), "outputs": num_classes, "mapped_by": classes_source}}
    if against is not None:
        reference = _images_predictions(against, heldout, preprocessing)
        result.update(against=_accuracy(reference).describe(), paired=_paired(predictions, reference).describe())
    return result
