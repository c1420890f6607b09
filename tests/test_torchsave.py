"""Tests for adntn.torchsave (and the row blocks both streaming writers take): the streamed file is
torch.save's, byte for byte, whether tensors come whole or in blocks."""

from __future__ import annotations

import weakref
import zipfile
from pathlib import Path

import numpy
import pytest
import torch

from adntn.io import torchsave
from adntn.io.files import atomic_write
from adntn.io.safetensors import stream_safetensors
from adntn.demo import small_vgg11
from adntn.errors import AdntnError
from adntn.io.torchsave import stream_torch_save


def varied_state() -> dict[str, torch.Tensor]:
    """Every kind of tensor a state_dict holds: several dtypes, a 0-d one, empty ones."""
    generator = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(6, 3, 3, 3, generator=generator),
        "conv.bias": torch.randn(6, generator=generator).half(),
        "fc.weight": torch.randn(7, 5, generator=generator).bfloat16(),
        "bn.num_batches_tracked": torch.tensor(11),
        "index": torch.arange(12).reshape(3, 4),
        "mask": torch.rand(9, generator=generator) > 0.5,
        "scale": torch.tensor(0.25),
        "none": torch.empty(0, 4),
        "nothing": torch.empty(0, dtype=torch.int64),
    }


def layout_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in state.items()}


def in_blocks(tensor: torch.Tensor, rows: list[int]):
    """``tensor``'s rows in blocks of ``rows`` rows, each copied into the one buffer that every block
    reuses (the writer must have written a block before it asks for the next)."""
    buffer = torch.empty((max(rows, default=0), *tensor.shape[1:]), dtype=tensor.dtype)
    start = 0
    for count in rows:
        buffer[:count] = tensor[start:start + count]
        start += count
        yield buffer[:count]


