"""The public Python API: adntn.compress / Compressed / load / expand, on modules in memory and on files."""

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

import adntn
from adntn.cli import app
from adntn.demo import small_vgg11

README = Path(__file__).resolve().parent.parent / "README.md"
TIMINGS = ("seconds", "fit_seconds")  # the only report fields that differ between identical runs


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    return small_vgg11().eval()


@pytest.fixture(scope="module")
def compressed_vgg(vgg):
    return adntn.compress(vgg, layers=["fc6", "conv5_2"], arch="ttn", ratio=20, steps=5, seed=1)


def test_compress_an_in_memory_torchvision_vgg(vgg, compressed_vgg):
    before = {key: value.clone() for key, value in vgg.state_dict().items()}
    result = compressed_vgg
    assert [row["alias"] for row in result.report["layers"]] == ["fc6", "conv5_2"]
    assert all(row["ratio"] >= 20 for row in result.report["layers"])
    assert result.report["source"]["model"] == "vgg11"
    model = result.model
    assert isinstance(model.classifier[0], adntn.GeneratedLinear)
    assert isinstance(model.features[18], adntn.GeneratedConv2d)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = vgg.classifier[0].weight  # untouched: the caller's module is not edited
        assert torch.equal(expected, before["classifier.0.weight"])
        assert torch.equal(model.features[0].weight, vgg.features[0].weight)  # uncompressed layers as given
        assert model(x).shape == (2, 10)
    for key, value in vgg.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_compress_a_sequential_holding_one_linear(tmp_path):
    torch.manual_seed(0)
    template = nn.Sequential(nn.Linear(64, 48))
    result = adntn.compress(template, layers=["0"], arch="tt", bond_dim=3, steps=3)
    generated = result.model[0]
    assert isinstance(generated, adntn.GeneratedLinear)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), F.linear(x, generated.generator(), template[0].bias))
    directory = result.save(tmp_path / "one.adntn")
    loaded = adntn.load(directory, model=template)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x), rtol=0, atol=0)
    state = adntn.expand(directory)
    assert list(state) == ["0.weight", "0.bias"] and torch.equal(state["0.bias"], template[0].bias.detach())
    with pytest.raises(adntn.AdntnError, match="pass the module it was compressed from"):
        adntn.load(directory)


def test_save_load_expand_round_trip(compressed_vgg, tmp_path):
    directory = compressed_vgg.save(tmp_path / "vgg.adntn")
    loaded = adntn.load(directory)
    assert not any(key in ("classifier.0.weight", "features.18.weight") for key in loaded.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), compressed_vgg.model(x), rtol=0, atol=0)
    state = adntn.expand(directory)
    assert state.keys() == small_vgg11().state_dict().keys()
    for key, value in adntn.dense_weights(loaded).items():
        assert torch.equal(state[key], value), key
    written = adntn.expand(directory, tmp_path / "dense.pt")
    assert written == tmp_path / "dense.pt"
    reference = small_vgg11()
    reference.load_state_dict(torch.load(written, weights_only=True), strict=True)


