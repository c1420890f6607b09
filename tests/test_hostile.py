"""Hostile and broken inputs: tampered archives, interrupted runs, dangerous destinations, stray
options. Each is refused in one sentence (exit 1, nothing written) or handled, quickly."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file

import adntn
from adntn.cli.render import render
from adntn.demo import small_vgg11
from adntn.errors import AdntnError
from cli_runs import fails_in_one_sentence as _one_sentence, invoke as adntn_cli

SRC = Path(adntn.__file__).resolve().parent.parent  # the adntn under test, for subprocesses


@pytest.fixture(scope="module")
def pristine(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("arch") / "small.adntn"
    adntn.compress(checkpoint, ["fc6", "conv5_2"], ratio=20, steps=1).save(out)
    return out


@pytest.fixture
def archive(pristine, tmp_path):
    """A fresh copy of the archive in its own folder (``tmp_path / "work"``), to tamper with."""
    folder = tmp_path / "work"
    folder.mkdir()
    return Path(shutil.copytree(pristine, folder / "small.adntn"))


FC6 = "classifier.0"


WATCHDOG = textwrap.dedent("""
    import os, stat, sys, time
    from pathlib import Path
    folder, marker, seconds = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    time.sleep(seconds)
    marker.write_text("expired")
    while True:
        for path in folder.rglob("*"):
            if stat.S_ISFIFO(os.lstat(path).st_mode):
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
        time.sleep(0.2)
