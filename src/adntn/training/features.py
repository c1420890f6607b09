"""Running the frozen part of a model once: trunk features, their disk cache, recorded layer inputs.

For torchvision AlexNet/VGG, ``model(x) == head(trunk(x))`` with trunk = features + avgpool +
flatten and head = classifier. When every compressed layer is in the head, the trunk runs once
per image and fine-tuning and evaluation work on its cached output, (n, f) values in a file on
disk (:class:`FeatureFile`), read in chunks: memory does not grow with the number of images.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from adntn.data.images import ImageLoader, Preprocessing, stratified_indices
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


def feature_cache_key(checkpoint_sha256: str, split_dir: Path, preprocessing: Preprocessing,
                      samples: str | None = None) -> str:
    """What determines a split's trunk features: the checkpoint, the images, their preprocessing
    (and ``samples``, a digest of the chosen images and labels, e.g. under ``--max-images``)."""
    transform = {name: preprocessing.describe()[name] for name in ("resize", "crop", "mean", "std")}
    return json.dumps({"checkpoint": checkpoint_sha256, "split": str(Path(split_dir).resolve()),
                       "preprocessing": transform, **({"samples": samples} if samples else {})}, sort_keys=True)


FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CHUNK_BYTES = 32 << 20  # stored bytes read at a time (fine-tuning shuffles the order of chunks, then within)
FORMAT = "adntn-features-1"


class FeatureFile:
    """Trunk features (rows, width) on disk, read a chunk at a time; labels (rows,) in memory.

    The values are one raw row-major file in ``dtype`` (``features-*.bin``; 2 bytes per value
    in float16); :meth:`mapped` maps it read-only, :meth:`batches` reads it in chunks of
    ``chunk_rows`` rows with positioned reads, so the process holds one chunk, not the file,
    whatever the number of rows (the page cache, not the process, keeps what was read).
    """

    def __init__(self, path: Path, rows: int, width: int, dtype: torch.dtype, labels: torch.Tensor,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.path, self.rows, self.width, self.dtype, self.labels = Path(path), rows, width, dtype, labels
        self.row_bytes = width * torch.tensor([], dtype=dtype).element_size()
        self.chunk_rows = max(1, chunk_bytes // self.row_bytes)

    def __len__(self) -> int:
        return self.rows

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) as float32 (stop - start, width)."""
        stop = self.rows if stop is None else min(stop, self.rows)
        count = max(0, stop - start)
        buffer = bytearray(count * self.row_bytes)
        if count:
            with open(self.path, "rb") as handle:
                handle.seek(start * self.row_bytes)
                if handle.readinto(buffer) != len(buffer):
                    raise AdntnError(f"The feature file {self.path} is shorter than its {self.rows:,} rows.")
        return torch.frombuffer(buffer, dtype=self.dtype).view(count, self.width).float() if count else \
            torch.empty(0, self.width)

    def mapped(self) -> torch.Tensor:
        """The whole file as a read-only memory-mapped (rows, width) tensor in its stored dtype."""
        import warnings

        import numpy as np

        storage = {torch.float16: np.float16, torch.float32: np.float32}.get(self.dtype, np.int16)
        array = np.memmap(self.path, dtype=storage, mode="r", shape=(self.rows, self.width))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "not writable": the tensor is only read
            tensor = torch.from_numpy(array)
        return tensor if self.dtype in (torch.float16, torch.float32) else tensor.view(self.dtype)

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                start: int = 0, stop: int | None = None):
        """(features float32 (b, width), labels (b,)) of rows [start, stop), ``batch_size`` at a time.

        Without ``generator`` the rows come in order, a chunk at a time. With it, in one seeded
        permutation of all the rows, each batch's rows read by positioned reads (sorted, for
        locality): every batch is a uniform sample of the split. (Shuffling only chunks and the rows
        within them is not: the rows are stored in class order, so a 32 MiB chunk of CIFAR-10's
        512-wide features held seven of its ten classes, and one epoch of such batches cost the
        reference ttn-10000 row 5 points of top-1: 0.8266 against 0.8767.)
        """
        stop = self.rows if stop is None else min(stop, self.rows)
        if generator is None:
            for first in range(start, stop, self.chunk_rows):
                x, y = self.read(first, min(first + self.chunk_rows, stop)), self.labels[first:min(first + self.chunk_rows, stop)]
                for begin in range(0, len(y), batch_size):
                    yield x[begin:begin + batch_size], y[begin:begin + batch_size]
            return
        order = torch.randperm(stop - start, generator=generator) + start
        with open(self.path, "rb") as handle:
            fd = handle.fileno()
            for indices in order.split(batch_size):
                yield self._rows(fd, indices), self.labels[indices]

    def sample(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(features float32 (m, width), labels (m,)) of m = min(count, rows) rows, each class in
        proportion to its share (``stratified_indices``; the rows are stored in class order, so the
        first rows would be one class), in file order."""
        indices = torch.tensor(stratified_indices(self.labels.tolist(), count, seed), dtype=torch.long)
        with open(self.path, "rb") as handle:
            return self._rows(handle.fileno(), indices), self.labels[indices]

    def _rows(self, fd: int, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` (in that order) as float32 (len, width), by positioned reads."""
        ranked = torch.argsort(indices)
        buffer = bytearray(len(indices) * self.row_bytes)
        view = memoryview(buffer)
        for slot, row in zip(ranked.tolist(), indices[ranked].tolist()):
            chunk = os.pread(fd, self.row_bytes, row * self.row_bytes)
            if len(chunk) != self.row_bytes:
                raise AdntnError(f"The feature file {self.path} is shorter than its {self.rows:,} rows.")
            view[slot * self.row_bytes:(slot + 1) * self.row_bytes] = chunk
        return torch.frombuffer(buffer, dtype=self.dtype).view(len(indices), self.width).float()


class CachedFeatures(NamedTuple):
    features: FeatureFile  # (n, f) on disk
    labels: torch.Tensor  # (n,) int64
    from_cache: bool  # True when read from the disk cache, False when the trunk ran


def _paths(cache_dir: Path, key: str) -> tuple[Path, Path, Path]:
    stem = f"features-{hashlib.sha256(key.encode()).hexdigest()}"
    return cache_dir / f"{stem}.bin", cache_dir / f"{stem}.labels", cache_dir / f"{stem}.json"


@torch.no_grad()
def write_features(trunk: nn.Module, dataset: Dataset, values: Path, labels_path: Path, dtype: torch.dtype,
                   batch_size: int, workers: int, progress: Progress | None = None) -> tuple[int, torch.Tensor]:
    """Run ``trunk`` (eval mode) over ``dataset`` in order, appending each batch's features to
    ``values`` (raw, ``dtype``) and labels to ``labels_path`` (raw int64) as it goes.

    Under torchrun each rank runs its contiguous share of the batches and writes it at its offset
    of the same files (which must then be on a disk all ranks see). Returns (width, labels).
    """
    from adntn import distributed

    n = len(dataset)
    batches = math.ceil(n / batch_size)
    first_batch, last_batch = distributed.shard(batches)
    first, last = first_batch * batch_size, min(last_batch * batch_size, n)
    if distributed.is_main():
        for path in (values, labels_path):
            path.unlink(missing_ok=True)
            path.touch()
    distributed.barrier()
    loader = ImageLoader(Subset(dataset, range(first, last)), batch_size=batch_size, shuffle=False,
                         num_workers=workers)
    device = next(trunk.parameters()).device
    was_training = trunk.training
    trunk.eval()
    advance = (progress or Silent()).task("trunk features", len(loader))
    width, row = 0, first
    value_fd = os.open(values, os.O_WRONLY)
    label_fd = os.open(labels_path, os.O_WRONLY)
    try:
        for done, (images, targets) in enumerate(loader, start=1):
            with input_size_errors(images):
                features = trunk(images.to(device)).flatten(1).float().cpu()
            stored = features.to(dtype)
            if not torch.isfinite(stored).all():
                raise AdntnError(f"Trunk features reach {features.abs().max():.3g}, beyond {dtype}; "
                                 "pass --feature-dtype bfloat16 or float32.")
            width = features.shape[1]
            raw = stored.view(torch.int16) if dtype == torch.bfloat16 else stored
            os.pwrite(value_fd, raw.contiguous().numpy().tobytes(), row * raw.shape[1] * raw.element_size())
            os.pwrite(label_fd, targets.long().numpy().tobytes(), row * 8)
            row += len(targets)
            advance(done, None)
    finally:
        os.close(value_fd)
        os.close(label_fd)
        trunk.train(was_training)
    width = int(distributed.max_all(width))  # a rank without batches learns it from the others
    distributed.barrier()
    labels = torch.from_file(str(labels_path), shared=False, size=n, dtype=torch.long).clone()
    return width, labels


def cached_features(trunk: nn.Module, dataset: Dataset, key: str, cache_dir: Path | None,
                    batch_size: int, workers: int, progress: Progress | None = None,
                    dtype: torch.dtype = torch.float16, chunk_bytes: int = CHUNK_BYTES,
                    width: int | None = None) -> CachedFeatures:
    """The trunk's features over ``dataset`` as a :class:`FeatureFile` in ``cache_dir``.

    ``key`` must change whenever the features would (see :func:`feature_cache_key`). The files are
    ``features-<sha256(key)>.{bin,labels,json}``; the JSON (key, rows, width, dtype) is written
    last and atomically, and a cache is reused only when it matches, its labels are the dataset's
    and its width is ``width`` (the features the head takes) when given: a damaged or tampered
    cache is recomputed, never trusted. Without ``cache_dir`` the files go to a temporary folder
    that is removed when the process exits.

    float16 is the default storage: on the reference CIFAR-10 VGG-16-BN it moves the head's
    logits by 3.8e-5 relative and changes no prediction of 500 test images (bfloat16: 3.1e-4;
    ``bench/results/feature-dtype.md``); values beyond 65,504 are refused with a sentence.
    """
    from adntn import distributed

    if cache_dir is None:
        cache_dir = Path(distributed.broadcast(_temporary_dir() if distributed.is_main() else None))
        reuse = False
    else:
        cache_dir = Path(cache_dir)
        reuse = True
    dtype_name = str(dtype).removeprefix("torch.")
    values, labels_path, meta = _paths(cache_dir, key)
    if reuse:
        stored = _read_cache(meta, values, labels_path, key, len(dataset), dtype_name, dataset, width)
        distributed.barrier()
        if stored is not None:
            width, labels = stored
            return CachedFeatures(FeatureFile(values, len(dataset), width, dtype, labels, chunk_bytes), labels, True)
    if distributed.is_main():
        cache_dir.mkdir(parents=True, exist_ok=True)
        meta.unlink(missing_ok=True)
    distributed.barrier()
    width, labels = write_features(trunk, dataset, values, labels_path, dtype, batch_size, workers, progress)
    if distributed.is_main():
        handle, temporary = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            json.dump({"format": FORMAT, "key": key, "rows": len(dataset), "width": width, "dtype": dtype_name}, out)
        os.replace(temporary, meta)
    distributed.barrier()
    return CachedFeatures(FeatureFile(values, len(dataset), width, dtype, labels, chunk_bytes), labels, False)


_TEMPORARY: list[tempfile.TemporaryDirectory] = []


def _temporary_dir() -> str:
    folder = tempfile.TemporaryDirectory(prefix="adntn-features-")
    _TEMPORARY.append(folder)  # removed at exit (or when the process's last reference goes)
    return folder.name


def _read_cache(meta: Path, values: Path, labels_path: Path, key: str, samples: int,
                dtype_name: str, dataset: Dataset, width: int | None) -> tuple[int, torch.Tensor] | None:
    """(width, labels) of a complete cache for ``key``, or None when absent, partial or another's,
    or when its labels are not the dataset's or its width is not ``width``."""
    try:
        described = json.loads(meta.read_text())
        if (described.get("format"), described.get("key"), described.get("rows"), described.get("dtype")) != \
                (FORMAT, key, samples, dtype_name):
            return None
        stored_width = int(described["width"])
        itemsize = FEATURE_DTYPES[dtype_name].itemsize
        if values.stat().st_size != samples * stored_width * itemsize or labels_path.stat().st_size != samples * 8:
            return None
        if width is not None and stored_width != width:
            return None
        labels = torch.from_file(str(labels_path), shared=False, size=samples, dtype=torch.long).clone()
        expected = dataset_labels(dataset)
        if expected is not None and not torch.equal(labels, expected):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return stored_width, labels


def dataset_labels(dataset: Dataset) -> torch.Tensor | None:
    """The labels of an ImageFolder-like dataset (its ``samples``), without reading an image."""
    samples = getattr(dataset, "samples", None)
    return None if samples is None else torch.tensor([label for _, label in samples], dtype=torch.long)


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
