"""Preprocessing resolution, ImageFolder splits, trunk features and their cache, recorded inputs."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from adntn.data.images import IMAGENET_DEFAULTS, Preprocessing, check_classes, image_splits, resolve_preprocessing
from adntn.errors import AdntnError
from tolerances import assert_close_scaled
from adntn.training.features import (cached_features, compute_features, feature_cache_key, record_inputs,
                            split_at_classifier)

CLASSES = ("blue", "green", "red")
COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}
CIFAR_METADATA = {"mean": "[0.4914, 0.4822, 0.4465]", "std": "[0.247, 0.2435, 0.2616]", "input_size": "32"}
SAMPLE_CONFIGS = Path(__file__).resolve().parent.parent / "sample_configs"
PLAIN = Preprocessing(resize=None, crop=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), batch_size=4, workers=0)


def write_images(split_dir: Path, classes=CLASSES, per_class: int = 8, seed: int = 0) -> None:
    """``per_class`` 32x32 JPEGs per class: the class colour plus noise."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (split_dir / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(split_dir / name / f"{i:03d}.jpg")


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    write_images(tmp_path / "train")
    write_images(tmp_path / "test", per_class=4, seed=1)
    return tmp_path


class TinyNet(nn.Module):
    """An AlexNet/VGG-shaped model: features (conv) -> avgpool (2x2) -> classifier, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class CountingTrunk(nn.Module):
    """Wraps a trunk and counts its forward calls."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.trunk(x)


# --- preprocessing ---------------------------------------------------------------------------

def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_file_takes_precedence_over_metadata(tmp_path):
    config = write_config(tmp_path / "p.toml", "[preprocessing]\nresize = 40\ncrop = 36\n"
                          "mean = [0.1, 0.2, 0.3]\nstd = [0.4, 0.5, 0.6]\nbatch_size = 7\n")
    preprocessing, source = resolve_preprocessing(config, CIFAR_METADATA)
    assert source == f"config {config}"
    assert preprocessing == Preprocessing(resize=40, crop=36, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6),
                                          batch_size=7)


def test_metadata_takes_precedence_over_defaults():
    preprocessing, source = resolve_preprocessing(None, CIFAR_METADATA)
    assert source == "checkpoint metadata"
    assert preprocessing.mean == (0.4914, 0.4822, 0.4465) and preprocessing.std == (0.247, 0.2435, 0.2616)
    assert (preprocessing.resize, preprocessing.crop) == (32, 32)


def test_defaults_without_config_or_metadata():
    preprocessing, source = resolve_preprocessing(None, {"arch": "vgg16"})
    assert source == "ImageNet defaults"
    assert preprocessing == IMAGENET_DEFAULTS
    assert (preprocessing.resize, preprocessing.crop) == (256, 224)
    assert preprocessing.mean == (0.485, 0.456, 0.406) and preprocessing.std == (0.229, 0.224, 0.225)


def test_metadata_input_size_leaves_images_of_that_size_untouched():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    from_metadata, _ = resolve_preprocessing(None, CIFAR_METADATA)
    untouched = Preprocessing(None, None, from_metadata.mean, from_metadata.std)
    assert torch.equal(from_metadata.transform()(image), untouched.transform()(image))


def test_transform_resizes_crops_and_normalises():
    image = Image.new("RGB", (64, 48), (255, 0, 128))
    tensor = Preprocessing(resize=24, crop=20, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).transform()(image)
    assert tensor.shape == (3, 20, 20)
    assert_close_scaled(tensor[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]))


@pytest.mark.parametrize("text, message", [
    ("[preprocessing]\nmean = [0, 0, 0]\nstd = [1, 1, 1]\nresise = 256\n", "Unknown key.*resise"),
    ("[preprocessing]\nmean = [0, 0, 0]\nstd = [1, 1, 1]\n[compress]\nratio = 10\n", "unknown entries compress"),
    ("[preprocesing]\nmean = [0, 0, 0]\n", "unknown entries preprocesing"),
    ("title = 'x'\n", "unknown entries title"),
    ("", "no \\[preprocessing\\] table"),
    ("[preprocessing]\nstd = [1, 1, 1]\n", "must set 'mean'"),
    ("[preprocessing]\nmean = [0, 0]\nstd = [1, 1, 1]\n", "mean .* three numbers"),
    ("[preprocessing]\nmean = [0, 0, 0]\nstd = [1, 0, 1]\n", "std .* three positive numbers"),
    ("[preprocessing]\nmean = [0, 0, 0]\nstd = [1, 1, 1]\nresize = 'big'\n", "resize .* positive integer"),
    ("[preprocessing]\nmean = [0, 0, 0]\nstd = [1, 1, 1]\nbatch_size = 0\n", "batch_size .* positive integer"),
    ("[preprocessing\n", "not valid TOML"),
])
def test_bad_config_is_one_error(tmp_path, text, message):
    with pytest.raises(AdntnError, match=message):
        resolve_preprocessing(write_config(tmp_path / "bad.toml", text), CIFAR_METADATA)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(AdntnError, match="does not exist"):
        resolve_preprocessing(tmp_path / "absent.toml", {})