""")


@contextmanager
def unblocked(folder, seconds=20):
    """Fail instead of hanging: a FIFO opened for reading blocks until a writer comes (and the
    reader may hold the GIL), so after ``seconds`` another process opens every FIFO under
    ``folder`` for writing, and the test fails."""
    marker = folder.parent / "watchdog-expired"
    watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(folder), str(marker), str(seconds)])
    try:
        yield
    finally:
        watchdog.kill()
        watchdog.wait()
    assert not marker.exists(), f"a FIFO was opened and blocked for more than {seconds} s"


def _all_refuse(archive, fragment, *, report=True):
    """report (optionally), expand, eval and adntn.load each refuse ``archive`` in one sentence."""
    folder = archive.parent
    with unblocked(folder):
        if report:
            _one_sentence(["report", archive], fragment, folder)
            _one_sentence(["report", archive, "--json"], fragment, folder)
        _one_sentence(["expand", archive, "-o", folder / "dense.pt"], fragment, folder)
        _one_sentence(["eval", archive, "--data", folder / "nodata"], fragment, folder)
        with pytest.raises(AdntnError, match=fragment.replace(".", r"\.")):
            adntn.load(archive)
        with pytest.raises(AdntnError):
            adntn.expand(archive)


def _edit_report(archive, edit):
    path = archive / "report.json"
    content = json.loads(path.read_text())
    content = edit(content)
    path.write_text(json.dumps(content))


def _edit_layer(archive, module, edit):
    """Rewrite one layer file: ``edit(tensors, metadata)`` changes them in place."""
    path = archive / "layers" / f"{module}.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    edit(tensors, metadata)
    save_file(tensors, str(path), metadata)


# --- A. archives -------------------------------------------------------------------------------

def _drop(key):
    def edit(content):
        del content[key]
        return content
    return edit


def _unnamed_row(content):
    del content["layers"][0]["name"]
    return content


@pytest.mark.parametrize("edit, fragment", [
    (lambda content: [], "not a JSON object"),
    (lambda content: None, "not a JSON object"),
    (_drop("layers"), "'layers'"),
    (_drop("keys"), "'keys'"),
    (_drop("source"), "'source'"),
    (lambda content: {**content, "layers": "fc6"}, "'layers'"),
    (_unnamed_row, "'name'"),
    (lambda content: {**content, "source": {**content["source"], "metadata": ["mean"]}}, "'metadata'"),
    (lambda content: {**content, "accuracy": {"split": "test", "images": 3, "dense": {"top1": 1.0, "top5": 1.0},
                                              "compressed": {"top1": 1.0, "top5": 1.0},
                                              "paired": {"top1_agreement": 1.0, "lost": -1, "gained": 0, "images": 3,
                                                         "mcnemar_p": 1.0}}}, "'lost'"),
], ids=["list", "null", "no-layers", "no-keys", "no-source", "layers-string", "row-unnamed", "metadata-list",
        "paired-negative"])
def test_malformed_report_json(archive, edit, fragment):
    _edit_report(archive, edit)
    _all_refuse(archive, fragment)


def test_report_json_that_is_a_directory(archive):
    (archive / "report.json").unlink()
    (archive / "report.json").mkdir()
    _all_refuse(archive, "report.json")


@pytest.mark.parametrize("key, value, fragment", [
    ("dtype", "float128", "float128"),
    ("module", None, "module"),
    ("format_version", "99", "format version 99"),
])
def test_malformed_layer_metadata(archive, key, value, fragment):
    def edit(tensors, metadata):
        if value is None:
            del metadata[key]
        else:
            metadata[key] = value
    _edit_layer(archive, FC6, edit)
    _all_refuse(archive, fragment)


def test_a_spec_of_a_newer_version(archive):
    _edit_layer(archive, FC6, _spec_edit(version=99))
    _all_refuse(archive, "spec of version 99")


@pytest.mark.parametrize("name", ["../../outside", "/etc/passwd", "classifier/0", "classifier..0"])
def test_layer_names_cannot_leave_the_archive(archive, name):
    outside = archive.parent / "outside.safetensors"  # where ../../outside leads: a real layer file
    shutil.copy(archive / "layers" / f"{FC6}.safetensors", outside)

    def edit(content):
        content["layers"][0]["name"] = name
        return content
    _edit_report(archive, edit)
    _all_refuse(archive, "layer name", report=True)


def test_a_symlinked_layer_file_pointing_outside_is_refused(archive):
    layer = archive / "layers" / f"{FC6}.safetensors"
    outside = archive.parent.parent / "elsewhere.safetensors"
    shutil.move(layer, outside)
    layer.symlink_to(outside)
    _all_refuse(archive, "outside")


def _spec_edit(**changes):
    def edit(tensors, metadata):
        spec = json.loads(metadata["spec"])
        spec.update(changes)
        metadata["spec"] = json.dumps(spec)
        if "shape" in changes:
            metadata["shape"] = json.dumps(changes["shape"])
    return edit


@pytest.mark.parametrize("also_report", [False, True], ids=["spec-only", "spec-and-report"])
def test_a_huge_spec_in_a_small_file_is_refused_before_building(archive, also_report, monkeypatch):
    """A few-KB layer file whose spec claims a 20000x20000 SVD of rank 2000 (320 MB of cores)."""
    _edit_layer(archive, FC6, _spec_edit(arch="svd", shape=[20000, 20000], out_dims=[20000], in_dims=[20000],
                                         bond_dims=[2000], mix_rank=0))
    if also_report:
        def edit(content):
            content["layers"][0]["shape"] = [20000, 20000]
            return content
        _edit_report(archive, edit)
    from adntn.io import archive as archive_module

    build = archive_module.build

    def small_builds_only(spec):
        if torch.empty(0).device.type != "meta" and spec.core_params > 1_000_000:
            raise AssertionError(f"built {spec.core_params:,} core parameters for real")
        return build(spec)
    monkeypatch.setattr(archive_module, "build", small_builds_only)
    _all_refuse(archive, FC6)


def test_cores_that_do_not_match_the_spec(archive):
    def edit(tensors, metadata):
        key = max((key for key in tensors if key.startswith("core.")), key=lambda key: tensors[key].numel())
        tensors[key] = torch.zeros(tuple(d + 1 for d in tensors[key].shape))
    _edit_layer(archive, FC6, edit)
    _all_refuse(archive, "cores")


def test_an_extra_tensor_in_a_layer_file(archive):
    _edit_layer(archive, FC6, lambda tensors, metadata: tensors.update({"core.extra": torch.zeros(3)}))
    _all_refuse(archive, "core.extra")


def test_nan_cores_are_refused(archive):
    def edit(tensors, metadata):
        key = next(key for key in tensors if key.startswith("core."))
        tensors[key][(0,) * tensors[key].dim()] = float("nan")
    _edit_layer(archive, FC6, edit)
    _all_refuse(archive, "NaN")


def test_a_bias_of_the_wrong_shape(archive):
    _edit_layer(archive, FC6, lambda tensors, metadata: tensors.update({"bias": torch.zeros(7)}))
    _all_refuse(archive, "bias")


def test_dense_tensors_that_do_not_fit_the_model(archive):
    path = archive / "dense.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    tensors["classifier.3.weight"] = torch.zeros(256, 100)  # fc7 no longer takes fc6's 256 outputs
    save_file(tensors, str(path), metadata)
    _all_refuse(archive, "classifier.3.weight")


def _edit_dense(archive, edit):
    """Rewrite dense.safetensors: ``edit(tensors)`` changes them in place."""
    path = archive / "dense.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    edit(tensors)
    save_file(tensors, str(path), metadata)


def test_dense_tensors_of_an_integer_dtype(archive):
    _edit_dense(archive, lambda tensors: tensors.update({"classifier.6.weight": tensors["classifier.6.weight"].long()}))
    _all_refuse(archive, "int64")
    _one_sentence(["inspect", archive], "int64", archive.parent)


def test_nan_in_the_dense_file(archive, tmp_path):
    def edit(tensors):
        tensors["features.0.weight"][0, 0, 0, 0] = float("nan")
    _edit_dense(archive, edit)
    _all_refuse(archive, "NaN", report=False)  # report reads no tensor
    _one_sentence(["expand", archive, "-o", archive.parent / "dense.safetensors"], "NaN", archive.parent)


@pytest.mark.skipif(any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxscript")),
                    reason="needs adntn[export]")
@pytest.mark.parametrize("size, fragment", [("-1", "is -1"), ("0", "is 0"), ("8", "side 32 to"),
                                            ("100000", "side 32 to")])
def test_an_export_input_size_out_of_range(archive, size, fragment):
    _one_sentence(["export", archive, "-o", archive.parent / "m.onnx", "--input-size", size], fragment,
                  archive.parent)


def test_an_input_size_in_the_metadata_out_of_range(archive):
    _edit_report(archive, lambda content: {**content, "source": {**content["source"],
                                                                 "metadata": {"input_size": "0"}}})
    with pytest.raises(AdntnError, match="input_size metadata is 0"):
        adntn.export_onnx(archive, archive.parent / "m.onnx")


def test_dense_tensors_not_listed_in_the_report(archive):
    def edit(content):
        content["keys"].remove("classifier.6.bias")
        return content
    _edit_report(archive, edit)
    _all_refuse(archive, "classifier.6.bias")


def test_a_layer_file_that_is_a_fifo_does_not_hang(archive):
    layer = archive / "layers" / f"{FC6}.safetensors"
    layer.unlink()
    os.mkfifo(layer)
    _all_refuse(archive, "not a regular file")


def test_a_dense_file_that_is_a_fifo_does_not_hang(archive):
    dense = archive / "dense.safetensors"
    dense.unlink()
    os.mkfifo(dense)
    _all_refuse(archive, "not a regular file")


def test_the_untampered_archive_still_works(archive, tmp_path):
    assert adntn_cli("report", archive).exit_code == 0
    assert adntn_cli("expand", archive, "-o", tmp_path / "d.pt").exit_code == 0
    adntn.load(archive)


# --- B. outputs and faults ---------------------------------------------------------------------

TERM_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from adntn.cli import app
    import adntn.io.archive as archive, adntn.pipeline.expand as expand
    command, args = sys.argv[1], sys.argv[2:]

    def terminate(*_, **__):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    if command == "compress":  # during the archive's writing, its staging folder half written
        archive.write_safetensors = terminate
    else:  # during the output's writing, its temporary file half written
        def stream(layout, produce, path, *rest):
            Path(path).write_bytes(b"partial")
            terminate()
        expand.stream_torch_save = stream
    app([command, *args])
""")


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("command", ["compress", "expand"])
def test_sigterm_cleans_up_and_says_so(checkpoint, pristine, tmp_path, command):
    out = tmp_path / ("o.adntn" if command == "compress" else "d.pt")
    args = ([checkpoint, "--layers", "fc6", "--ratio", "20", "--steps", "1", "--out", out]
            if command == "compress" else [pristine, "-o", out])
    result = subprocess.run([sys.executable, "-c", TERM_SCRIPT, command, *map(str, args)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(SRC)}, cwd=tmp_path)
    assert result.returncode == 143, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("adntn:")]
    assert lines == ["adntn: terminated; nothing was written."], result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_runs_are_swept(checkpoint, pristine, tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    (tmp_path / f".o.adntn.tmp-{dead}" / "layers").mkdir(parents=True)
    stale_file = tmp_path / f".d.pt.tmp-{dead}-0123abcd"
    stale_file.write_bytes(b"partial")
    kept = [tmp_path / f".o.adntn.tmp-{alive}", tmp_path / f".d.pt.tmp-{alive}-0123abcd", tmp_path / ".other.tmp-1"]
    kept[0].mkdir()
    kept[1].write_bytes(b"someone else's")
    kept[2].write_bytes(b"not ours")
    assert adntn_cli("compress", checkpoint, "--layers", "fc6", "--ratio", "20", "--steps", "1",
                     "--out", tmp_path / "o.adntn").exit_code == 0
    assert adntn_cli("expand", pristine, "-o", tmp_path / "d.pt").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o.adntn", "d.pt"] + [p.name for p in kept])


def test_a_retired_archive_of_a_dead_run_is_put_back(pristine, tmp_path):
    """Killed between moving the old archive aside and the new one in: the old one comes back."""
    retired = tmp_path / f".o.adntn.old-{_dead_pid()}"
    shutil.copytree(pristine, retired)
    with pytest.raises(AdntnError, match="already exists"):
        adntn.compress(small_vgg11(), ["fc6"], ratio=20, steps=0).save(tmp_path / "o.adntn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.adntn"]
    assert (tmp_path / "o.adntn" / "report.json").read_bytes() == (pristine / "report.json").read_bytes()
    shutil.copytree(pristine, retired)  # the destination is there too: the retired copy is stale
    adntn.compress(small_vgg11(), ["fc7"], ratio=20, steps=0).save(tmp_path / "o.adntn", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.adntn"]


def test_out_equal_to_the_checkpoint_is_refused(checkpoint, tmp_path):
    copy = tmp_path / "small.pt"
    shutil.copy(checkpoint, copy)
    _one_sentence(["compress", copy, "--layers", "fc6", "--ratio", "20", "--out", copy, "--force"],
                  "the checkpoint", tmp_path)
    assert copy.read_bytes() == checkpoint.read_bytes()


def test_out_holding_the_checkpoint_is_refused(archive):
    _one_sentence(["compress", archive / "dense.safetensors", "--model", "vgg11", "--layers", "fc7", "--ratio", "20",
                   "--out", archive, "--force"], "the checkpoint", archive.parent)


def test_expand_into_its_own_archive_is_refused(archive):
    before = (archive / "dense.safetensors").read_bytes()
    _one_sentence(["expand", archive, "-o", archive / "dense.safetensors", "--force"], "inside", archive.parent)
    assert (archive / "dense.safetensors").read_bytes() == before


def test_force_replaces_only_an_archive(checkpoint, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    _one_sentence(["compress", checkpoint, "--layers", "fc6", "--ratio", "20", "--out", folder, "--force"],
                  "not an adntn archive", tmp_path)
    assert (folder / "holiday.jpg").read_bytes() == b"precious"
    plain = tmp_path / "notes.txt"
    plain.write_text("keep")
    _one_sentence(["compress", checkpoint, "--layers", "fc6", "--ratio", "20", "--out", plain, "--force"],
                  "not an adntn archive", tmp_path)
    assert plain.read_text() == "keep"


def test_force_still_replaces_an_archive(checkpoint, pristine, tmp_path):
    out = Path(shutil.copytree(pristine, tmp_path / "o.adntn"))
    assert adntn_cli("compress", checkpoint, "--layers", "fc7", "--ratio", "20", "--steps", "1", "--out", out,
                     "--force").exit_code == 0
    assert [row["alias"] for row in json.loads((out / "report.json").read_text())["layers"]] == ["fc7"]


@pytest.mark.parametrize("length", [250, 300])
def test_a_name_too_long_is_refused_before_fitting(checkpoint, tmp_path, monkeypatch, length):
    from adntn.pipeline import compress as compress_module

    def no_fitting(*args, **kwargs):
        raise AssertionError("fitting started")
    monkeypatch.setattr(compress_module, "fit_weight_space", no_fitting)
    out = tmp_path / ("n" * (length - len(".adntn")) + ".adntn")
    _one_sentence(["compress", checkpoint, "--layers", "fc6", "--ratio", "20", "--out", out], "too long", tmp_path)


def test_expand_to_a_name_too_long(pristine, tmp_path):
    _one_sentence(["expand", pristine, "-o", tmp_path / ("n" * 250 + ".pt")], "too long", tmp_path)


# --- C. options and output ---------------------------------------------------------------------

@pytest.mark.parametrize("option", [["--epochs", "5"], ["--batch-size", "8"], ["--kd-weight", "0.5"],
                                    ["--temperature", "2"], ["--finetune-lr", "0.1"], ["--no-dropout"],
                                    ["--cache-dir", "cache"]])
def test_data_options_without_data_are_refused(checkpoint, tmp_path, option):
    _one_sentence(["compress", checkpoint, "--layers", "fc6", "--ratio", "20", *option, "--out", tmp_path / "o"],
                  f"{option[0]} only applies with --data", tmp_path)


def test_data_options_without_data_are_refused_by_the_api():
    with pytest.raises(AdntnError, match="--epochs only applies with --data"):
        adntn.CompressOptions(epochs=1)
    assert adntn.CompressOptions().finetune.epochs == 3
    options = adntn.CompressOptions(data=Path("somewhere"), epochs=1, dropout=False)
    assert (options.finetune.epochs, options.finetune.dropout, options.describe()["epochs"]) == (1, False, 1)


def _strict(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def test_json_is_strict_for_an_all_zero_weight(tmp_path):
    model = small_vgg11()
    with torch.no_grad():
        model.classifier[3].weight.zero_()
    path = tmp_path / "zero.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "zero.adntn"
    result = adntn_cli("compress", path, "--layers", "fc7", "--ratio", "20", "--steps", "1", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    row = _strict(result.stdout)["layers"][0]
    assert row["weight_rel_error"] is None or math.isfinite(row["weight_rel_error"])
    _strict((out / "report.json").read_text())
    report = adntn_cli("report", out, "--json")
    assert report.exit_code == 0
    _strict(report.stdout)
    assert adntn_cli("report", out).exit_code == 0


def test_an_old_report_with_nan_prints_strict_json(archive):
    path = archive / "report.json"
    path.write_text(path.read_text().replace('"weight_rel_error": ', '"weight_rel_error": NaN, "was": ', 1))
    result = adntn_cli("report", archive, "--json")
    assert result.exit_code == 0, result.output
    assert _strict(result.stdout)["layers"][0]["weight_rel_error"] is None


def test_report_at_80_columns_keeps_whole_numbers(pristine):
    report = json.loads((pristine / "report.json").read_text())
    for row in report["layers"]:  # VGG-16's fc6 at 2,000x
        row.update(shape=[4096, 25088], dense_params=102_760_448, core_params=51_380, ratio=2000.0,
                   bond_dims=[24, 24, 24, 24, 24, 24], fit_seconds=1234.5)
    for width in (80,):
        console = Console(width=width, record=True)
        render(report, console)
        text = console.export_text()
        assert "…" not in text, text
        assert "102,760,448" in text and "51,380" in text and "2,000x" in text, text
    wide = Console(width=200, record=True)
    render(report, wide)
    text = wide.export_text()
    assert "4096x25088" in text and "fit s" in text


def test_complex_weights_are_refused(tmp_path):
    state = small_vgg11().state_dict()
    state["classifier.0.weight"] = state["classifier.0.weight"].to(torch.complex64)
    path = tmp_path / "complex.pt"
    torch.save(state, path)
    _one_sentence(["compress", path, "--layers", "fc6", "--ratio", "20", "--out", tmp_path / "o"], "complex",
                  tmp_path)


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_tensors_without_ordinary_values_are_refused(tmp_path, kind):
    state = small_vgg11().state_dict()
    if kind == "sparse":
        state["classifier.3.weight"] = state["classifier.3.weight"].to_sparse()
    else:
        state["classifier.3.weight"] = torch.empty_like(state["classifier.3.weight"], device="meta")
    path = tmp_path / f"{kind}.pt"
    torch.save(state, path)
    for args in (["compress", path, "--layers", "fc6", "--ratio", "20", "--out", tmp_path / "o"],
                 ["inspect", path], ["eval", path, "--data", tmp_path / "nodata"]):
        _one_sentence(args, kind, tmp_path)
    module = small_vgg11()
    module.classifier[3].weight = torch.nn.Parameter(state["classifier.3.weight"], requires_grad=False)
    with pytest.raises(AdntnError, match=kind):
        adntn.compress(module, ["fc6"], ratio=20, steps=1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_eval_refuses_weights_that_are_not_real_floating_point(tmp_path, dtype):
    state = small_vgg11().state_dict()
    state["features.0.weight"] = (state["features.0.weight"] * 100).to(dtype)
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    _one_sentence(["eval", path, "--data", tmp_path / "nodata"], str(dtype).removeprefix("torch."), tmp_path)


def test_eval_refuses_nan_weights(tmp_path):
    state = small_vgg11().state_dict()
    state["classifier.3.bias"][0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    _one_sentence(["eval", path, "--data", tmp_path / "nodata"], "NaN", tmp_path)


@pytest.mark.parametrize("ratios, fragment", [("fc6=20,fc6=30", "fc6 more than once"),
                                              ("fc6=20,classifier.0=30", "twice, as fc6 and classifier.0")])
def test_a_layer_given_two_ratios(checkpoint, tmp_path, ratios, fragment):
    _one_sentence(["compress", checkpoint, "--layers", "fc6", "--ratio", ratios, "--out", tmp_path / "o"],
                  fragment, tmp_path)


def test_data_that_is_a_file(checkpoint, tmp_path):
    data = tmp_path / "images.tar"
    data.write_bytes(b"not a folder")
    _one_sentence(["compress", checkpoint, "--layers", "fc6", "--ratio", "20", "--out", tmp_path / "o", "--data", data],
                  "is a file", tmp_path)
    _one_sentence(["eval", checkpoint, "--data", data], "is a file", tmp_path)


def test_safetensors_metadata_that_is_not_strings(tmp_path):
    path = tmp_path / "meta.safetensors"
    save_file({key: value.contiguous() for key, value in small_vgg11().state_dict().items()}, str(path))
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    header["__metadata__"] = {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    body = raw[8 + size:]
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + body)
    line = _one_sentence(["inspect", path], "metadata", tmp_path)
    assert "string" in line


def test_the_data_free_warning_says_what_to_expect(checkpoint):
    notes = []

    class Recording(adntn.Progress):
        def note(self, message):
            notes.append(message)

    adntn.compress(checkpoint, ["fc6"], ratio=200, steps=0, progress=Recording())
    assert len(notes) == 1
    assert "accuracy" in notes[0] and "--data" in notes[0] and "adntn compress" in notes[0], notes[0]


@pytest.mark.parametrize("args, fragment", [(["--layers", "fc9"], "Unknown layer 'fc9'"),
                                            (["--layers", "fc6", "--ratio", "1e9"], "cannot reach")])
def test_a_wrong_layer_or_ratio_is_reported_before_an_existing_output(checkpoint, pristine, tmp_path, args, fragment):
    """The output exists and --force is not given: the mistake the run would hit next is named first."""
    out = Path(shutil.copytree(pristine, tmp_path / "small.adntn"))
    _one_sentence(["compress", checkpoint, *args, "--out", out], fragment, tmp_path)
    _one_sentence(["compress", checkpoint, "--layers", "fc6", "--ratio", "20", "--out", out], "already exists",
                  tmp_path)


def test_a_refused_run_prints_its_sentence_and_nothing_before_it(checkpoint, tmp_path):
    result = adntn_cli("compress", checkpoint, "--layers", "fc9", "--out", tmp_path / "o")
    assert result.exit_code == 1 and result.stderr.startswith("adntn: error: Unknown layer 'fc9'"), repr(result.stderr)


def test_a_log_shows_each_finished_fit_before_the_note_that_follows_it(checkpoint, tmp_path):
    """Without a terminal (a log file, CI), the progress is one line per finished task, in order."""
    result = adntn_cli("compress", checkpoint, "--layers", "fc6", "--ratio", "200", "--steps", "3",
                       "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    fit = next(i for i, line in enumerate(lines) if line.startswith("fit fc6 (ttn) 3/3 loss"))
    note = next(i for i, line in enumerate(lines) if line.startswith("note:"))
    assert fit < note
