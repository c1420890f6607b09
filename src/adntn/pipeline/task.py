"""The data-aware stages of ``compress --data`` and the held-out evaluation of ``adntn eval``.

Stage 2 (activation space): each generator is refined on ||X W^T - X G^T|| / ||X W^T|| for inputs
X of its layer recorded from the dense model on training images. Stage 3 (task-aware): all
compressed layers are fine-tuned together on cross-entropy plus distillation from the dense
model's logits. Every accuracy is measured on the held-out split (val/ or test/).

When every compressed layer is in the classifier, the convolutional trunk is run once per split
and its features cached (in memory, and on disk with ``cache_dir``); fine-tuning and evaluation
then run the classifier alone, which makes CPU fine-tuning take minutes. Convolutional layers
take the full forward pass over the images.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from adntn.models.architectures import LayerInfo, ModelInfo, build_model, detect_model, resolve_layers
from adntn.io.archive import CompressedLayer
from adntn.data.images import Preprocessing, Splits, check_classes, image_loader, image_splits, resolve_preprocessing
from adntn.training.distill import FinetuneConfig, finetune, finetune_full, generated_parameters, logits_of
from adntn.training.evaluate import Accuracy, accuracy_of_logits, evaluate, tensor_batches
from adntn.training.features import cached_features, feature_cache_key, record_inputs, split_at_classifier
from adntn.training.fit import fit
from adntn.pipeline.compress import resolve_device
from adntn.models.layers import generated_from, swap_in
from adntn.training.objectives import ActivationObjective
from adntn.progress import Progress

CONV_RECORD_SAMPLES = 32  # conv inputs are whole feature maps (64x224x224 floats = 12.8 MB each)
COVARIANCE_RANK = 256  # input directions kept by the activation-space fit of a linear layer


@dataclass
class TaskSettings:
    """``compress --data`` options: the data, preprocessing and fine-tuning (its seed is --seed)."""

    data: Path
    config: Path | None = None
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    record_samples: int = 4096
    train: tuple[str, ...] = ()
    cache_dir: Path | None = None


@dataclass
class TaskData:
    """Everything a held-out evaluation or a fine-tuning needs, opened once."""

    splits: Splits
    preprocessing: Preprocessing
    preprocessing_source: str


def open_data(data: Path, config: Path | None, metadata: dict[str, str], model: ModelInfo) -> TaskData:
    preprocessing, source = resolve_preprocessing(config, metadata)
    splits = image_splits(data, preprocessing)
    check_classes(splits, model.num_classes)
    return TaskData(splits, preprocessing, source)


def dense_model(state: dict[str, torch.Tensor], info: ModelInfo) -> nn.Module:
    model = build_model(info)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _head_only(layers: list[LayerInfo]) -> bool:
    return all(layer.module.startswith("classifier.") for layer in layers)


def _extra_parameters(model: nn.Module, info: ModelInfo, names: tuple[str, ...],
                      compressed: list[LayerInfo], prefix: str = "") -> dict[str, list[nn.Parameter]]:
    """Groups ``layer:NAME`` for the dense layers that ``--train`` adds (weight and bias)."""
    groups = {}
    taken = {layer.module for layer in compressed}
    for layer in resolve_layers(info, list(names)) if names else []:
        if layer.module in taken:
            continue  # a compressed layer trains anyway
        module = model.get_submodule(layer.module.removeprefix(prefix))
        groups[f"layer:{layer.module}"] = list(module.parameters())
    return groups


def _fit_activation_space(compressed: list[CompressedLayer], rows: list[dict], layers: list[LayerInfo], inputs: dict,
                          state: dict[str, torch.Tensor], steps: int, lr: float, device: torch.device,
                          progress: Progress) -> None:
    for item, row, layer in zip(compressed, rows, layers):
        objective = ActivationObjective(state[layer.weight_key].to(device), inputs[layer.module].to(device),
                                        layer.stride, layer.padding, max_rank=COVARIANCE_RANK)
        item.generator.to(device)
        row["activation_fit_energy"] = objective.energy
        advance = progress.task(f"fit {layer.label} on data", steps)
        fit(item.generator, objective, steps=steps, lr=lr,
            on_step=lambda step, loss: advance(step, math.sqrt(max(loss, 0.0))))


@torch.no_grad()
def _activation_errors(compressed: list[CompressedLayer], layers: list[LayerInfo], inputs: dict,
                       state: dict[str, torch.Tensor]) -> list[float]:
    errors = []
    for item, layer in zip(compressed, layers):
        objective = ActivationObjective(state[layer.weight_key], inputs[layer.module], layer.stride, layer.padding)
        errors.append(math.sqrt(float(objective(item.generator))))
    return errors


def run_task_stages(loaded, layers: list[LayerInfo], compressed: list[CompressedLayer], rows: list[dict],
                    task: TaskSettings, opened: TaskData, settings, progress: Progress) -> dict:
    """Stages 2 and 3 in place on ``compressed`` (and ``rows``); returns the report's additions.

    ``opened`` is :func:`open_data` of ``task`` (opened before any fitting, so bad data fails
    early). Dense layers that ``task.train`` adds are trained too and written back into
    ``loaded.state``.
    """
    info = loaded.model
    splits, preprocessing = opened.splits, opened.preprocessing
    teacher = dense_model(loaded.state, info)
    config = task.finetune
    names = [layer.module for layer in layers]
    head_only = _head_only(layers)
    device = resolve_device(settings.device)

    if head_only:
        trunk, head = split_at_classifier(teacher)
        features = {}
        for split, dataset in (("train", splits.train), (splits.heldout_name, splits.heldout)):
            key = feature_cache_key(loaded.sha256, Path(dataset.root), preprocessing)
            features[split] = cached_features(trunk, dataset, key, task.cache_dir, preprocessing.batch_size,
                                              preprocessing.workers, progress)
        train, heldout = features["train"], features[splits.heldout_name]
        head_names = [name.removeprefix("classifier.") for name in names]
        recorded = record_inputs(head, head_names, [train.features[:task.record_samples]], task.record_samples)
        train_inputs = {name: recorded[short] for name, short in zip(names, head_names)}
        recorded = record_inputs(head, head_names, [heldout.features[:task.record_samples]], task.record_samples)
        heldout_inputs = {name: recorded[short] for name, short in zip(names, head_names)}
        head.to(device)
        dense_accuracy = accuracy_of_logits(logits_of(head, heldout.features, config.batch_size), heldout.labels)

        _fit_activation_space(compressed, rows, layers, train_inputs, loaded.state, settings.steps, settings.lr,
                              device, progress)
        student = copy.deepcopy(head)
        swap_in(student, {short: generated_from(head.get_submodule(short), item.generator)
                          for short, item in zip(head_names, compressed)})
        groups = {f"{kind}:classifier.{name}": params
                  for kind_name, params in generated_parameters(student).items()
                  for kind, name in [kind_name.split(":", 1)]}
        groups.update(_extra_parameters(student, info, task.train, layers, prefix="classifier."))
        result = finetune(student, logits_of(head, train.features, config.batch_size), train.features,
                          train.labels, groups, config, progress)
        compressed_accuracy = accuracy_of_logits(logits_of(student, heldout.features, config.batch_size),
                                                 heldout.labels)
        trained_model, prefix = student, "classifier."
        train_images, heldout_images = len(train.labels), len(heldout.labels)
    else:
        teacher.to(device)
        train_loader = image_loader(splits.train, preprocessing, shuffle=True, seed=settings.seed)
        heldout_loader = image_loader(splits.heldout, preprocessing)
        samples = min(task.record_samples, CONV_RECORD_SAMPLES)
        train_inputs = record_inputs(teacher, names, image_loader(splits.train, preprocessing), samples)
        heldout_inputs = record_inputs(teacher, names, heldout_loader, samples)
        dense_accuracy = evaluate(teacher, heldout_loader)

        _fit_activation_space(compressed, rows, layers, train_inputs, loaded.state, settings.steps, settings.lr,
                              device, progress)
        student = copy.deepcopy(teacher)
        swap_in(student, {name: generated_from(teacher.get_submodule(name), item.generator)
                          for name, item in zip(names, compressed)})
        groups = {**generated_parameters(student), **_extra_parameters(student, info, task.train, layers)}
        result = finetune_full(student, teacher, train_loader, groups, config, progress)
        compressed_accuracy = evaluate(student, heldout_loader)
        trained_model, prefix = student, ""
        train_images, heldout_images = len(splits.train), len(splits.heldout)

    trained_model.cpu()
    for item, name in zip(compressed, names):
        layer_module = trained_model.get_submodule(name.removeprefix(prefix))
        item.generator = layer_module.generator
        item.bias = None if layer_module.bias is None else layer_module.bias.detach().clone()
    for group in groups:
        if group.startswith("layer:"):
            module = group.removeprefix("layer:")
            for key, value in trained_model.get_submodule(module.removeprefix(prefix)).state_dict().items():
                loaded.state[f"{module}.{key}"] = value.detach().clone().to(loaded.state[f"{module}.{key}"].dtype)
    for row, error in zip(rows, _activation_errors(compressed, layers, heldout_inputs, loaded.state)):
        row["activation_rel_error"] = error
        row["activation_steps"] = settings.steps

    trained = ", ".join(result.trained)
    summary = (f"task-aware: {result.epochs} epochs of CE+KD (T={config.temperature}, KD weight {config.kd_weight}, "
               f"{config.student_mode}) "
               f"on {train_images:,} train images of {task.data.name}; trained: {trained}; "
               f"accuracy on {heldout_images:,} {splits.heldout_name} images")
    return {
        "training": {
            "summary": summary,
            "data": str(task.data),
            "train_images": train_images,
            "heldout_split": splits.heldout_name,
            "heldout_images": heldout_images,
            "preprocessing": preprocessing.describe(),
            "preprocessing_source": opened.preprocessing_source,
            "features_cached": head_only,
            "activation_fit": {"samples": len(next(iter(train_inputs.values()))), "steps": settings.steps,
                               "lr": settings.lr, "inputs_from": "dense model, train split"},
            "activation_error_on": f"{len(next(iter(heldout_inputs.values())))} {splits.heldout_name} samples",
            "finetune": {**config.describe(), **result.describe()},
            "trained": result.trained,
        },
        "accuracy": {
            "split": splits.heldout_name,
            "images": heldout_images,
            "dense": dense_accuracy.describe(),
            "compressed": compressed_accuracy.describe(),
        },
    }


def evaluate_state(state: dict[str, torch.Tensor], metadata: dict[str, str], data: Path, config: Path | None,
                   model: str | None = None, progress: Progress | None = None) -> dict:
    """Top-1/top-5 of a dense state_dict on the held-out split of ``data``."""
    info = detect_model(state, override=model)
    opened = open_data(data, config, metadata, info)
    network = dense_model(state, info)
    accuracy: Accuracy = evaluate(network, image_loader(opened.splits.heldout, opened.preprocessing))
    return {"model": info.name, "split": opened.splits.heldout_name, "images": accuracy.images,
            **accuracy.describe(), "preprocessing_source": opened.preprocessing_source}