@pytest.mark.parametrize("metadata, message", [
    ({"mean": "[0.5, 0.5, 0.5]"}, "has 'mean' but not 'std'"),
    ({"mean": "[0.5, 0.5, 0.5]", "std": "oops"}, "'std' is not valid JSON"),
    ({"mean": "[0.5, 0.5, 0.5]", "std": "[1, 1, 1]", "input_size": "0"}, "input_size .* positive integer"),
])
def test_bad_metadata_is_one_error(metadata, message):
    with pytest.raises(AdntnError, match=message):
        resolve_preprocessing(None, metadata)


def test_sample_configs_resolve():
    configs = sorted(SAMPLE_CONFIGS.glob("*.toml"))
    assert {path.name for path in configs} >= {"imagenet-vgg16.toml", "imagenet-alexnet.toml", "cifar10-vgg16-bn.toml"}
    for path in configs:
        assert path.read_text().startswith("# ")
        preprocessing, _ = resolve_preprocessing(path, {})
        if path.name.startswith("imagenet"):
            assert (preprocessing.resize, preprocessing.crop, preprocessing.mean) == (256, 224, IMAGENET_DEFAULTS.mean)
    cifar, _ = resolve_preprocessing(SAMPLE_CONFIGS / "cifar10-vgg16-bn.toml", {})
    assert (cifar.resize, cifar.crop) == (None, None)
    assert cifar.mean == (0.4914, 0.4822, 0.4465) and cifar.std == (0.2470, 0.2435, 0.2616)


def test_describe_is_json():
    assert json.loads(json.dumps(PLAIN.describe())) == {"resize": None, "crop": None, "mean": [0.5] * 3,
                                                         "std": [0.25] * 3, "batch_size": 4, "workers": 0}


# --- splits ----------------------------------------------------------------------------------

def test_image_splits_reads_train_and_test(image_root):
    splits = image_splits(image_root, PLAIN)
    assert splits.heldout_name == "test"
    assert splits.classes == list(CLASSES)
    assert (len(splits.train), len(splits.heldout)) == (24, 12)
    image, label = splits.train[9]
    assert image.shape == (3, 32, 32) and label == 1
    check_classes(splits, 3)


def test_image_splits_prefers_val_over_test(image_root):
    write_images(image_root / "val", per_class=2)
    splits = image_splits(image_root, PLAIN)
    assert splits.heldout_name == "val" and len(splits.heldout) == 6


def test_class_count_must_match_the_model(image_root):
    with pytest.raises(AdntnError, match="3 class folders but the model predicts 10"):
        check_classes(image_splits(image_root, PLAIN), 10)


def _no_root(root: Path) -> Path:
    return root / "absent"


def _no_train(root: Path) -> Path:
    write_images(root / "test", per_class=1)
    return root


def _no_heldout(root: Path) -> Path:
    write_images(root / "train", per_class=1)
    return root


def _class_mismatch(root: Path) -> Path:
    write_images(root / "train", per_class=1)
    write_images(root / "test", classes=("blue", "red"), per_class=1)
    return root


def _empty_class(root: Path) -> Path:
    write_images(root / "train", per_class=1)
    write_images(root / "test", per_class=1)
    for image in (root / "test" / "green").iterdir():
        image.unlink()
    (root / "test" / "green" / "notes.txt").write_text("not an image")
    return root


def _no_class_folders(root: Path) -> Path:
    (root / "train").mkdir()
    (root / "test").mkdir()
    return root


