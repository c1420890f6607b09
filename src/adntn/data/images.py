"""Image data: preprocessing (from a config file, checkpoint metadata or ImageNet defaults) and
ImageFolder splits.

The data root holds ``train/`` and a held-out split (``val/``, else ``test/``), each with one
folder of images per class, as torchvision's ``ImageFolder`` expects. Every problem with the
layout is an :class:`AdntnError` naming the folder at fault. Images are opened lazily, when a
batch needs them: an unreadable image, or images of different sizes in one batch, is an
:class:`ImageDataError` (one sentence naming the file, even from a DataLoader worker process).
The folder scan does not follow symlinks to directories (a symlink loop would repeat a class's
images many times over); a symlink to an image file is an image.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import datasets, transforms

from adntn.errors import AdntnError
from adntn.seeding import epoch_seed

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HELDOUT_SPLITS = ("val", "test")  # the first present is the held-out split
CONFIG_KEYS = ("resize", "crop", "mean", "std", "batch_size", "workers")
DEFAULT_BATCH_SIZE = 128
DEFAULT_WORKERS = 2


@dataclass(frozen=True)
class Preprocessing:
    """How images become model inputs, and how they are batched.

    Attributes:
        resize: shorter image side after resizing, or None to keep the size.
        crop: side of the centre crop, or None for no crop.
        mean, std: per-channel normalisation of RGB values in [0, 1].
        batch_size: images per batch when running the model over a split.
        workers: DataLoader worker processes decoding images.
    """

    resize: int | None
    crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int = DEFAULT_WORKERS

    def transform(self) -> transforms.Compose:
        """PIL image -> normalised float tensor (3, H, W)."""
        steps: list = []
        if self.resize is not None:
            steps.append(transforms.Resize(self.resize))
        if self.crop is not None:
            steps.append(transforms.CenterCrop(self.crop))
        steps += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        return transforms.Compose(steps)

    def describe(self) -> dict:
        """The settings as plain JSON-able values, for the report."""
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
                "batch_size": self.batch_size, "workers": self.workers}


IMAGENET_DEFAULTS = Preprocessing(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _positive_int(value: object, what: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdntnError(f"{what} in {source} must be a positive integer, not {value!r}.")
    return value


def _nonnegative_workers(value: object, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AdntnError(f"workers in {source} must be an integer >= 0, not {value!r}.")
    return value


def _triple(value: object, what: str, source: str, positive: bool) -> tuple[float, float, float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in value)
            or (positive and min(value) <= 0)):
        kind = "three positive numbers" if positive else "three numbers"
        raise AdntnError(f"{what} in {source} must be a list of {kind} (one per RGB channel), not {value!r}.")
    return tuple(float(v) for v in value)


def _from_config(path: Path) -> Preprocessing:
    source = f"config file {path}"
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdntnError(f"Config file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise AdntnError(f"Config file {path} cannot be read ({error}).") from None
    except tomllib.TOMLDecodeError as error:
        raise AdntnError(f"Config file {path} is not valid TOML ({error}).") from None
    unknown_tables = sorted(set(document) - {"preprocessing"})
    if unknown_tables:
        raise AdntnError(f"Config file {path} has unknown entries {', '.join(unknown_tables)}; "
                         "only a [preprocessing] table is allowed.")
    table = document.get("preprocessing")
    if not isinstance(table, dict):
        raise AdntnError(f"Config file {path} has no [preprocessing] table.")
    unknown = sorted(set(table) - set(CONFIG_KEYS))
    if unknown:
        raise AdntnError(f"Unknown key(s) {', '.join(unknown)} in [preprocessing] of {path}; "
                         f"allowed: {', '.join(CONFIG_KEYS)}.")
    for required in ("mean", "std"):
        if required not in table:
            raise AdntnError(f"The [preprocessing] table of {path} must set '{required}'.")
    return Preprocessing(
        resize=None if "resize" not in table else _positive_int(table["resize"], "resize", source),
        crop=None if "crop" not in table else _positive_int(table["crop"], "crop", source),
        mean=_triple(table["mean"], "mean", source, positive=False),
        std=_triple(table["std"], "std", source, positive=True),
        batch_size=_positive_int(table.get("batch_size", DEFAULT_BATCH_SIZE), "batch_size", source),
        workers=_nonnegative_workers(table.get("workers", DEFAULT_WORKERS), source),
    )


def _from_metadata(metadata: dict[str, str]) -> Preprocessing:
    """mean/std (JSON lists) and optional input_size (JSON int) from safetensors metadata.

    ``input_size`` S becomes resize S + centre crop S: images are brought to the S x S the model
    was trained on, and images already S x S pass through untouched.
    """
    source = "the checkpoint metadata"
    values = {}
    for key in ("mean", "std", "input_size"):
        if key in metadata:
            try:
                values[key] = json.loads(metadata[key])
            except json.JSONDecodeError:
                raise AdntnError(f"Checkpoint metadata '{key}' is not valid JSON: {metadata[key]!r}.") from None
    size = None if "input_size" not in values else _positive_int(values["input_size"], "input_size", source)
    return Preprocessing(
        resize=size, crop=size,
        mean=_triple(values["mean"], "mean", source, positive=False),
        std=_triple(values["std"], "std", source, positive=True),
    )


def resolve_preprocessing(config: Path | None, metadata: dict[str, str]) -> tuple[Preprocessing, str]:
    """The preprocessing to use and where it came from.

    Precedence: the ``config`` TOML file (its ``[preprocessing]`` table) if given; else the
    checkpoint's safetensors ``metadata`` when it has both ``mean`` and ``std``; else the
    ImageNet defaults (resize 256, centre crop 224, ImageNet mean/std).

    Returns:
        (preprocessing, source) with source ``"config FILE"``, ``"checkpoint metadata"`` or
        ``"ImageNet defaults"``.
    """
    if config is not None:
        return _from_config(Path(config)), f"config {config}"
    present = [key for key in ("mean", "std") if key in metadata]
    if len(present) == 2:
        return _from_metadata(metadata), "checkpoint metadata"
    if present:
        raise AdntnError(f"The checkpoint metadata has '{present[0]}' but not "
                         f"'{'std' if present[0] == 'mean' else 'mean'}'; pass --config to set both.")
    return IMAGENET_DEFAULTS, "ImageNet defaults"


@dataclass
class Splits:
    """The training split and the held-out split of an image folder tree.

    ``classes`` is the class folder names in label order (sorted, as ImageFolder numbers them).
    """

    train: datasets.ImageFolder
    heldout: datasets.ImageFolder
    heldout_name: str
    classes: list[str]


class ImageDataError(AdntnError):
    """An :class:`AdntnError` about the images that keeps its one sentence across DataLoader workers.

    An exception raised in a worker process reaches the main process as ``type(error)(text)``
    with ``text`` the worker's formatted traceback (``torch.utils.data``'s
    ``ExceptionWrapper.reraise``); this class recovers the sentence from that traceback's last
    line, so the CLI still prints one sentence.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_worker_sentence(message, type(self)))