def by_rows(state: dict[str, torch.Tensor], step: int):
    """A ``produce`` giving each tensor with rows in blocks of ``step`` rows (the last one shorter)."""
    def produce(name: str):
        tensor = state[name]
        if not tensor.dim():
            return tensor
        return in_blocks(tensor, [step] * (len(tensor) // step) + [len(tensor) % step])

    return produce


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture
def streaming(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if stream_torch_save falls back to gathering the tensors for torch.save."""
    def refuse(*args):
        raise AssertionError("stream_torch_save fell back to torch.save")

    monkeypatch.setattr(torchsave, "_gathered", refuse)


@pytest.mark.parametrize("mmap", [False, True])
def test_round_trip_keeps_order_dtypes_shapes_and_bits(tmp_path: Path, streaming, mmap: bool) -> None:
    state = varied_state()
    path = tmp_path / "model.pt"
    stream_torch_save(layout_of(state), state.__getitem__, path)
    loaded = torch.load(path, weights_only=True, mmap=mmap)
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        assert (loaded[name].dtype, loaded[name].shape) == (tensor.dtype, tensor.shape), name
        assert raw(loaded[name]) == raw(tensor), name
    assert zipfile.ZipFile(path).testzip() is None  # every record's CRC-32 is right


def test_file_is_torch_saves_byte_for_byte(tmp_path: Path, streaming) -> None:
    state = varied_state()
    (tmp_path / "saved").mkdir()
    (tmp_path / "streamed").mkdir()
    torch.save(state, tmp_path / "saved" / "model.pt")
    stream_torch_save(layout_of(state), state.__getitem__, tmp_path / "streamed" / "model.pt")
    saved, streamed = (zipfile.ZipFile(tmp_path / folder / "model.pt") for folder in ("saved", "streamed"))
    assert streamed.namelist() == saved.namelist()
    for name in saved.namelist():  # data.pkl, data/<i>, ... then the whole file
        assert streamed.read(name) == saved.read(name), name
    assert (tmp_path / "streamed" / "model.pt").read_bytes() == (tmp_path / "saved" / "model.pt").read_bytes()


def test_empty_state_dict(tmp_path: Path, streaming) -> None:
    (tmp_path / "saved").mkdir()
    torch.save({}, tmp_path / "saved" / "empty.pt")
    stream_torch_save({}, {}.__getitem__, tmp_path / "empty.pt")
    assert (tmp_path / "empty.pt").read_bytes() == (tmp_path / "saved" / "empty.pt").read_bytes()


WRITERS = [stream_torch_save, stream_safetensors]


@pytest.mark.parametrize("write", WRITERS, ids=["torch", "safetensors"])
def test_blocks_and_whole_tensors_give_the_same_file(tmp_path: Path, streaming, write) -> None:
    state = varied_state()
    blocks = {"conv.weight": [2, 0, 3, 1], "fc.weight": [7], "index": [1, 1, 1], "mask": [4, 5], "none": []}

    def produce(name: str):
        return in_blocks(state[name], blocks[name]) if name in blocks else state[name]

    (tmp_path / "whole").mkdir()
    (tmp_path / "blocks").mkdir()
    write(layout_of(state), state.__getitem__, tmp_path / "whole" / "model")
    write(layout_of(state), produce, tmp_path / "blocks" / "model")
    assert (tmp_path / "blocks" / "model").read_bytes() == (tmp_path / "whole" / "model").read_bytes()


@pytest.mark.parametrize("write", WRITERS, ids=["torch", "safetensors"])
def test_no_earlier_tensor_or_block_is_alive_when_the_next_is_made(tmp_path: Path, streaming, write) -> None:
    state = varied_state()
    made: list[weakref.ref] = []

    def fresh(tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` in new memory, which ``made`` tracks as long as any view holds it."""
        assert all(reference() is None for reference in made)
        memory = numpy.empty(max(tensor.numel(), 1) * tensor.element_size(), dtype=numpy.uint8)
        made.append(weakref.ref(memory))
        return torch.from_numpy(memory).view(tensor.dtype)[:tensor.numel()].reshape(tensor.shape).copy_(tensor)

    def produce(name: str):
        if state[name].dim() and len(state[name]) > 1:
            return (fresh(row) for row in state[name].split(1))
        return fresh(state[name])

    write(layout_of(state), produce, tmp_path / "model")
    assert len(made) > len(state)


@pytest.mark.parametrize("write", WRITERS, ids=["torch", "safetensors"])
@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        (lambda w: [w[:1]], r"hold 20 bytes, not the 40 of the announced torch.float32 \(2, 5\)"),
        (lambda w: [w, w[:1]], "hold more than the 40 bytes"),
        (lambda w: [w.double()], "a block came out as torch.float64"),
        (lambda w: w.reshape(5, 2), r"came out as torch.float32 \(5, 2\)"),
    ],
    ids=["short", "long", "dtype", "shape"],
)
def test_blocks_unlike_the_layout_are_refused_and_leave_no_file(tmp_path: Path, write, blocks, message: str) -> None:
    weight = torch.ones(2, 5)
    path = tmp_path / "model"
    with pytest.raises(AdntnError, match=message) as raised:
        atomic_write(path, lambda temporary: write({"bias": (torch.float32, (3,)), "weight": (torch.float32, (2, 5))},
                                                  {"bias": torch.zeros(3), "weight": blocks(weight)}.__getitem__,
                                                  temporary))
    assert str(raised.value).startswith("Cannot store weight: ") and str(raised.value).endswith(".")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("unavailable", ["no skip_data", "unexpected layout"])
def test_fallback_writes_torch_saves_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unavailable: str) -> None:
    if unavailable == "no skip_data":  # torch < 2.6
        monkeypatch.delattr(torch.serialization, "skip_data")
    else:  # a torch whose skip_data output this module does not recognise
        monkeypatch.setattr(torchsave, "_read_records", lambda handle: None)
    gathered, gather = [], torchsave._gathered
    monkeypatch.setattr(torchsave, "_gathered", lambda *args: gathered.append(args[0]) or gather(*args))
    state = varied_state()
    (tmp_path / "saved").mkdir()
    torch.save(state, tmp_path / "saved" / "model.pt")
    stream_torch_save(layout_of(state), by_rows(state, 2), tmp_path / "model.pt")
    assert gathered == list(state)
    assert (tmp_path / "model.pt").read_bytes() == (tmp_path / "saved" / "model.pt").read_bytes()


def test_torchvision_model_loads_strict_from_a_streamed_file(tmp_path: Path, streaming) -> None:
    torch.manual_seed(0)
    source = small_vgg11().eval()
    state = source.state_dict()
    path = tmp_path / "vgg.pt"
    stream_torch_save(layout_of(state), by_rows(state, 3), path)
    model = small_vgg11().eval()
    model.load_state_dict(torch.load(path, weights_only=True, mmap=True), strict=True)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), source(images))