@pytest.mark.parametrize("make, message", [
    (_no_root, "absent does not exist"),
    (_no_train, "has no train/ folder"),
    (_no_heldout, "has no val/ or test/ folder"),
    (_class_mismatch, "differ \\(only in train/: green; only in test/: none\\)"),
    (_empty_class, "test/green holds no images"),
    (_no_class_folders, "train has no class folders"),
])
def test_bad_layout_is_one_error(tmp_path, make, message):
    with pytest.raises(AdntnError, match=message) as caught:
        image_splits(make(tmp_path), PLAIN)
    assert str(caught.value).count(".") >= 1 and "\n" not in str(caught.value)


# --- trunk features --------------------------------------------------------------------------

def test_split_at_classifier_composes_to_the_model():
    model = TinyNet().eval()
    trunk, head = split_at_classifier(model)
    x = torch.randn(5, 3, 32, 32)
    assert head is model.classifier
    assert_close_scaled(head(trunk(x)), model(x))


def test_split_at_classifier_needs_vgg_structure():
    with pytest.raises(AdntnError, match="no features, avgpool"):
        split_at_classifier(nn.Sequential(nn.Linear(2, 2)))


def test_compute_features_shapes_and_mode(image_root):
    splits = image_splits(image_root, PLAIN)
    trunk, _ = split_at_classifier(TinyNet())
    trunk.train()
    features, labels = compute_features(trunk, splits.train, batch_size=5, workers=0)
    assert features.shape == (24, 16) and features.dtype == torch.float32
    assert labels.tolist() == splits.train.targets
    images = torch.stack([splits.train[i][0] for i in range(3)])
    with torch.no_grad():
        assert_close_scaled(features[:3], trunk.eval()(images))
    assert not features.requires_grad


def test_feature_cache_is_hit_on_the_second_call(image_root, tmp_path):
    splits = image_splits(image_root, PLAIN)
    trunk = CountingTrunk(split_at_classifier(TinyNet())[0])
    cache = tmp_path / "cache"
    key = feature_cache_key("abc123", image_root / "train", PLAIN)
    first = cached_features(trunk, splits.train, key, cache, batch_size=8, workers=0)
    assert not first.from_cache and trunk.calls == 3
    second = cached_features(trunk, splits.train, key, cache, batch_size=8, workers=0)
    assert second.from_cache and trunk.calls == 3
    assert torch.equal(first.features.read(), second.features.read()) and torch.equal(first.labels, second.labels)
    assert sorted(path.suffix for path in cache.iterdir()) == [".bin", ".json", ".labels"]
    other = cached_features(trunk, splits.train, feature_cache_key("def456", image_root / "train", PLAIN),
                            cache, batch_size=8, workers=0)
    assert not other.from_cache and trunk.calls == 6


def test_feature_cache_ignores_batching_but_not_normalisation(image_root):
    train = image_root / "train"
    bigger_batches = Preprocessing(None, None, PLAIN.mean, PLAIN.std, batch_size=64, workers=3)
    other_mean = Preprocessing(None, None, (0.4, 0.5, 0.5), PLAIN.std, batch_size=4, workers=0)
    assert feature_cache_key("a", train, PLAIN) == feature_cache_key("a", train, bigger_batches)
    assert feature_cache_key("a", train, PLAIN) != feature_cache_key("a", train, other_mean)


def test_no_cache_dir_always_computes(image_root):
    splits = image_splits(image_root, PLAIN)
    trunk = CountingTrunk(split_at_classifier(TinyNet())[0])
    for _ in range(2):
        assert not cached_features(trunk, splits.heldout, "k", None, batch_size=12, workers=0).from_cache
    assert trunk.calls == 2


# --- recorded layer inputs -------------------------------------------------------------------

def test_record_inputs_of_linear_and_conv_layers():
    model = TinyNet()
    images = torch.randn(24, 3, 32, 32)
    batches = [(chunk, torch.zeros(len(chunk))) for chunk in images.split(4)]
    recorded = record_inputs(model, ["features.0", "classifier.0", "classifier.3"], batches, max_samples=10)
    assert recorded["features.0"].shape == (10, 3, 32, 32)
    assert torch.equal(recorded["features.0"], images[:10])
    assert recorded["classifier.0"].shape == (10, 16)
    assert recorded["classifier.3"].shape == (10, 8)
    trunk, _ = split_at_classifier(model)
    with torch.no_grad():
        assert_close_scaled(recorded["classifier.0"], trunk(images[:10]))
    assert model.training