def _worker_sentence(message: str, kind: type) -> str:
    if not message.startswith(f"Caught {kind.__name__} in DataLoader worker"):
        return message
    prefix = f"{kind.__module__}.{kind.__qualname__}: "
    for line in reversed(message.splitlines()):
        if line.startswith(prefix):
            return line[len(prefix):]
    return message


def load_image(path: str) -> Image.Image:
    """ImageFolder's loader (the file as an RGB PIL image), failing with one sentence naming ``path``.

    Raises:
        ImageDataError: the file cannot be opened, is empty, is not a decodable image (corrupt,
            truncated, another format), or has more pixels than PIL decodes safely.
    """
    try:
        stream = open(path, "rb")
    except OSError as error:
        raise ImageDataError(f"Cannot read image {path}: {error.strerror or error}.") from None
    with stream:
        try:
            return Image.open(stream).convert("RGB")
        except Image.DecompressionBombError:
            limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 0
            raise ImageDataError(f"Image {path} has more than {limit:,} pixels, PIL's safe limit; "
                                 "it may be a decompression bomb.") from None
        except MemoryError:
            raise
        except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ...
            if os.fstat(stream.fileno()).st_size == 0:
                raise ImageDataError(f"Image {path} is empty (0 bytes).") from None
            reason = ("PIL cannot identify its format" if isinstance(error, UnidentifiedImageError)
                      else " ".join(str(error).split()).rstrip(".") or type(error).__name__)
            raise ImageDataError(f"Image {path} is corrupt, truncated or not an image ({reason}).") from None


