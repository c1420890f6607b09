"""The compressed directory format (``*.adntn/``), self-contained for ``expand`` and ``report``.

    DIR/report.json                  what was compressed, how, and what it cost and kept
    DIR/dense.safetensors            every tensor of the checkpoint that was not compressed, as is
    DIR/layers/<module>.safetensors  one compressed layer: its cores ("core.<name>") and "bias";
                                     metadata: format_version, arch, spec (JSON), module, alias,
                                     shape, dtype

A directory is written under a temporary name beside its destination and renamed into place, so
a failed run leaves nothing behind and an existing directory is replaced only with ``force``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from adntn.io.safetensors import write_safetensors
from adntn.errors import AdntnError
from adntn.networks import Generator, build
from adntn.core.spec import FORMAT_VERSION, GeneratorSpec

REPORT_FILE = "report.json"
DENSE_FILE = "dense.safetensors"
LAYER_DIR = "layers"


@dataclass(frozen=True)
class CompressedLayer:
    """One compressed layer: its generator, its dense bias, and the dtype of the original weight."""

    module: str
    alias: str | None
    generator: Generator
    bias: torch.Tensor | None
    dtype: torch.dtype

    @property
    def weight_key(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias_key(self) -> str:
        return f"{self.module}.bias"


@torch.no_grad()
def materialize(generator: Generator, dtype: torch.dtype) -> torch.Tensor:
    """The generated weight as ``expand`` writes it (float32 math, cast to the original dtype)."""
    return generator().detach().to(dtype).contiguous()


@torch.no_grad()
def materialize_rows(generator: Generator, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """``materialize`` in blocks of whole rows (``Generator.row_blocks``): the same values, without
    holding the whole weight. A block may be a reused buffer (valid until the next-but-one)."""
    for block in generator.row_blocks():
        yield block.detach().to(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layer_tensors(layer: CompressedLayer) -> dict[str, torch.Tensor]:
    tensors = {f"core.{name}": t.detach() for name, t in layer.generator.state_dict().items()}
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach()
    return tensors


def _layer_metadata(layer: CompressedLayer) -> dict[str, str]:
    spec = layer.generator.spec
    return {
        "format_version": str(FORMAT_VERSION),
        "arch": spec.arch,
        "spec": spec.to_json(),
        "module": layer.module,
        "alias": layer.alias or "",
        "shape": json.dumps(list(spec.shape)),
        "dtype": _dtype_name(layer.dtype),
    }


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_destination(out_dir: Path, *, force: bool) -> Path:
    """Raise unless ``out_dir`` may be written (absent, or ``force``) into an existing folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise AdntnError(f"{out_dir} already exists; pass --force to replace it.")
    parent = out_dir.resolve().parent
    if not parent.is_dir():
        raise AdntnError(f"Cannot write {out_dir}: the folder {parent} does not exist.")
    if not os.access(parent, os.W_OK):
        raise AdntnError(f"Cannot write {out_dir}: the folder {parent} is not writable.")
    return parent


def write_archive(out_dir: Path, dense: dict[str, torch.Tensor], layers: list[CompressedLayer],
                  report: dict, *, force: bool) -> dict:
    """Write the directory atomically; returns a copy of ``report`` with ``total.stored_bytes``
    filled in (the report written)."""
    out_dir = Path(out_dir)
    parent = check_destination(out_dir, force=force)
    staging = parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / LAYER_DIR).mkdir(parents=True)
        write_safetensors(dense, staging / DENSE_FILE, {"format_version": str(FORMAT_VERSION)})
        for layer in layers:
            write_safetensors(_layer_tensors(layer), staging / LAYER_DIR / f"{layer.module}.safetensors",
                              _layer_metadata(layer))
        report = {**report, "total": {**report["total"], "stored_bytes": directory_bytes(staging)}}
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if out_dir.exists():
            retired = parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, retired)
            os.replace(staging, out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise AdntnError(f"Cannot write {out_dir}: {error.strerror or error}.") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def read_report(directory: Path) -> dict:
    """report.json of a compressed directory, with a clear error when it is not one."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdntnError(f"{directory} is not a directory written by 'adntn compress'.")
    try:
        report = json.loads((directory / REPORT_FILE).read_text())
    except FileNotFoundError:
        raise AdntnError(f"{directory} has no {REPORT_FILE}; it was not written by 'adntn compress'.") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdntnError(f"{directory / REPORT_FILE} is corrupt (not valid JSON).") from None
    if report.get("format_version") != FORMAT_VERSION:
        raise AdntnError(
            f"{directory} has format version {report.get('format_version')}; this adntn reads {FORMAT_VERSION}."
        )
    return report


def read_layer(path: Path) -> CompressedLayer:
    """Rebuild one compressed layer from its safetensors file (needs nothing else)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        spec = GeneratorSpec.from_json(meta["spec"])
    except (OSError, SafetensorError, KeyError, ValueError, TypeError) as error:
        raise AdntnError(f"{path} is missing or corrupt ({type(error).__name__}).") from None
    generator = build(spec)
    cores = {key.removeprefix("core."): t for key, t in tensors.items() if key.startswith("core.")}
    try:
        generator.load_state_dict(cores, strict=True)
    except RuntimeError:
        raise AdntnError(f"{path} does not hold the cores its spec describes.") from None
    return CompressedLayer(
        module=meta["module"], alias=meta.get("alias") or None, generator=generator,
        bias=tensors.get("bias"), dtype=getattr(torch, meta["dtype"]),
    )


def read_dense(directory: Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / DENSE_FILE
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, SafetensorError) as error:
        raise AdntnError(f"{path} is missing or corrupt ({type(error).__name__}).") from None


def layer_paths(directory: Path, report: dict) -> list[Path]:
    return [Path(directory) / LAYER_DIR / f"{layer['name']}.safetensors" for layer in report["layers"]]


def read_layers(directory: Path, report: dict) -> list[CompressedLayer]:
    """The compressed layers of ``directory`` (each rebuilt from its own file)."""
    return [read_layer(path) for path in layer_paths(directory, report)]