def test_cli_and_api_write_the_same_directory(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "small.pt"
    torch.save(small_vgg11().state_dict(), checkpoint)
    by_cli, by_api = tmp_path / "cli.adntn", tmp_path / "api.adntn"
    args = ["compress", str(checkpoint), "--layers", "fc6,conv5_2", "--arch", "attn", "--ratio", "20",
            "--steps", "4", "--seed", "3", "--out", str(by_cli)]
    assert CliRunner().invoke(app, args).exit_code == 0
    adntn.compress(checkpoint, layers="fc6,conv5_2", arch="attn", ratio=20, steps=4, seed=3).save(by_api)
    files = sorted(p.relative_to(by_cli) for p in by_cli.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(by_api) for p in by_api.rglob("*") if p.is_file())
    for name in files:
        if name.name != "report.json":
            assert (by_cli / name).read_bytes() == (by_api / name).read_bytes(), name
    reports = [json.loads((root / "report.json").read_text()) for root in (by_cli, by_api)]
    for report in reports:
        report.pop("seconds")
        for row in report["layers"]:
            row.pop("fit_seconds")
    assert reports[0] == reports[1]


def test_options_carry_the_cli_names_and_are_checked(vgg):
    with pytest.raises(adntn.AdntnError, match="Unknown option 'stepz'"):
        adntn.compress(vgg, layers=["fc6"], stepz=3)
    with pytest.raises(adntn.AdntnError, match="Unknown layer 'fc99'"):
        adntn.compress(vgg, layers=["fc99"])
    with pytest.raises(adntn.AdntnError, match="not among the compressed layers"):
        adntn.compress(vgg, layers=["fc6"], ratio={"fc6": 20, "fc7": 30})
    result = adntn.compress(vgg, layers=["fc6", "fc7"], ratio={"fc6": 20, "fc7": 30}, steps=0)
    assert [round(row["ratio"]) >= r for row, r in zip(result.report["layers"], (20, 30))] == [True, True]
    assert result.report["settings"]["layer_ratios"] == {"fc6": 20.0, "fc7": 30.0}
    options = adntn.CompressOptions(arch="svd", bond_dim=2, steps=0)
    assert adntn.compress(vgg, layers=["fc7"], options=options).report["layers"][0]["arch"] == "svd"


def test_a_module_that_is_itself_the_layer_is_refused():
    with pytest.raises(adntn.AdntnError, match=r"nn.Sequential\(layer\)"):
        adntn.compress(nn.Linear(8, 8), layers=[""])


def test_progress_hears_each_stage(vgg):
    stages = []

    class Recorder(adntn.Progress):
        def stage_done(self, name, seconds):
            stages.append((name, seconds >= 0))

    adntn.compress(vgg, layers=["fc7"], ratio=20, steps=1, progress=Recorder())
    assert [name for name, _ in stages] == ["load_checkpoint", "check_finite", "fit_target", "from_target", "fit",
                                             "relative_error"]
    assert all(ok for _, ok in stages)


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README shows the Python API"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert (tmp_path / "mlp.adntn" / "report.json").is_file()


def test_layer_groups_all_conv_and_fc(vgg):
    from adntn.pipeline.source import read_source

    source = read_source(vgg)
    labels = lambda names: [layer.label for layer in source.select(names)]  # noqa: E731
    assert labels(["fc"]) == ["fc6", "fc7"]
    assert labels(["conv"]) == [f"conv{b}_{k}" for b, k in ((1, 1), (2, 1), (3, 1), (3, 2), (4, 1), (4, 2),
                                                                  (5, 1), (5, 2))]
    assert labels(["all"]) == labels(["conv"]) + ["fc6", "fc7"]
    assert labels(["fc", "fc8"]) == ["fc6", "fc7", "fc8"]
    with pytest.raises(adntn.AdntnError, match="named more than once"):
        source.select(["all", "fc6"])


@pytest.mark.parametrize("arch", ["ttn", "mera", "tt"])
def test_a_one_output_linear_of_three_inputs(arch):
    """A 1x3 weight has one prime factor in all: a bond dim builds it (with a note that it is not
    smaller than the weight), a ratio it cannot reach is an AdntnError (it was a bare ValueError
    from an empty list of leg counts)."""
    notes = []

    class Recorder(adntn.Progress):
        def note(self, message):
            notes.append(message)

    template = nn.Sequential(nn.Linear(3, 1), nn.Linear(1, 64))
    result = adntn.compress(template, layers=["0"], arch=arch, bond_dim=1, steps=2, progress=Recorder())
    assert result.model[0].generator().shape == (1, 3)
    core = result.report["layers"][0]["core_params"]
    assert core >= 3 and [n for n in notes if "not compressed" in n] == [
        f"0's generator has {core} parameters against 3 in its weight, so it is not compressed; leave it out of "
        "--layers or give it a smaller structure."]
    notes.clear()
    smaller = adntn.compress(template, layers=["1"], arch=arch, bond_dim=1, steps=2, progress=Recorder())
    assert smaller.report["layers"][0]["core_params"] < 64 and not any("not compressed" in n for n in notes)
    with pytest.raises(adntn.AdntnError, match="0 \\(1x3\\) cannot reach 2x"):
        adntn.compress(template, layers=["0"], arch=arch, ratio=2, steps=2)
