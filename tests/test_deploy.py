"""Deploying a compressed model: adntn.load in every schedule, ONNX export, torch.export/compile."""

import importlib.util
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import adntn
from adntn.cli import app
from adntn.demo import small_vgg11

ARCHS = ("ttn", "attn", "mera", "tt", "svd")
MATRIX_LEAF_MERA = "mera-bond-2"  # bonds below the legs: a state above the leaves small enough to factorize
SCHEDULES = ("auto", "factorized", "blocked", "dense")
needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxscript", "onnxruntime")),
    reason="needs adntn[export] (onnx, onnxscript, onnxruntime)")


def perturb(model: nn.Module) -> None:
    """Move every disentangler off the identity, so attn's and mera's corrections are not zero."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".p"):
                parameter.copy_(0.3 * torch.randn_like(parameter))


@pytest.fixture(scope="module", params=[*ARCHS, MATRIX_LEAF_MERA])
def archive(request, tmp_path_factory):
    torch.manual_seed(0)
    size = {"bond_dim": 2} if request.param == MATRIX_LEAF_MERA else {"ratio": 20}
    result = adntn.compress(small_vgg11().eval(), layers=["fc6", "fc7", "conv5_2"], arch=request.param.split("-")[0],
                            steps=2, **size)
    directory = result.save(tmp_path_factory.mktemp(request.param) / "vgg.adntn")
    if request.param in ("attn", "mera", MATRIX_LEAF_MERA):  # perturbed after saving: rewrite the layer files
        model = adntn.load(directory)
        perturb(model)
        from adntn.io.archive import CompressedLayer, read_layers, read_report, write_archive, read_dense

        report = read_report(directory)
        layers = [CompressedLayer(layer.module, layer.alias, model.get_submodule(layer.module).generator,
                                  layer.bias, layer.dtype) for layer in read_layers(directory, report)]
        write_archive(directory, read_dense(directory), layers, report, force=True)
    return request.param, directory


def dense_model(directory):
    model = small_vgg11()
    model.load_state_dict(adntn.expand(directory), strict=True)
    return model.eval()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("batch", [1, 5])
def test_loaded_model_equals_the_expanded_dense_model(archive, schedule, batch):
    arch, directory = archive
    model = adntn.load(directory, schedule=schedule)
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        expected = dense_model(directory)(x)
        actual = model(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_a_loaded_model_holds_no_dense_weight(archive):
    """In the factorized and blocked schedules no tensor of a compressed layer's dense size exists,
    in the model's state or in what its layers cache."""
    arch, directory = archive
    model = adntn.load(directory, schedule="factorized")
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for name, module in model.named_modules():
        if isinstance(module, (adntn.GeneratedLinear, adntn.GeneratedConv2d)):
            dense = module.generator.spec.dense_params
            cached = module.generator.__dict__.get("_inference_cache", ((), {}))[1]
            tensors = list(module.state_dict().values()) + [
                t for value in cached.values() for t in (value.values() if isinstance(value, dict) else [value])
                if isinstance(t, torch.Tensor)]
            assert all(t.numel() < dense for t in tensors), name
    assert "classifier.0.weight" not in model.state_dict()


def test_unknown_schedule_is_one_sentence(archive):
    with pytest.raises(adntn.AdntnError, match="Unknown schedule 'fast'"):
        adntn.load(archive[1], schedule="fast")


def test_inspect_shows_the_inference_plan(archive):
    arch, directory = archive
    result = CliRunner().invoke(app, ["inspect", str(directory), "--json", "--batch", "4"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["layers"]
    assert {row["layer"] for row in rows} == {"classifier.0", "classifier.3", "features.18"}
    assert {row["alias"] for row in rows} == {"fc6", "fc7", "conv5_2"}
    assert "fc6 (classifier.0)" in CliRunner().invoke(app, ["inspect", str(directory)]).stdout
    for row in rows:
        assert row["schedule"] == ("blocked" if arch == "mera" else "factorized")  # mera: identity leaves
        assert row["bytes"] < row["dense_bytes"] + 4096 and row["dense_flops_per_sample"] > 0


def test_torch_export_of_a_loaded_model(archive):
    arch, directory = archive
    model = adntn.load(directory, schedule="factorized")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_torch_compile_of_a_loaded_module(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    adntn.compress(mlp, layers=["0"], arch="ttn", ratio=4, steps=2).save(tmp_path / "mlp.adntn")
    model = adntn.load(tmp_path / "mlp.adntn", model=mlp, schedule="factorized")
    x = torch.randn(6, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-5, atol=1e-6)


@needs_onnx
def test_onnx_export_runs_in_onnxruntime_and_stays_small(archive, tmp_path):
    import onnxruntime

    arch, directory = archive
    out = tmp_path / "vgg.onnx"
    result = CliRunner().invoke(app, ["export", str(directory), "-o", str(out), "--input-size", "32"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # torch.onnx's chatter goes to stderr
    session = onnxruntime.InferenceSession(str(out))
    for batch in (1, 4):
        x = torch.randn(batch, 3, 32, 32)
        (logits,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            expected = adntn.load(directory)(x)
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4,
                                   atol=1e-5 * float(expected.abs().max()))
    archive_bytes = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    assert out.stat().st_size < 2 * archive_bytes


@needs_onnx
def test_onnx_file_of_a_mostly_compressed_model_is_far_below_the_dense_size(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    result = adntn.compress(mlp, layers=["0"], arch="ttn", ratio=1000, steps=2)
    directory = result.save(tmp_path / "mlp.adntn")
    out = adntn.export_onnx(directory, tmp_path / "mlp.onnx", model=mlp, input_shape=(2, 1024))
    dense_bytes = 1024 * 1024 * 4
    assert out.stat().st_size < 0.1 * dense_bytes
    import onnxruntime

    x = torch.randn(3, 1024)
    (y,) = onnxruntime.InferenceSession(str(out)).run(None, {"input": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), result.model(x), rtol=1e-4, atol=1e-5)


def test_export_without_onnx_is_one_sentence(archive, tmp_path, monkeypatch):
    import importlib.util as util

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(adntn.AdntnError, match=r"pip install 'adntn\[export\]'"):
        adntn.export_onnx(archive[1], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