def test_record_inputs_on_a_head_with_fewer_samples_than_asked():
    head = TinyNet().classifier
    features = torch.randn(6, 16)
    recorded = record_inputs(head, ["0"], features.split(4), max_samples=100)
    assert torch.equal(recorded["0"], features)
    assert not head[0]._forward_pre_hooks


def test_record_inputs_unknown_module_is_an_error():
    with pytest.raises(AdntnError, match="no module named 'classifier.9'"):
        record_inputs(TinyNet(), ["classifier.9"], [torch.randn(2, 3, 32, 32)], max_samples=2)


# --- unreadable images, mixed sizes, inputs too small, symlinks ------------------------------

def _png_header_claiming(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels: PIL refuses it on open as a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a JPEG at all" * 40)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _bomb(path: Path) -> None:
    _png_header_claiming(path, 30000, 30000)  # 900 M pixels, over PIL's 2 x 89 M


def _iterate_image_loader(splits, preprocessing) -> None:
    from adntn.data.images import image_loader
    for _ in image_loader(splits.train, preprocessing):
        pass


def _iterate_compute_features(splits, preprocessing) -> None:
    compute_features(split_at_classifier(TinyNet())[0], splits.train, batch_size=preprocessing.batch_size,
                     workers=preprocessing.workers)


def assert_one_sentence(error: BaseException, *parts: str) -> None:
    message = str(error)
    assert isinstance(error, AdntnError) and "\n" not in message and message.endswith("."), message
    assert "Traceback" not in message and "DataLoader worker" not in message, message
    for part in parts:
        assert part in message, message


@pytest.mark.parametrize("spoil, words, workers, iterate", [
    (_zero_bytes, "is empty", 0, _iterate_image_loader),
    (_garbage, "corrupt, truncated or not an image", 0, _iterate_image_loader),
    (_truncated, "corrupt, truncated or not an image", 0, _iterate_image_loader),
    (_bomb, "decompression bomb", 0, _iterate_image_loader),
    (_bomb, "decompression bomb", 0, _iterate_compute_features),
    # from a DataLoader worker process: workers take a second to start, so one case per loader
    (_truncated, "corrupt, truncated or not an image", 1, _iterate_image_loader),
    (_zero_bytes, "is empty", 1, _iterate_compute_features),
])
def test_bad_image_file_is_one_sentence_naming_it(image_root, spoil, words, workers, iterate):
    bad = image_root / "train" / "green" / "003.jpg"
    spoil(bad)
    splits = image_splits(image_root, PLAIN)  # lazily: the folder scan does not open images
    with pytest.raises(AdntnError) as caught:
        iterate(splits, Preprocessing(None, None, PLAIN.mean, PLAIN.std, batch_size=4, workers=workers))
    assert_one_sentence(caught.value, str(bad), words)
    assert not multiprocessing.active_children()  # the failed iteration's workers are stopped at once


@pytest.mark.parametrize("workers", [0, 1])
def test_images_of_mixed_sizes_without_resize_is_one_sentence(image_root, workers):
    Image.new("RGB", (40, 36), (30, 200, 40)).save(image_root / "train" / "blue" / "000.jpg")
    splits = image_splits(image_root, PLAIN)
    with pytest.raises(AdntnError) as caught:
        _iterate_image_loader(splits, Preprocessing(None, None, PLAIN.mean, PLAIN.std, batch_size=4, workers=workers))
    assert_one_sentence(caught.value, "36x40", "32x32", "resize and crop", "--config")
    resized = Preprocessing(32, 32, PLAIN.mean, PLAIN.std, batch_size=4, workers=0)
    _iterate_image_loader(image_splits(image_root, resized), resized)  # the advice works


@pytest.mark.parametrize("crop", [1])  # 1x1 -> MaxPool2d(2) has no output
def test_crop_too_small_for_the_network_is_one_sentence(image_root, crop):
    tiny = Preprocessing(None, crop, PLAIN.mean, PLAIN.std, batch_size=4, workers=0)
    with pytest.raises(AdntnError) as caught:
        _iterate_compute_features(image_splits(image_root, tiny), tiny)
    assert_one_sentence(caught.value, f"{crop}x{crop}", "too small", "--config")
    with pytest.raises(AdntnError) as caught:
        record_inputs(TinyNet(), ["classifier.0"], [torch.randn(2, 3, crop, crop)], max_samples=2)
    assert_one_sentence(caught.value, f"{crop}x{crop}", "too small")


def test_folder_scan_does_not_follow_directory_symlinks(image_root):
    green = image_root / "train" / "green"
    (green / "nested").mkdir()
    (green / "nested" / "loop").symlink_to(green, target_is_directory=True)  # green/nested/loop -> green
    (green / "elsewhere").symlink_to(image_root / "train" / "red", target_is_directory=True)
    (green / "linked.jpg").symlink_to(image_root / "train" / "red" / "000.jpg")  # a file link is an image
    splits = image_splits(image_root, PLAIN)
    green_paths = [Path(path) for path, label in splits.train.samples if label == 1]
    assert [path.name for path in green_paths] == [f"{i:03d}.jpg" for i in range(8)] + ["linked.jpg"]
    assert len(splits.train) == 25


# --- features on disk ------------------------------------------------------------------------

def test_feature_file_is_float16_on_disk_and_close_to_the_trunk(image_root, tmp_path):
    splits = image_splits(image_root, PLAIN)
    trunk, _ = split_at_classifier(TinyNet())
    exact, labels = compute_features(trunk, splits.train, batch_size=5, workers=0)
    cached = cached_features(trunk, splits.train, "k", tmp_path, batch_size=5, workers=0)
    stored = cached.features
    assert stored.dtype == torch.float16 and stored.path.stat().st_size == 24 * 16 * 2
    assert torch.allclose(stored.read(), exact, rtol=1e-3, atol=1e-4) and torch.equal(cached.labels, labels)
    assert torch.equal(stored.mapped().float(), stored.read())


def test_shuffled_chunks_visit_every_row_once_and_are_seeded(tmp_path):
    from adntn.training.features import FeatureFile

    values = torch.arange(50 * 4, dtype=torch.float32).view(50, 4)
    (tmp_path / "f.bin").write_bytes(values.numpy().tobytes())
    labels = torch.arange(50)
    stored = FeatureFile(tmp_path / "f.bin", 50, 4, torch.float32, labels, chunk_bytes=7 * 16)  # 7 rows a chunk

    def epoch(seed):
        return list(stored.batches(8, torch.Generator().manual_seed(seed)))

    batches = epoch(0)
    assert [len(y) for _, y in batches] == [8] * 6 + [2]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(50)) and seen.tolist() != list(range(50))
    assert all(torch.equal(x, values[y]) for x, y in batches)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, epoch(0)))
    assert torch.cat([y for _, y in stored.batches(8)]).tolist() == list(range(50))
    assert torch.cat([y for _, y in stored.batches(8, start=10, stop=23)]).tolist() == list(range(10, 23))