def collate_images(batch: list) -> object:
    """``default_collate``, refusing (image, label) samples whose images differ in size.

    Raises:
        ImageDataError: two images of the batch have different shapes.
    """
    shapes = sorted({tuple(sample[0].shape) for sample in batch
                     if isinstance(sample, (tuple, list)) and sample and isinstance(sample[0], torch.Tensor)})
    if len(shapes) > 1:
        sizes = " and ".join("x".join(map(str, shape[-2:])) for shape in shapes[:2])
        raise ImageDataError(f"The images are not all the same size ({sizes} pixels in one batch); set resize "
                             "and crop in the [preprocessing] table of the --config file to bring them to one.")
    return default_collate(batch)


class _ImageFolder(datasets.ImageFolder):
    """ImageFolder that loads with :func:`load_image` and scans without following directory symlinks."""

    def __init__(self, root: Path, transform: transforms.Compose) -> None:
        super().__init__(root, transform=transform, loader=load_image, allow_empty=True)

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False) -> list[tuple[str, int]]:
        """(path, class index) of every image below each class folder, in sorted order; a
        class folder may itself be a symlink, directory symlinks below it are not followed."""
        extensions = tuple(extensions or datasets.folder.IMG_EXTENSIONS)
        samples = []
        for name in sorted(class_to_idx):
            class_dir = os.path.join(directory, name)
            if not os.path.isdir(class_dir):
                continue
            for folder, _, files in sorted(os.walk(class_dir, followlinks=False)):
                samples += [(os.path.join(folder, file), class_to_idx[name])
                            for file in sorted(files) if file.lower().endswith(extensions)]
        return samples


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir())


def _image_folder(split_dir: Path, preprocessing: Preprocessing) -> datasets.ImageFolder:
    folder = _ImageFolder(split_dir, preprocessing.transform())
    counts = torch.bincount(torch.tensor(folder.targets, dtype=torch.long), minlength=len(folder.classes))
    empty = [name for name, count in zip(folder.classes, counts.tolist()) if count == 0]
    if empty:
        raise AdntnError(f"Class folder {split_dir / empty[0]} holds no images "
                         f"({', '.join(datasets.folder.IMG_EXTENSIONS)}).")
    return folder


def image_splits(root: Path, preprocessing: Preprocessing) -> Splits:
    """Open ``root/train`` and ``root/val`` (or ``root/test``) as ImageFolder datasets.

    Both splits must have the same class folders, each holding at least one image. Samples are
    transformed by ``preprocessing.transform()`` into tensors (3, H, W) with integer labels.
    """
    root = Path(root)
    check_data_folder(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise AdntnError(f"Data folder {root} has no train/ folder.")
    heldout_name = next((name for name in HELDOUT_SPLITS if (root / name).is_dir()), None)
    if heldout_name is None:
        raise AdntnError(f"Data folder {root} has no val/ or test/ folder for the held-out split.")
    heldout_dir = root / heldout_name
    train_classes, heldout_classes = _class_folders(train_dir), _class_folders(heldout_dir)
    if not train_classes:
        raise AdntnError(f"{train_dir} has no class folders.")
    if train_classes != heldout_classes:
        only_train = sorted(set(train_classes) - set(heldout_classes))
        only_heldout = sorted(set(heldout_classes) - set(train_classes))
        raise AdntnError(f"The class folders of train/ and {heldout_name}/ differ "
                         f"(only in train/: {', '.join(only_train) or 'none'}; "
                         f"only in {heldout_name}/: {', '.join(only_heldout) or 'none'}).")
    return Splits(train=_image_folder(train_dir, preprocessing), heldout=_image_folder(heldout_dir, preprocessing),
                  heldout_name=heldout_name, classes=train_classes)


def check_classes(splits: Splits, num_classes: int) -> None:
    """Raise :class:`AdntnError` unless the data has exactly the model's number of classes."""
    if len(splits.classes) != num_classes:
        raise AdntnError(f"The data has {len(splits.classes)} class folders but the model predicts "
                         f"{num_classes} classes.")


class ImageLoader(DataLoader):
    """A DataLoader batching with :func:`collate_images` whose worker processes stop as soon as an
    iteration ends early (an error, a ``break``).

    Left to the garbage collector, the workers of an iteration that raised are shut down only
    when its reference cycle is collected, and that shutdown took 5 s (torch's join timeout) in
    our measurement; a worker process forked meanwhile also inherits the dead iterator.
    """

    def __init__(self, dataset: Dataset, **options) -> None:
        super().__init__(dataset, collate_fn=collate_images, **options)

    def __iter__(self):
        iterator = super().__iter__()
        try:
            yield from iterator
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)  # multi-process iterators only
            if shutdown is not None:
                shutdown()


