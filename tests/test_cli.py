"""End to end: inspect -> compress -> report -> expand on a small torchvision VGG-11 layout."""

import json
import math
import zipfile

import pytest
import torch

from adntn.io.archive import read_layer
from adntn.models.architectures import build_model, detect_model
from adntn.io.checkpoint import load_state_dict
from adntn.demo import small_vgg11
from adntn.training.objectives import relative_error
from cli_runs import fails_in_one_sentence as _fails, invoke as adntn


@pytest.fixture(scope="module")
def compressed(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "small.adntn"
    result = adntn("compress", checkpoint, "--layers", "fc6,conv5_2", "--arch", "ttn", "--ratio", "20",
                   "--steps", "5", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_inspect_json_lists_layers_with_aliases(checkpoint):
    result = adntn("inspect", checkpoint, "--json")
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    assert payload["model"] == "vgg11" and payload["num_classes"] == 10
    fc7 = next(row for row in payload["layers"] if row["alias"] == "fc7")
    assert fc7["module"] == "classifier.3" and fc7["params"] == 256 * 256 + 256


def test_report_json_has_the_promised_fields(compressed):
    result = adntn("report", compressed, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    names = [layer["name"] for layer in report["layers"]]
    assert names == ["classifier.0", "features.18"]
    for layer in report["layers"]:
        assert layer["ratio"] == layer["dense_params"] / layer["core_params"] >= 20
        assert {"alias", "arch", "weight_rel_error", "core_params"} <= set(layer)
    assert report["total"]["stored_params"] < report["total"]["dense_params"]
    assert report["total"]["stored_bytes"] > 0


def test_report_table_renders(compressed):
    result = adntn("report", compressed)
    assert result.exit_code == 0
    assert "fc6" in result.stdout and "conv5_2" in result.stdout and "whole model" in result.stdout


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_expand_loads_strict_untouched_bit_identical_and_error_matches(compressed, checkpoint, tmp_path, suffix):
    out = tmp_path / f"dense{suffix}"
    assert adntn("expand", compressed, "-o", out).exit_code == 0
    original, _ = load_state_dict(checkpoint)
    expanded, _ = load_state_dict(out)
    assert set(expanded) == set(original)
    if suffix == ".pt":  # safetensors files keep keys sorted; a pickle keeps the original order
        assert list(expanded) == list(original)
    model = build_model(detect_model(original))
    model.load_state_dict(expanded, strict=True)
    report = json.loads((compressed / "report.json").read_text())
    replaced = {f"{layer['name']}.weight" for layer in report["layers"]}
    for key, tensor in original.items():
        if key not in replaced:
            assert torch.equal(expanded[key], tensor), key
            assert expanded[key].dtype == tensor.dtype
    for layer in report["layers"]:
        key = f"{layer['name']}.weight"
        generator = read_layer(compressed / "layers" / f"{layer['name']}.safetensors").generator
        with torch.no_grad():
            assert torch.equal(expanded[key], generator())
        assert math.isclose(layer["weight_rel_error"], relative_error(original[key], expanded[key]), rel_tol=1e-9)


def test_same_seed_same_bytes(checkpoint, tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert adntn("compress", checkpoint, "--layers", "fc7", "--arch", "attn", "--ratio", "50",
                     "--steps", "3", "--seed", "3", "--out", out).exit_code == 0
        outs.append((out / "layers" / "classifier.3.safetensors").read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("arch", ["ttn", "attn", "mera", "tt", "svd"])
def test_every_arch_compresses(checkpoint, tmp_path, arch):
    out = tmp_path / "o"
    result = adntn("compress", checkpoint, "--layers", "fc7", "--arch", arch, "--ratio", "30",
                   "--steps", "2", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    layer = json.loads(result.stdout)["layers"][0]
    assert layer["arch"] == arch and layer["ratio"] >= 30


def test_existing_output_needs_force(checkpoint, compressed):
    before = (compressed / "report.json").read_bytes()
    result = adntn("compress", checkpoint, "--layers", "fc6", "--ratio", "20", "--out", compressed, "--steps", "1")
    assert result.exit_code == 1
    assert "already exists; pass --force" in result.stderr
    assert (compressed / "report.json").read_bytes() == before


def test_missing_checkpoint(tmp_path):
    _fails(["compress", tmp_path / "nope.pt", "--layers", "fc6", "--out", tmp_path / "o"], "nope.pt", tmp_path)


def test_truncated_checkpoint(checkpoint, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(checkpoint.read_bytes()[:5000])
    _fails(["compress", broken, "--layers", "fc6", "--out", tmp_path / "o"], "broken.pt", tmp_path)


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    _fails(["inspect", text], "notes.pt", tmp_path)


def test_unknown_model_override(checkpoint, tmp_path):
    _fails(["inspect", checkpoint, "--model", "resnet50"], "resnet50", tmp_path)


def test_unknown_layer(checkpoint, tmp_path):
    _fails(["compress", checkpoint, "--layers", "fc9", "--out", tmp_path / "o"], "fc9", tmp_path)


def test_duplicate_layer(checkpoint, tmp_path):
    _fails(["compress", checkpoint, "--layers", "fc6,classifier.0", "--out", tmp_path / "o"], "more than once",
           tmp_path)


def test_unreachable_ratio(checkpoint, tmp_path):
    _fails(["compress", checkpoint, "--layers", "fc6", "--ratio", "1e7", "--out", tmp_path / "o"],
           "cannot reach", tmp_path)


def test_bond_dim_below_one(checkpoint, tmp_path):
    _fails(["compress", checkpoint, "--layers", "fc6", "--bond-dim", "0", "--out", tmp_path / "o"],
           "at least 1", tmp_path)


def test_nan_weights(tmp_path):
    state = small_vgg11().state_dict()
    state["classifier.3.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    _fails(["compress", path, "--layers", "fc6", "--out", tmp_path / "o"], "NaN", tmp_path)


def test_unwritable_output(checkpoint, tmp_path):
    _fails(["compress", checkpoint, "--layers", "fc6", "--ratio", "20", "--steps", "1",
            "--out", tmp_path / "missing" / "o"],
           "does not exist", tmp_path)


def test_wrong_data_folder(checkpoint, tmp_path):
    _fails(["compress", checkpoint, "--layers", "fc6", "--ratio", "20", "--data", tmp_path / "nodata",
            "--out", tmp_path / "o"],
           "nodata", tmp_path)


def test_expand_refuses_to_overwrite_and_bad_suffix(compressed, tmp_path):
    target = tmp_path / "x.pt"
    target.write_bytes(b"keep")
    _fails(["expand", compressed, "-o", target], "already exists", tmp_path)
    assert target.read_bytes() == b"keep"
    _fails(["expand", compressed, "-o", tmp_path / "x.npz"], ".npz", tmp_path)


def test_report_of_a_plain_folder(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    _fails(["report", folder], "report.json", tmp_path)


def test_per_layer_ratios(checkpoint, tmp_path):
    out = tmp_path / "o"
    result = adntn("compress", checkpoint, "--layers", "fc6,fc7", "--ratio", "fc6=20,classifier.3=200",
                   "--steps", "1", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    fc6, fc7 = json.loads(result.stdout)["layers"]
    assert 20 <= fc6["ratio"] < 200 <= fc7["ratio"]


def test_per_layer_ratio_must_name_every_layer(checkpoint, tmp_path):
    _fails(["compress", checkpoint, "--layers", "fc6,fc7", "--ratio", "fc6=20", "--out", tmp_path / "o"],
           "no ratio for fc7", tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_sentence(checkpoint, tmp_path):
    _fails(["compress", checkpoint, "--layers", "fc6", "--ratio", "20", "--device", "cuda", "--out", tmp_path / "o"],
           "no CUDA GPU", tmp_path)


def test_unknown_device(checkpoint, tmp_path):
    _fails(["compress", checkpoint, "--layers", "fc6", "--ratio", "20", "--device", "tpu9", "--out", tmp_path / "o"],
           "tpu9", tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["ttn", "attn", "mera"])
def test_compress_on_cuda_matches_its_written_cores(checkpoint, tmp_path, arch):
    out = tmp_path / "o"
    result = adntn("compress", checkpoint, "--layers", "fc6,fc7", "--arch", arch, "--ratio", "20", "--steps", "5",
                   "--device", "cuda", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert all(layer["weight_rel_error"] < 1.5 for layer in json.loads(result.stdout)["layers"])
    assert adntn("expand", out, "-o", tmp_path / "d.pt").exit_code == 0


def _contents(path):
    """A safetensors file's bytes; a torch.save file's records, without the archive folder that torch
    names after the (here temporary) file."""
    if path.suffix == ".safetensors":
        return path.read_bytes()
    archive = zipfile.ZipFile(path)
    return [(name.partition("/")[2], archive.read(name)) for name in archive.namelist()]  # read checks CRC-32s


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_streamed_expand_equals_the_in_memory_state_dict(compressed, tmp_path, monkeypatch, suffix):
    """expand writes tensor by tensor, each generated weight in row blocks: the same bytes as
    saving the whole expanded state_dict at once, with at most one block alive at any time."""
    import weakref

    from adntn.pipeline import expand as expand_module
    from adntn.io.checkpoint import save_state_dict

    alive, most, count = weakref.WeakSet(), [0], [0]
    weight_blocks = expand_module.materialize_rows

    def counted(generator, dtype):
        for block in weight_blocks(generator, dtype):
            alive.add(block)
            most[0], count[0] = max(most[0], len(alive)), count[0] + 1
            yield block

    monkeypatch.setattr(expand_module, "materialize_rows", counted)
    streamed = tmp_path / f"streamed{suffix}"
    expand_module.expand(compressed, streamed)
    assert most[0] == 1 and count[0] > 2  # the small VGG's compressed layers come in several blocks
    whole = tmp_path / f"whole{suffix}"
    metadata = json.loads((compressed / "report.json").read_text())["source"].get("metadata") or None
    save_state_dict(expand_module.expanded_state_dict(compressed), whole, metadata=metadata)
    assert _contents(streamed) == _contents(whole)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_expand_writes_weights_given_in_row_blocks(compressed, tmp_path, monkeypatch, suffix):
    from adntn.pipeline import expand as expand_module

    whole = expand_module.expand(compressed, tmp_path / f"whole{suffix}")
    blocks = expand_module.materialize_rows
    monkeypatch.setattr(expand_module, "materialize_rows",
                        lambda generator, dtype: iter(torch.cat([b.clone() for b in blocks(generator, dtype)]).split(3)))
    assert _contents(expand_module.expand(compressed, tmp_path / f"blocks{suffix}")) == _contents(whole)


def test_failed_pt_expand_keeps_the_old_file(compressed, tmp_path, monkeypatch):
    from adntn.pipeline import expand as expand_module
    from adntn.errors import AdntnError

    monkeypatch.setattr(expand_module, "materialize_rows", lambda generator, dtype: [torch.zeros(1)])
    out = tmp_path / "dense.pt"
    out.write_bytes(b"precious")
    with pytest.raises(AdntnError, match="its blocks hold 4 bytes"):
        expand_module.expand(compressed, out, force=True)
    assert out.read_bytes() == b"precious"
    assert [path.name for path in tmp_path.iterdir()] == ["dense.pt"]


def test_unknown_target_dtype(checkpoint, tmp_path):
    assert "float32 | bfloat16" in " ".join(adntn("compress", "-h").stdout.split())  # --help lists the choices
    _fails(["compress", checkpoint, "--layers", "fc6", "--ratio", "20", "--target-dtype", "float16",
            "--out", tmp_path / "o"], "--target-dtype must be one of float32, bfloat16", tmp_path)


@pytest.mark.parametrize("arch", ["ttn", "attn", "mera", "tt", "svd"])
def test_bfloat16_target_fits_as_well_and_is_reported(checkpoint, tmp_path, arch):
    """A bfloat16 copy of the weight (rounding 2^-9) gives the same fit to about that precision."""
    errors = {}
    for dtype in ("float32", "bfloat16"):
        result = adntn("compress", checkpoint, "--layers", "fc6,conv5_2", "--arch", arch, "--ratio", "20",
                       "--steps", "20", "--target-dtype", dtype, "--out", tmp_path / dtype, "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["settings"]["target_dtype"] == dtype
        errors[dtype] = [layer["weight_rel_error"] for layer in report["layers"]]
    for full, half in zip(errors["float32"], errors["bfloat16"]):
        assert abs(full - half) < 0.01 * full + 1e-3


@pytest.mark.parametrize("flag", ["--seed", "--batch-size"])
def test_integers_beyond_int64_are_one_sentence(checkpoint, tmp_path, flag):
    _fails(["compress", checkpoint, "--layers", "fc6", "--ratio", "20", flag, str(2**64), "--out", tmp_path / "o"],
           "must be between", tmp_path)


def test_a_ratio_for_a_layer_that_does_not_exist(checkpoint, tmp_path):
    _fails(["compress", checkpoint, "--layers", "fc6", "--ratio", "fc6=10,fc99=5", "--out", tmp_path / "o"],
           "Unknown layer 'fc99'", tmp_path)


def test_a_p_value_that_underflowed_is_not_printed_as_zero():
    from adntn.cli.render import p_value

    assert p_value(0.0) == "< 1e-300"
    assert p_value(0.2761) == "= 0.28"


def test_out_and_output_name_the_same_option_everywhere(checkpoint, tmp_path):
    directory, dense = tmp_path / "o.adntn", tmp_path / "dense.pt"
    assert adntn("compress", checkpoint, "--layers", "fc6", "--ratio", "20", "--steps", "1",
                 "--output", directory).exit_code == 0
    assert adntn("expand", directory, "--out", dense).exit_code == 0
    assert directory.is_dir() and dense.is_file()
