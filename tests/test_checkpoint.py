"""Tests for adntn.checkpoint: loading, atomic saving, finiteness checks and hashing."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torchvision

import adntn.io.checkpoint as checkpoint
from adntn.io.checkpoint import check_finite, file_sha256, load_state_dict, save_state_dict
from adntn.errors import AdntnError

RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def small_state() -> OrderedDict[str, torch.Tensor]:
    """A state_dict with several dtypes, as torch.save(model.state_dict()) would hold."""
    generator = torch.Generator().manual_seed(0)
    return OrderedDict(
        [
            ("features.0.weight", torch.randn(4, 3, 3, 3, generator=generator)),
            ("features.0.bias", torch.randn(4, generator=generator)),
            ("features.1.num_batches_tracked", torch.tensor(7, dtype=torch.long)),
            ("classifier.0.weight", torch.randn(5, 4, generator=generator).half()),
        ]
    )


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_round_trip_keeps_values_and_dtypes(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    save_state_dict(small_state(), path)
    tensors, metadata = load_state_dict(path)
    assert_same_tensors(tensors, small_state())
    assert metadata == {}


def test_safetensors_round_trip_with_metadata(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_state_dict(small_state(), path, metadata={"arch": "vgg16_bn", "num_classes": "10"})
    tensors, metadata = load_state_dict(path)
    assert sorted(tensors) == sorted(small_state())
    for name, tensor in small_state().items():
        assert tensors[name].dtype == tensor.dtype
        assert torch.equal(tensors[name], tensor)
    assert metadata == {"arch": "vgg16_bn", "num_classes": "10"}


def test_safetensors_save_accepts_views_and_shared_storage(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"base": base, "same": base, "top_rows": base[:2], "transposed": base.t()}
    path = tmp_path / "views.safetensors"
    save_state_dict(tensors, path)
    loaded, metadata = load_state_dict(path)
    assert metadata == {}
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("wrapper_key", ["state_dict", "model"])
def test_wrapped_state_dict_is_unwrapped(tmp_path: Path, wrapper_key: str) -> None:
    path = tmp_path / "wrapped.pth"
    torch.save({wrapper_key: small_state(), "epoch": 12, "best_acc": 0.9}, path)
    tensors, _ = load_state_dict(path)
    assert_same_tensors(tensors, small_state())


def test_data_parallel_prefix_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "dp.pt"
    torch.save({f"module.{name}": value for name, value in small_state().items()}, path)
    tensors, _ = load_state_dict(path)
    assert_same_tensors(tensors, small_state())


def test_prefix_shared_by_only_some_keys_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pt"
    torch.save({"module.a": torch.zeros(1), "b": torch.ones(1)}, path)
    tensors, _ = load_state_dict(path)
    assert sorted(tensors) == ["b", "module.a"]


def test_non_tensor_entries_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "extras.pt"
    torch.save({"weight": torch.ones(2), "note": "hello", "step": 3}, path)
    tensors, _ = load_state_dict(path)
    assert list(tensors) == ["weight"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AdntnError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pt")


def test_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(AdntnError, match="is a directory"):
        load_state_dict(tmp_path)


@pytest.mark.parametrize("legacy_format", [False, True])
def test_truncated_torch_file(tmp_path: Path, legacy_format: bool) -> None:
    full = tmp_path / "full.pt"
    torch.save(small_state(), full, _use_new_zipfile_serialization=not legacy_format)
    data = full.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdntnError, match="truncated") as raised:
        load_state_dict(truncated)
    assert str(truncated) in str(raised.value)


def deflated_copy(source: Path, target: Path) -> Path:
    """``source`` (a zip torch.save file) with every record deflated, as a zip tool would write it."""
    import zipfile
    with zipfile.ZipFile(source) as plain, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as packed:
        for info in plain.infolist():
            packed.writestr(info.filename, plain.read(info.filename))
    return target


@pytest.mark.parametrize("mmap", [False, True])
def test_decompression_bomb_is_refused_before_loading(tmp_path: Path, monkeypatch, mmap: bool) -> None:
    monkeypatch.setattr(checkpoint, "EXPANSION_FLOOR_BYTES", 1 << 20)  # the real floor is 256 MiB
    torch.save({"w": torch.zeros(1 << 20)}, tmp_path / "plain.pt")  # 4 MiB of zeros
    bomb = deflated_copy(tmp_path / "plain.pt", tmp_path / "bomb.pt")
    assert bomb.stat().st_size < 16 << 10
    loaded = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loaded.append(args))
    with pytest.raises(AdntnError, match=r"^Cannot read .*bomb\.pt: its zip records would expand "
                                         r"to 4\.0 MiB from 5\.\d KiB \(\d+x\); .*\.$") as raised:
        load_state_dict(bomb, mmap=mmap)
    assert "\n" not in str(raised.value) and not loaded


def test_deflated_checkpoint_below_the_thresholds_loads(tmp_path: Path, monkeypatch) -> None:
    torch.save(small_state(), tmp_path / "plain.pt")
    assert_same_tensors(load_state_dict(deflated_copy(tmp_path / "plain.pt", tmp_path / "packed.pt"))[0],
                        small_state())  # highly compressible, but far below 256 MiB
    torch.save({"w": torch.randn(1 << 18)}, tmp_path / "random.pt")  # 1 MiB, ratio ~1
    monkeypatch.setattr(checkpoint, "EXPANSION_FLOOR_BYTES", 1 << 10)
    assert load_state_dict(deflated_copy(tmp_path / "random.pt", tmp_path / "random-packed.pt"))[0]["w"].numel() == 1 << 18
    assert load_state_dict(tmp_path / "random.pt")[0]["w"].numel() == 1 << 18


def test_truncated_safetensors_file(tmp_path: Path) -> None:
    full = tmp_path / "full.safetensors"
    save_state_dict(small_state(), full)
    data = full.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdntnError, match="not a safetensors file"):
        load_state_dict(truncated)


@pytest.mark.parametrize("name", ["empty.pt", "empty.safetensors"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(AdntnError, match="empty"):
        load_state_dict(path)


@pytest.mark.parametrize("name", ["garbage.pt", "garbage.bin", "garbage.safetensors"])
def test_garbage_bytes(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not a checkpoint at all \x00\x01\x02" * 20)
    with pytest.raises(AdntnError, match="Cannot read"):
        load_state_dict(path)


def test_pickled_model_is_refused_with_state_dict_advice(tmp_path: Path) -> None:
    path = tmp_path / "full_model.pt"
    torch.save(torchvision.models.squeezenet1_1(weights=None), path)
    with pytest.raises(AdntnError) as raised:
        load_state_dict(path)
    message = str(raised.value)
    assert "pickled model object" in message
    assert "torchvision.models.squeezenet.SqueezeNet" in message
    assert "torch.save(model.state_dict(), PATH)" in message
    assert "--allow-pickle" in message


def test_allow_pickle_loads_a_pickled_model(tmp_path: Path) -> None:
    model = torchvision.models.squeezenet1_1(weights=None)
    path = tmp_path / "full_model.pt"
    torch.save(model, path)
    tensors, metadata = load_state_dict(path, allow_pickle=True)
    assert_same_tensors(tensors, model.state_dict())
    assert metadata == {}


def test_pickled_non_model_object_is_refused_but_loads_with_allow_pickle(tmp_path: Path) -> None:
    path = tmp_path / "with_objects.pt"
    torch.save({"state_dict": small_state(), "learning_rate": Fraction(1, 10)}, path)
    with pytest.raises(AdntnError, match=r"pickled Python objects \(fractions.Fraction\)"):
        load_state_dict(path)
    tensors, _ = load_state_dict(path, allow_pickle=True)
    assert_same_tensors(tensors, small_state())


def test_file_without_a_mapping_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2), torch.ones(2)], path)
    with pytest.raises(AdntnError, match="not a checkpoint: it holds a list"):
        load_state_dict(path)


def test_mapping_without_tensors_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "config.pt"
    torch.save({"epochs": 3, "lr": 0.1}, path)
    with pytest.raises(AdntnError, match="holds no tensors"):
        load_state_dict(path)


@pytest.mark.skipif(RUNNING_AS_ROOT, reason="root reads files regardless of permissions")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.pt"
    torch.save(small_state(), path)
    path.chmod(0)
    with pytest.raises(AdntnError, match="Cannot read"):
        load_state_dict(path)


def test_check_finite_passes_finite_tensors() -> None:
    check_finite(small_state(), list(small_state()))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_names_the_first_bad_tensor(bad_value: float) -> None:
    tensors = small_state()
    tensors["features.0.bias"][2] = bad_value
    tensors["classifier.0.weight"][0, 0] = bad_value
    with pytest.raises(AdntnError) as raised:
        check_finite(tensors, ["features.0.weight", "features.0.bias", "classifier.0.weight"])
    assert str(raised.value) == (
        "features.0.bias contains NaN or Inf values; adntn cannot compress non-finite weights."
    )


def test_check_finite_ignores_keys_not_asked_for() -> None:
    tensors = small_state()
    tensors["features.0.bias"][0] = float("nan")
    check_finite(tensors, ["features.0.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_check_finite_refuses_weights_too_large_for_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    tensors = {"fc6.weight": (torch.randn(8, 8, dtype=torch.float64) * 1e37).to(dtype), "fc6.bias": torch.zeros(8)}
    with pytest.raises(AdntnError, match=r"^fc6\.weight has weights too large for float32 arithmetic "
                                         r"\(sum of squares .*\); .*\.$") as raised:
        check_finite(tensors, ["fc6.bias", "fc6.weight"])
    assert "\n" not in str(raised.value)


def test_check_finite_accepts_large_weights_whose_squares_fit_float32() -> None:
    weight = torch.full((8, 8), 1e18)  # sum of squares 6.4e37 < float32 max / 4
    check_finite({"w": weight}, ["w"])
    weight[0, 0] = 1e19  # 1e38 more: 1.6e38 > 3.4e38 / 4
    with pytest.raises(AdntnError, match="too large for float32"):
        check_finite({"w": weight}, ["w"])
    with pytest.raises(AdntnError, match="too large for float32"):  # squares overflow even float64
        check_finite({"w": torch.full((8, 8), 1e160, dtype=torch.float64)}, ["w"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_check_finite_still_names_non_finite_values_among_huge_ones(dtype: torch.dtype) -> None:
    weight = torch.full((8, 8), 1e200 if dtype == torch.float64 else 1e30, dtype=dtype)
    weight[3, 3] = float("inf")
    with pytest.raises(AdntnError, match="contains NaN or Inf"):
        check_finite({"w": weight}, ["w"])


def test_check_finite_missing_key() -> None:
    with pytest.raises(AdntnError, match="no tensor named fc6.weight"):
        check_finite(small_state(), ["fc6.weight"])


def test_save_replaces_an_existing_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old contents")
    save_state_dict(small_state(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    assert sorted(load_state_dict(path)[0]) == sorted(small_state())


def test_saved_file_permissions_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        save_state_dict(small_state(), tmp_path / "out.pt")
    finally:
        os.umask(previous)
    assert (tmp_path / "out.pt").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("name", ["out.safetensors", "out.pt"])
def test_failed_save_keeps_the_old_file_and_removes_the_temporary(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def write_half_then_fail(_tensors, target, *args, **kwargs) -> None:
        Path(target).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_safetensors", write_half_then_fail)
    monkeypatch.setattr(checkpoint.torch, "save", write_half_then_fail)
    path = tmp_path / name
    path.write_bytes(b"precious")
    with pytest.raises(AdntnError, match="No space left on device") as raised:
        save_state_dict(small_state(), path)
    assert str(raised.value).startswith(f"Cannot write {path}")
    assert path.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_save_into_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "out.pt"
    with pytest.raises(AdntnError, match="is not an existing directory"):
        save_state_dict(small_state(), target)
    assert not (tmp_path / "missing").exists()


def test_save_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "plain_file").write_bytes(b"x")
    with pytest.raises(AdntnError, match="is not an existing directory"):
        save_state_dict(small_state(), tmp_path / "plain_file" / "out.pt")


def test_save_onto_a_directory(tmp_path: Path) -> None:
    (tmp_path / "out.pt").mkdir()
    with pytest.raises(AdntnError, match="Cannot write"):
        save_state_dict(small_state(), tmp_path / "out.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]


@pytest.mark.skipif(RUNNING_AS_ROOT, reason="root writes files regardless of permissions")
def test_save_into_read_only_directory(tmp_path: Path) -> None:
    directory = tmp_path / "read_only"
    directory.mkdir()
    directory.chmod(0o500)
    try:
        with pytest.raises(AdntnError, match="Cannot write"):
            save_state_dict(small_state(), directory / "out.pt")
        assert list(directory.iterdir()) == []
    finally:
        directory.chmod(0o700)


def test_file_sha256_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = os.urandom((5 << 20) // 2)  # 2.5 MiB: three 1 MiB reads
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_file_sha256_of_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AdntnError, match="Cannot read"):
        file_sha256(tmp_path / "absent.bin")


def test_stream_safetensors_refuses_a_tensor_unlike_its_layout(tmp_path: Path) -> None:
    from adntn.io.files import atomic_write
    from adntn.io.safetensors import stream_safetensors

    path = tmp_path / "bad.safetensors"
    with pytest.raises(AdntnError, match="announced"):
        atomic_write(path, lambda tmp: stream_safetensors({"w": (torch.float32, (2, 3))},
                                                          lambda name: torch.zeros(3, 2), tmp))
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left


def resident_kib() -> int:
    with open("/proc/self/smaps_rollup") as rollup:
        return next(int(line.split()[1]) for line in rollup if line.startswith("Rss:"))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_mmap_load_gives_the_same_tensors(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    save_state_dict(small_state(), path, {"mean": "0.5"} if suffix == ".safetensors" else None)
    mapped, metadata = load_state_dict(path, mmap=True)
    assert_same_tensors(mapped, load_state_dict(path)[0])
    assert sorted(mapped) == sorted(small_state())
    assert metadata == ({"mean": "0.5"} if suffix == ".safetensors" else {})


def test_mmap_load_reads_legacy_torch_files_and_misaligned_safetensors(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pt"
    torch.save(small_state(), legacy, _use_new_zipfile_serialization=False)
    assert_same_tensors(load_state_dict(legacy, mmap=True)[0], small_state())
    # a 3-byte tensor first: the float32 after it starts at an offset no view can use
    odd = OrderedDict([("a", torch.arange(3, dtype=torch.uint8)), ("b", torch.randn(5))])
    path = tmp_path / "odd.safetensors"
    save_state_dict(odd, path)
    assert_same_tensors(load_state_dict(path, mmap=True)[0], odd)
    assert checkpoint._map_safetensors(path, {"a": (torch.uint8, (3,)), "b": (torch.float32, (5,))}) is None