def test_feature_sample_is_stratified_not_the_first_rows(tmp_path):
    """Rows are stored in class order: the activation stage's sample must hold every class."""
    from adntn.training.features import FeatureFile

    labels = torch.arange(5).repeat_interleave(20)  # 5 classes of 20 rows, in class order
    values = torch.randn(100, 3)
    (tmp_path / "f.bin").write_bytes(values.numpy().tobytes())
    stored = FeatureFile(tmp_path / "f.bin", 100, 3, torch.float32, labels)
    x, y = stored.sample(25, seed=0)
    assert torch.bincount(y, minlength=5).tolist() == [5] * 5
    indices = [i for i in range(100) if any(torch.equal(values[i], row) for row in x)]
    assert torch.equal(values[indices], x) and torch.equal(labels[indices], y)
    assert torch.equal(stored.sample(25, seed=0)[0], x) and not torch.equal(stored.sample(25, seed=1)[0], x)
    assert torch.equal(stored.sample(500, seed=0)[0], values)


def test_float16_overflow_is_refused(image_root, tmp_path):
    splits = image_splits(image_root, PLAIN)

    class Huge(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1e6))

        def forward(self, x):
            return x.flatten(1)[:, :4] * self.scale

    with pytest.raises(AdntnError, match="--feature-dtype"):
        cached_features(Huge(), splits.train, "k", tmp_path, batch_size=5, workers=0)
    assert cached_features(Huge(), splits.train, "k", tmp_path, batch_size=5, workers=0,
                           dtype=torch.bfloat16).features.read().abs().max() > 1e5