def image_loader(dataset: Dataset, preprocessing: Preprocessing, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Batches (images (b, 3, H, W), labels (b,)) of ``dataset``; shuffled by a ``seed``ed generator."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return ImageLoader(dataset, batch_size=preprocessing.batch_size, shuffle=shuffle, generator=generator,
                       num_workers=preprocessing.workers)



# --- class folders -> model outputs, subsets, held-out split alone, sharded training batches ----
# (new functions; the ones above are untouched by them)

def read_class_map(path: Path) -> dict[str, int]:
    """``--class-map FILE``: folder name -> output index.

    Either a JSON object ``{"n01440764": 0, ...}``, or text with one line per output in output
    order whose first whitespace-separated token is the folder name (ImageNet's
    ``LOC_synset_mapping.txt`` as it is: ``n01440764 tench, Tinca tinca``); blank lines and lines
    starting with ``#`` are skipped.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AdntnError(f"Class map {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise AdntnError(f"Class map {path} cannot be read ({error}).") from None
    if text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as error:
            raise AdntnError(f"Class map {path} is not valid JSON ({error}).") from None
        bad = next((k for k, v in mapping.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0), None)
        if bad is not None:
            raise AdntnError(f"Class map {path} maps '{bad}' to {mapping[bad]!r}; indices are integers >= 0.")
        return dict(mapping)
    names = [line.split()[0] for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    repeated = next((name for name in names if names.count(name) > 1), None) if len(set(names)) < len(names) else None
    if repeated is not None:
        raise AdntnError(f"Class map {path} names '{repeated}' twice.")
    return {name: index for index, name in enumerate(names)}


def class_indices(folders: list[str], num_classes: int, metadata: dict[str, str],
                  class_map: Path | None = None) -> tuple[dict[str, int], str]:
    """Which model output each class folder is, and how that was decided.

    By ``class_map`` (see :func:`read_class_map`) when given; else by the checkpoint metadata's
    ``classes`` (a JSON list of names in output order) when it has one; else by sorted folder
    order, only when there are as many folders as outputs. Fewer folders than outputs (a subset)
    is fine with a map or a class list; every folder must be named and every index < num_classes.
    """
    if class_map is not None:
        mapping, source = read_class_map(class_map), f"class map {class_map}"
    elif "classes" in metadata:
        try:
            names = json.loads(metadata["classes"])
        except json.JSONDecodeError:
            raise AdntnError(f"Checkpoint metadata 'classes' is not valid JSON: {metadata['classes']!r}.") from None
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise AdntnError("Checkpoint metadata 'classes' must be a JSON list of names.")
        mapping, source = {name: index for index, name in enumerate(names)}, "checkpoint metadata classes"
    else:
        if len(folders) != num_classes:
            raise AdntnError(f"The data has {len(folders)} class folders but the model predicts {num_classes} "
                             "classes; pass --class-map FILE to say which output each folder is.")
        return {name: index for index, name in enumerate(folders)}, "sorted folder names"
    unknown = [name for name in folders if name not in mapping]
    if unknown:
        raise AdntnError(f"Class folder '{unknown[0]}' is not in the {source} "
                         f"({len(unknown)} of {len(folders)} folders are not); pass --class-map FILE.")
    beyond = next((name for name in folders if mapping[name] >= num_classes), None)
    if beyond is not None:
        raise AdntnError(f"The {source} maps '{beyond}' to output {mapping[beyond]}, but the model has "
                         f"{num_classes} outputs.")
    return {name: mapping[name] for name in folders}, source


def relabel(folder: datasets.ImageFolder, indices: dict[str, int]) -> datasets.ImageFolder:
    """A copy of ``folder`` whose labels are model output indices (``indices``: folder name -> output)."""
    by_label = [indices[name] for name in folder.classes]
    copy_ = copy.copy(folder)
    copy_.samples = [(path, by_label[label]) for path, label in folder.samples]
    copy_.imgs = copy_.samples
    copy_.targets = [label for _, label in copy_.samples]
    return copy_


def stratified_indices(labels: Sequence[int], max_count: int | None, seed: int) -> list[int]:
    """At most ``max_count`` positions of ``labels``, each class in proportion to its share (a seeded
    random choice within each class), in ascending order; all of them when ``max_count`` is None."""
    if max_count is None or max_count >= len(labels):
        return list(range(len(labels)))
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    ranked = []  # (position within the class as a fraction, class, sample index)
    for label, members in sorted(by_class.items()):
        order = torch.randperm(len(members), generator=generator).tolist()
        ranked += [((position + 0.5) / len(members), label, members[i]) for position, i in enumerate(order)]
    return sorted(index for _, _, index in sorted(ranked)[:max_count])


def stratified_subset(folder: datasets.ImageFolder, max_images: int | None, seed: int) -> datasets.ImageFolder:
    """A copy of ``folder`` with at most ``max_images`` samples (:func:`stratified_indices`), kept in
    folder order."""
    if max_images is None or max_images >= len(folder.samples):
        return folder
    chosen = stratified_indices([label for _, label in folder.samples], max_images, seed)
    copy_ = copy.copy(folder)
    copy_.samples = [folder.samples[i] for i in chosen]
    copy_.imgs = copy_.samples
    copy_.targets = [label for _, label in copy_.samples]
    return copy_


def check_data_folder(root: Path) -> None:
    """Refuse a ``--data`` that is missing or not a folder."""
    if root.is_dir():
        return
    if root.exists():
        raise AdntnError(f"Data folder {root} is a file; --data takes a folder holding train/ and val/ "
                         "(an archive must be unpacked first).")
    raise AdntnError(f"Data folder {root} does not exist.")


def heldout_split(root: Path, preprocessing: Preprocessing) -> tuple[str, datasets.ImageFolder]:
    """(name, dataset) of ``root/val`` (or ``root/test``) alone, for an evaluation (no train/ needed)."""
    root = Path(root)
    check_data_folder(root)
    name = next((name for name in HELDOUT_SPLITS if (root / name).is_dir()), None)
    if name is None:
        raise AdntnError(f"Data folder {root} has no val/ or test/ folder for the held-out split.")
    if not _class_folders(root / name):
        raise AdntnError(f"{root / name} has no class folders.")
    return name, _image_folder(root / name, preprocessing)


class GlobalBatches(torch.utils.data.Sampler):
    """Batches of a seeded shuffle, ``batch_size`` samples each, of which this rank takes its
    contiguous share (all of it outside torchrun): a new order every epoch, the same on every rank."""

    def __init__(self, samples: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.samples, self.batch_size, self.rank, self.world = samples, batch_size, rank, world
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """The order of epoch ``epoch`` comes from (seed, epoch): a resumed run sees the same."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    def global_size(self, step: int) -> int:
        """Samples in global batch ``step`` (all ranks together)."""
        return min(self.batch_size, self.samples - step * self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.samples, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))
        for batch in order.split(self.batch_size):
            first, last = len(batch) * self.rank // self.world, len(batch) * (self.rank + 1) // self.world
            yield batch[first:last].tolist()


def training_loader(dataset: Dataset, preprocessing: Preprocessing, seed: int) -> DataLoader:
    """Shuffled training batches of ``preprocessing.batch_size`` images, each rank its share under torchrun."""
    from adntn import distributed

    sampler = GlobalBatches(len(dataset), preprocessing.batch_size, seed, distributed.rank(),
                            distributed.world_size())
    return ImageLoader(dataset, batch_sampler=sampler, num_workers=preprocessing.workers)
