"""Running the frozen part of a model once: trunk features, their disk cache, recorded layer inputs.

For torchvision AlexNet/VGG, ``model(x) == head(trunk(x))`` with trunk = features + avgpool +
flatten and head = classifier. When every compressed layer is in the head, the trunk runs once
per image and fine-tuning and evaluation work on its cached output, (n, f) floats.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from adntn.data.images import ImageLoader, Preprocessing
from adntn.errors import AdntnError
from adntn.progress import Progress, Silent


def split_at_classifier(model: nn.Module) -> tuple[nn.Module, nn.Sequential]:
    """(trunk, head) of an AlexNet/VGG-style model, sharing the model's modules.

    trunk: images (n, 3, H, W) -> features (n, f), i.e. features + avgpool + flatten;
    head: ``model.classifier``, features (n, f) -> logits (n, classes).
    """
    missing = [name for name in ("features", "avgpool", "classifier") if not hasattr(model, name)]
    if missing:
        raise AdntnError(f"The model has no {', '.join(missing)} module(s); only AlexNet/VGG-style models "
                         "(features, avgpool, classifier) can be split.")
    return nn.Sequential(model.features, model.avgpool, nn.Flatten(1)), model.classifier


# what torch's conv and pooling layers say when an input is smaller than their window
_TOO_SMALL = ("Output size is too small", "Kernel size can't be greater than actual input size")


@contextmanager
def input_size_errors(images: torch.Tensor) -> Iterator[None]:
    """Turn a layer's "input too small" RuntimeError while running on ``images`` (n, C, H, W)
    into an :class:`AdntnError` naming their size."""
    try:
        yield
    except RuntimeError as error:
        if images.dim() != 4 or not any(words in str(error) for words in _TOO_SMALL):
            raise
        height, width = images.shape[-2:]
        raise AdntnError(f"The model cannot run on {height}x{width} images: they are too small for its "
                         "layers; set a larger resize and crop in the [preprocessing] table of the "
                         "--config file.") from None


@torch.no_grad()
def compute_features(trunk: nn.Module, dataset: Dataset, batch_size: int, workers: int,
                     progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``trunk`` in eval mode over ``dataset`` (in order), reporting to ``progress``.

    Returns:
        features (n, f) float32 on the CPU and labels (n,) int64, n = len(dataset).
    """
    loader = ImageLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    device = next(trunk.parameters()).device
    was_training = trunk.training
    trunk.eval()
    advance = (progress or Silent()).task("trunk features", len(loader))
    features, labels = [], []
    try:
        for done, (images, targets) in enumerate(loader, start=1):
            with input_size_errors(images):
                output = trunk(images.to(device))
            features.append(output.flatten(1).float().cpu())
            labels.append(targets.long())
            advance(done, None)
    finally:
        trunk.train(was_training)
    return torch.cat(features), torch.cat(labels)


def feature_cache_key(checkpoint_sha256: str, split_dir: Path, preprocessing: Preprocessing) -> str:
    """What determines a split's trunk features: the checkpoint, the images, their preprocessing."""
    transform = {name: preprocessing.describe()[name] for name in ("resize", "crop", "mean", "std")}
    return json.dumps({"checkpoint": checkpoint_sha256, "split": str(Path(split_dir).resolve()),
                       "preprocessing": transform}, sort_keys=True)


class CachedFeatures(NamedTuple):
    features: torch.Tensor  # (n, f) float32
    labels: torch.Tensor  # (n,) int64
    from_cache: bool  # True when read from the disk cache, False when the trunk ran


def cached_features(trunk: nn.Module, dataset: Dataset, key: str, cache_dir: Path | None,
                    batch_size: int, workers: int, progress: Progress | None = None) -> CachedFeatures:
    """:func:`compute_features`, stored in ``cache_dir`` under a name derived from ``key``.

    ``key`` must change whenever the features would (see :func:`feature_cache_key`). The file is
    ``features-<sha256(key)>.safetensors``, written atomically (temporary file + rename), and only
    reused when its recorded key and sample count match. Without ``cache_dir`` nothing is stored.
    """
    if cache_dir is None:
        return CachedFeatures(*compute_features(trunk, dataset, batch_size, workers, progress), from_cache=False)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"features-{hashlib.sha256(key.encode()).hexdigest()}.safetensors"
    stored = _read_cache(path, key, len(dataset))
    if stored is not None:
        return CachedFeatures(*stored, from_cache=True)
    features, labels = compute_features(trunk, dataset, batch_size, workers, progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    os.close(handle)
    try:
        save_file({"features": features.contiguous(), "labels": labels}, temporary, metadata={"key": key})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return CachedFeatures(features, labels, from_cache=False)


def _read_cache(path: Path, key: str, samples: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features, labels) from a cache file, or None when absent, unreadable or not for ``key``."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as handle:
            if (handle.metadata() or {}).get("key") != key:
                return None
        tensors = load_file(str(path))
    except (OSError, SafetensorError):
        return None
    if set(tensors) != {"features", "labels"} or len(tensors["labels"]) != samples:
        return None
    return tensors["features"], tensors["labels"]


@torch.no_grad()
def record_inputs(model: nn.Module, module_names: list[str], inputs: Iterable,
                  max_samples: int) -> dict[str, torch.Tensor]:
    """The input of each named module on the first ``max_samples`` samples of ``inputs``.

    ``model`` runs in eval mode; ``inputs`` yields batches that ``model`` accepts (images for a
    whole model, trunk features for a head), or ``(batch, labels)`` pairs such as a DataLoader's.
    It stops as soon as enough samples are seen.

    Returns:
        name -> tensor (m, in_features) for a Linear, (m, C, H, W) for a Conv2d, on the CPU,
        m = min(max_samples, samples in ``inputs``).
    """
    recorded: dict[str, list[torch.Tensor]] = {name: [] for name in module_names}
    handles = []
    for name in module_names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdntnError(f"The model has no module named '{name}'.") from None
        handles.append(module.register_forward_pre_hook(
            lambda _module, args, name=name: recorded[name].append(args[0].detach().float().cpu())))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in inputs:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            with input_size_errors(batch):
                model(batch[:max_samples - seen].to(device))
            seen += min(len(batch), max_samples - seen)
            if seen >= max_samples:
                break
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    never_called = [name for name, batches in recorded.items() if not batches]
    if never_called:
        raise RuntimeError(f"modules {never_called} were not called by the model's forward")
    return {name: torch.cat(batches) for name, batches in recorded.items()}
