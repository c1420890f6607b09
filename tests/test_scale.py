"""ImageNet-scale settings on tiny data: class folders mapped to a 1000-output model by a class
map, --max-images, eval of a held-out split alone, and fine-tuning under torchrun (2 CPU ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from adntn.cli import app
from adntn.data.images import class_indices, read_class_map, relabel, stratified_subset
from adntn.demo import small_vgg11
from adntn.errors import AdntnError

runner = CliRunner()
SRC = Path(__file__).resolve().parent.parent / "src"
OUTPUTS = 1000
WNIDS = [f"n{1440764 + 37 * i:08d}" for i in range(OUTPUTS)]  # WordNet-id-like folder names
USED = [WNIDS[i] for i in (0, 1, 7, 99, 250, 400, 512, 700, 901, 999)]  # a 10-class subset


def adntn(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_split(folder: Path, names: list[str], count: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for label, name in enumerate(names):
        (folder / name).mkdir(parents=True)
        for index in range(count):
            colour = torch.tensor([label * 25, 255 - label * 25, (label * 70) % 256])
            pixels = (colour.view(1, 1, 3) + torch.randint(-20, 20, (32, 32, 3), generator=g)).clamp(0, 255)
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / name / f"{index}.png")


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    write_split(root / "data" / "train", USED, 6, 0)
    write_split(root / "data" / "val", USED, 3, 1)
    (root / "mapping.txt").write_text("".join(f"{wnid} some class, its synonyms\n" for wnid in WNIDS))
    (root / "tiny.toml").write_text("[preprocessing]\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n"
                                    "batch_size = 16\nworkers = 0\n")
    torch.manual_seed(0)
    torch.save(small_vgg11(OUTPUTS).state_dict(), root / "big.pt")
    return root


def test_class_map_formats_and_errors(tmp_path):
    (tmp_path / "m.txt").write_text("# comment\nn01 tench\n\nn02 goldfish, Carassius\n")
    assert read_class_map(tmp_path / "m.txt") == {"n01": 0, "n02": 1}
    (tmp_path / "m.json").write_text('{"b": 3, "a": 0}')
    assert class_indices(["a", "b"], 4, {}, tmp_path / "m.json") == ({"a": 0, "b": 3}, f"class map {tmp_path / 'm.json'}")
    assert class_indices(["x", "y"], 2, {}) == ({"x": 0, "y": 1}, "sorted folder names")
    assert class_indices(["b"], 3, {"classes": '["a", "b", "c"]'})[0] == {"b": 1}
    with pytest.raises(AdntnError, match="2 class folders but the model predicts 5.*--class-map"):
        class_indices(["x", "y"], 5, {})
    with pytest.raises(AdntnError, match="'z' is not in the class map"):
        class_indices(["a", "z"], 4, {}, tmp_path / "m.json")
    with pytest.raises(AdntnError, match="model has 3 outputs"):
        class_indices(["b"], 3, {}, tmp_path / "m.json")


def test_relabel_and_stratified_subset(imagenet_like):
    from torchvision import datasets

    folder = datasets.ImageFolder(imagenet_like / "data" / "train")
    indices, _ = class_indices(folder.classes, OUTPUTS, {}, imagenet_like / "mapping.txt")
    mapped = relabel(folder, indices)
    assert sorted(set(mapped.targets)) == [WNIDS.index(name) for name in USED]
    subset = stratified_subset(mapped, 20, seed=0)
    assert len(subset) == 20 and all(subset.targets.count(label) == 2 for label in set(mapped.targets))
    assert stratified_subset(mapped, 20, seed=0).samples == subset.samples
    assert stratified_subset(mapped, 20, seed=1).samples != subset.samples
    assert len(folder.samples) == 60 and folder.targets[-1] == 9  # the original is untouched


def test_thousand_output_model_on_a_ten_class_subset(imagenet_like, tmp_path):
    root = imagenet_like
    common = ("--data", root / "data", "--config", root / "tiny.toml", "--class-map", root / "mapping.txt")
    result = adntn("compress", root / "big.pt", "--layers", "fc6,fc7", "--ratio", "20", "--steps", "2",
                   *common, "--max-images", 20, "--epochs", "1", "--batch-size", "8", "--out", tmp_path / "o",
                   "--cache-dir", tmp_path / "cache", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    training = report["training"]
    assert (training["train_images"], training["heldout_images"], training["max_images"]) == (20, 20, 20)
    assert training["classes"] == {"folders": 10, "outputs": 1000, "mapped_by": f"class map {root / 'mapping.txt'}"}
    assert training["finetune"]["steps"] == 3 and report["settings"]["max_images"] == 20

    heldout_only = tmp_path / "heldout"  # eval needs no train/
    (heldout_only).mkdir()
    (heldout_only / "val").symlink_to(root / "data" / "val", target_is_directory=True)
    evaluated = adntn("eval", tmp_path / "o", "--data", heldout_only, "--config", root / "tiny.toml",
                      "--class-map", root / "mapping.txt", "--max-images", 20, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    measured = json.loads(evaluated.stdout)
    assert measured["images"] == 20 and measured["classes"]["outputs"] == 1000
    assert abs(measured["top1"] - report["accuracy"]["compressed"]["top1"]) < 1e-9

    refused = adntn("eval", root / "big.pt", "--data", heldout_only, "--config", root / "tiny.toml")
    assert refused.exit_code == 1 and "--class-map" in refused.stderr


def test_max_images_needs_data_and_is_positive():
    from adntn.pipeline.options import CompressOptions

    with pytest.raises(AdntnError, match="only apply with --data"):
        CompressOptions(max_images=5)
    with pytest.raises(AdntnError, match="positive integer"):
        CompressOptions(data=Path("d"), max_images=0)


def _compress(root: Path, out: Path, processes: int) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)] \
        if processes > 1 else []
    command = [sys.executable, *launcher, "-m", "adntn", "compress", str(root / "big.pt"), "--layers", "fc6,fc7",
               "--ratio", "20", "--steps", "3", "--data", str(root / "data"), "--config", str(root / "tiny.toml"),
               "--class-map", str(root / "mapping.txt"), "--epochs", "2", "--batch-size", "16", "--no-dropout",
               "--train", "fc8", "--out", str(out), "--json"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_torchrun_two_cpu_ranks_match_one_process(imagenet_like, tmp_path):
    from safetensors.torch import load_file

    single = _compress(imagenet_like, tmp_path / "one.adntn", 1)
    assert single.returncode == 0, single.stderr[-3000:]
    double = _compress(imagenet_like, tmp_path / "two.adntn", 2)
    assert double.returncode == 0, double.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".adntn") == ["one.adntn", "two.adntn"]
    assert double.stdout.count('"format_version"') == 1  # one report printed: rank 0's
    report = json.loads(double.stdout)
    assert report["training"]["world_size"] == 2 and report["training"]["finetune"]["steps"] == 8
    one_dir, two_dir = tmp_path / "one.adntn", tmp_path / "two.adntn"
    files = sorted(str(p.relative_to(one_dir)) for p in one_dir.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(two_dir)) for p in two_dir.rglob("*") if p.is_file())
    compared = 0
    for name in files:
        if name.endswith(".safetensors"):
            one, two = load_file(str(one_dir / name)), load_file(str(two_dir / name))
            assert one.keys() == two.keys()
            for key in one:  # the same up to the order of the gradient reductions
                torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
                assert (two[key] - one[key]).norm() <= 1e-5 * one[key].norm()
                compared += "layers" in name
    assert compared > 0
    assert abs(report["training"]["finetune"]["final_loss"]
               - json.loads(single.stdout)["training"]["finetune"]["final_loss"]) < 1e-4
