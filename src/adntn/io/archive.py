"""The compressed directory format (``*.adntn/``), self-contained for ``expand`` and ``report``.

    DIR/report.json                  what was compressed, how, and what it cost and kept
    DIR/dense.safetensors            every tensor of the checkpoint that was not compressed, as is
    DIR/layers/<module>.safetensors  one compressed layer: its cores ("core.<name>") and "bias";
                                     metadata: format_version, arch, spec (JSON), module, alias,
                                     shape, dtype

A directory is written under a temporary name beside its destination and renamed into place, so
a failed run leaves nothing behind and an existing directory is replaced only with ``force`` (and
only when it is an archive).

Reading trusts nothing in the directory: report.json is checked field by field
(:func:`validate_report`), every file must be a regular file inside the directory, a layer file's
spec must describe exactly the cores it stores (checked on the meta device, before anything is
allocated) and agree with its report row, cores and biases must be finite, and the tensors must be
the checkpoint's keys (:func:`archive_layout`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from adntn.io.checkpoint import check_runnable
from adntn.io.files import check_name_fits, json_text, sweep_stale, temporary_name
from adntn.io.safetensors import safetensors_layout, write_safetensors
from adntn.errors import AdntnError
from adntn.networks import Generator, build
from adntn.core.spec import FORMAT_VERSION, GeneratorSpec

REPORT_FILE = "report.json"
DENSE_FILE = "dense.safetensors"
LAYER_DIR = "layers"
WEIGHT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                 "float64": torch.float64}  # a compressed weight's dtype (layer metadata "dtype")
MAX_LEGS = 64  # more legs than any weight adntn writes (its legs are factors of the weight's sides)
_MODULE_PART = re.compile(r"[A-Za-z0-9_-]+")


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


def check_module_name(name: object, where: str) -> str:
    """A layer's module path as archives store it (``classifier.0``): parts of letters, digits,
    ``_`` or ``-`` joined by dots, so that ``layers/<name>.safetensors`` stays in ``layers/``."""
    if not (isinstance(name, str) and all(_MODULE_PART.fullmatch(part) for part in name.split("."))):
        raise AdntnError(f"{where} has the layer name {name!r}, which is not a module path "
                         "(parts of letters, digits and '_' joined by dots).")
    return name


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a directory that ``adntn compress`` wrote (its report.json says so)."""
    report = Path(path) / REPORT_FILE
    try:
        if not (Path(path).is_dir() and stat.S_ISREG(os.stat(report).st_mode)):
            return False
        content = json.loads(report.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and "format_version" in content and "layers" in content


def check_destination(out_dir: Path, *, force: bool) -> Path:
    """Raise unless ``out_dir`` may be written: absent, or an archive and ``force``; its folder
    writable; its name (and the temporary names beside it) short enough. Leftovers of dead runs
    beside it are swept first (``files.sweep_stale``). Returns the folder."""
    out_dir = Path(out_dir)
    parent = out_dir.absolute().parent.resolve()
    if not parent.is_dir():
        raise AdntnError(f"Cannot write {out_dir}: the folder {parent} does not exist.")
    check_name_fits(parent / out_dir.name, temporary_name(out_dir, "tmp"), temporary_name(out_dir, "old"))
    sweep_stale(parent / out_dir.name)
    if os.path.lexists(out_dir):
        if not force:
            raise AdntnError(f"{out_dir} already exists; pass --force to replace it.")
        if not is_archive(out_dir):
            raise AdntnError(f"{out_dir} exists and is not an adntn archive (a folder with adntn's report.json); "
                             "--force replaces only an archive, so choose another --out.")
    if not os.access(parent, os.W_OK):
        raise AdntnError(f"Cannot write {out_dir}: the folder {parent} is not writable.")
    return parent


def write_archive(out_dir: Path, dense: dict[str, torch.Tensor], layers: list[CompressedLayer],
                  report: dict, *, force: bool) -> dict:
    """Write the directory atomically; returns a copy of ``report`` with ``total.stored_bytes``
    filled in (the report written)."""
    out_dir = Path(out_dir)
    parent = check_destination(out_dir, force=force)
    for layer in layers:
        check_module_name(layer.module, "The model")
    staging = parent / temporary_name(out_dir, "tmp")
    retired = parent / temporary_name(out_dir, "old")
    moved_aside = False
    try:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / LAYER_DIR).mkdir(parents=True)
        write_safetensors(dense, staging / DENSE_FILE, {"format_version": str(FORMAT_VERSION)})
        for layer in layers:
            write_safetensors(_layer_tensors(layer), staging / LAYER_DIR / f"{layer.module}.safetensors",
                              _layer_metadata(layer))
        report = {**report, "total": {**report["total"], "stored_bytes": directory_bytes(staging)}}
        (staging / REPORT_FILE).write_text(json_text(report))
        if os.path.lexists(out_dir):
            os.replace(out_dir, retired)
            moved_aside = True
            os.replace(staging, out_dir)
            moved_aside = False
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException as error:  # failures and interrupts (Ctrl-C, the CLI's SIGTERM) alike
        shutil.rmtree(staging, ignore_errors=True)
        if moved_aside and not os.path.lexists(out_dir):
            os.replace(retired, out_dir)  # the old archive back in place
        if isinstance(error, OSError):
            raise AdntnError(f"Cannot write {out_dir}: {error.strerror or error}.") from error
        raise
    return report


# --- reading --------------------------------------------------------------------------------------

class _Invalid(Exception):
    """A problem with report.json's structure (the phrase after 'is not a valid report: ')."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_KINDS = {
    "int": (_is_int, "an integer"),
    "count": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "dict": (lambda v: isinstance(v, dict), "a JSON object"),
    "list": (lambda v: isinstance(v, list), "a list"),
}


def _field(entry: Mapping, key: str, kind: str, where: str, *, nullable: bool = False, optional: bool = False):
    if key not in entry:
        if optional:
            return None
        raise _Invalid(f"{where} has no '{key}'")
    value = entry[key]
    if value is None and nullable:
        return None
    test, noun = _KINDS[kind]
    if not test(value):
        raise _Invalid(f"'{key}' of {where} is not {noun}" + (" or null" if nullable else ""))
    return value


def _check_shape(shape: object, where: str) -> tuple[int, ...]:
    if not (isinstance(shape, list) and len(shape) in (2, 4) and all(_is_int(d) and d > 0 for d in shape)):
        raise _Invalid(f"'shape' of {where} is not 2 or 4 positive integers")
    return tuple(shape)


def _check_rows(report: Mapping) -> None:
    rows = _field(report, "layers", "list", "the report")
    if not rows:
        raise _Invalid("'layers' lists no layer")
    names = set()
    for number, row in enumerate(rows, 1):
        where = f"layer {number} of 'layers'"
        if not isinstance(row, dict):
            raise _Invalid(f"{where} is not a JSON object")
        name = _field(row, "name", "str", where)
        try:
            check_module_name(name, where)
        except AdntnError as error:
            raise _Invalid(str(error).rstrip(".")) from None
        if name in names:
            raise _Invalid(f"layer {name} is listed twice")
        names.add(name)
        where = f"layer {name}"
        shape = _check_shape(_field(row, "shape", "list", where), where)
        _field(row, "alias", "str", where, nullable=True, optional=True)
        for key in ("arch", "activation"):
            _field(row, key, "str", where)
        if not all(_is_int(b) for b in _field(row, "bond_dims", "list", where)):
            raise _Invalid(f"'bond_dims' of {where} are not integers")
        if _field(row, "dense_params", "count", where) != math.prod(shape):
            raise _Invalid(f"'dense_params' of {where} is not the number of values of its shape")
        if _field(row, "core_params", "count", where) < 1:
            raise _Invalid(f"'core_params' of {where} is not positive")
        for key in ("ratio", "fit_seconds"):
            _field(row, key, "number", where)
        for key in ("weight_rel_error", "activation_rel_error", "init_weight_rel_error"):
            _field(row, key, "number", where, nullable=True, optional=True)
        _field(row, "bias_params", "count", where, optional=True)


def _check_keys(report: Mapping) -> None:
    keys = _field(report, "keys", "list", "the report")
    if not all(isinstance(key, str) for key in keys):
        raise _Invalid("'keys' are not all strings")
    if len(set(keys)) != len(keys):
        raise _Invalid("'keys' lists a tensor twice")
    for row in report["layers"]:
        if f"{row['name']}.weight" not in keys:
            raise _Invalid(f"'keys' lacks {row['name']}.weight, the weight of a compressed layer")


def _check_source(report: Mapping) -> None:
    source = _field(report, "source", "dict", "the report")
    where = "the report's 'source'"
    _field(source, "path", "str", where)
    _field(source, "model", "str", where)
    _field(source, "num_classes", "int", where, nullable=True)
    metadata = _field(source, "metadata", "dict", where, nullable=True, optional=True)
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _Invalid("'metadata' of the report's 'source' is not a mapping of strings to strings")


def _check_rest(report: Mapping) -> None:
    total = _field(report, "total", "dict", "the report")
    for key in ("dense_params", "stored_params", "compressed_dense_params", "compressed_core_params", "dense_bytes"):
        _field(total, key, "count", "the report's 'total'")
    _field(total, "stored_bytes", "count", "the report's 'total'", nullable=True, optional=True)
    settings = _field(report, "settings", "dict", "the report")
    for key in ("steps", "seed"):
        _field(settings, key, "int", "the report's 'settings'")
    _field(settings, "lr", "number", "the report's 'settings'")
    _field(report, "bias", "str", "the report")
    training = _field(report, "training", "dict", "the report", nullable=True, optional=True)
    if training is not None:
        _field(training, "summary", "str", "the report's 'training'")
    accuracy = _field(report, "accuracy", "dict", "the report", nullable=True, optional=True)
    if accuracy:
        _field(accuracy, "split", "str", "the report's 'accuracy'")
        _field(accuracy, "images", "count", "the report's 'accuracy'")
        for model in ("dense", "compressed"):
            measured = _field(accuracy, model, "dict", "the report's 'accuracy'")
            for key in ("top1", "top5"):
                _field(measured, key, "number", f"its accuracy of the {model} model", nullable=True)
        paired = _field(accuracy, "paired", "dict", "the report's 'accuracy'", optional=True)
        if paired is not None:
            for key in ("lost", "gained", "images"):
                _field(paired, key, "count", "the report's 'paired'")
            for key in ("top1_agreement", "mcnemar_p"):
                _field(paired, key, "number", "the report's 'paired'", nullable=True)


def validate_report(report: object, path: Path) -> dict:
    """``report`` (the parsed ``path``, a report.json) when it has every field that ``report``,
    ``expand``, ``eval`` and ``load`` read, of the right kinds, and its layer names are module
    paths; else an :class:`AdntnError` naming the first problem."""
    try:
        if not isinstance(report, dict):
            raise _Invalid("it is not a JSON object")
        if report.get("format_version") != FORMAT_VERSION:
            raise AdntnError(f"{path.parent} has format version {report.get('format_version')}; "
                             f"this adntn reads {FORMAT_VERSION}.")
        _check_rows(report)
        _check_keys(report)
        _check_source(report)
        _check_rest(report)
    except _Invalid as problem:
        raise AdntnError(f"{path} is not a valid adntn report: {problem}.") from None
    return report


def _inside(directory: Path, path: Path) -> Path:
    """``path`` resolved (links followed), refused unless it lies inside ``directory``."""
    root, resolved = Path(directory).resolve(), Path(path).resolve()
    if resolved != root and root not in resolved.parents:
        raise AdntnError(f"{path} points outside the archive {directory}; refusing to read it.")
    return resolved


def _regular_file(path: Path, directory: Path, missing: str | None = None) -> Path:
    """``path`` resolved, refused unless it is a regular file inside ``directory`` (a FIFO or a
    device would block or never end)."""
    resolved = _inside(directory, path)
    try:
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        raise AdntnError(missing or f"{path} is missing.") from None
    except OSError as error:
        raise AdntnError(f"Cannot read {path}: {error.strerror or error}.") from None
    if not stat.S_ISREG(mode):
        raise AdntnError(f"{path} is not a regular file.")
    return resolved


def read_report(directory: Path) -> dict:
    """report.json of a compressed directory, checked (:func:`validate_report`), with a clear
    error when it is not one."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdntnError(f"{directory} is not a directory written by 'adntn compress'.")
    path = directory / REPORT_FILE
    missing = f"{directory} has no {REPORT_FILE}; it was not written by 'adntn compress'."
    try:
        report = json.loads(_regular_file(path, directory, missing).read_text())
    except OSError as error:
        raise AdntnError(f"Cannot read {path}: {error.strerror or error}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise AdntnError(f"{path} is corrupt (not valid JSON).") from None
    return validate_report(report, path)


def _layer_spec(path: Path, meta: Mapping[str, str], row: Mapping | None) -> tuple[GeneratorSpec, str, torch.dtype]:
    """The spec, module and weight dtype a layer file's metadata gives, checked against its report
    row (when given)."""
    for key in ("spec", "module", "dtype"):
        if key not in meta:
            raise AdntnError(f"{path} lacks the '{key}' entry of a layer file's metadata.")
    if meta.get("format_version", str(FORMAT_VERSION)) != str(FORMAT_VERSION):
        raise AdntnError(f"{path} has format version {meta['format_version']}; this adntn reads {FORMAT_VERSION}.")
    if meta["dtype"] not in WEIGHT_DTYPES:
        raise AdntnError(f"{path} gives the weight dtype '{meta['dtype']}', which is not one adntn writes "
                         f"({', '.join(WEIGHT_DTYPES)}).")
    module = check_module_name(meta["module"], str(path))
    if row is not None and module != row["name"]:
        raise AdntnError(f"{path} holds layer {module}, not {row['name']} as report.json says.")
    try:
        spec = GeneratorSpec.from_json(meta["spec"])
    except (KeyError, ValueError, TypeError, AttributeError):
        raise AdntnError(f"{path} has a corrupt spec.") from None
    if spec.version != FORMAT_VERSION:
        raise AdntnError(f"{path} has a spec of version {spec.version}; this adntn reads {FORMAT_VERSION}.")
    if not (len(spec.shape) in (2, 4) and all(_is_int(d) and d > 0 for d in
                                              (*spec.shape, *spec.out_dims, *spec.in_dims, *spec.bond_dims))
            and 1 <= spec.n_legs <= MAX_LEGS and _is_int(spec.mix_rank) and spec.mix_rank >= 0):
        raise AdntnError(f"{path} has a corrupt spec (its dimensions are not positive integers, or too many).")
    if row is not None:
        if spec.shape != tuple(row["shape"]):
            raise AdntnError(f"{path} generates a {'x'.join(map(str, spec.shape))} weight, but report.json says "
                             f"{row['name']} is {'x'.join(map(str, row['shape']))}.")
        if spec.core_params != row["core_params"]:
            raise AdntnError(f"{path} has {spec.core_params:,} core parameters by its spec, but report.json says "
                             f"{row['core_params']:,}.")
    return spec, module, WEIGHT_DTYPES[meta["dtype"]]


def _check_layer_tensors(path: Path, spec: GeneratorSpec,
                         layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
    """The file's tensors (from its header) must be exactly the cores ``build(spec)`` creates,
    computed on the meta device (nothing allocated), and a bias of the weight's output width."""
    try:
        with torch.device("meta"):
            expected = {f"core.{name}": (t.dtype, tuple(t.shape)) for name, t in build(spec).state_dict().items()}
    except (ValueError, RuntimeError, TypeError, IndexError, ZeroDivisionError):
        raise AdntnError(f"{path} has a spec that describes no generator.") from None
    for key, (dtype, shape) in layout.items():
        if key == "bias":
            if not dtype.is_floating_point or shape != (spec.shape[0],):
                raise AdntnError(f"{path} holds a {dtype} bias of shape {shape}; its {'x'.join(map(str, spec.shape))} "
                                 f"weight takes a floating-point bias of shape ({spec.shape[0]},).")
        elif key not in expected:
            raise AdntnError(f"{path} holds {key}, which its spec has no place for.")
        elif (dtype, shape) != expected[key]:
            raise AdntnError(f"{path} does not hold the cores its spec describes: {key} is {dtype} {shape}, "
                             f"not {expected[key][0]} {expected[key][1]}.")
    missing = [key for key in expected if key not in layout]
    if missing:
        raise AdntnError(f"{path} does not hold the cores its spec describes: it lacks {missing[0]}.")


def read_layer(path: Path, row: Mapping | None = None, *, directory: Path | None = None) -> CompressedLayer:
    """Rebuild one compressed layer from its safetensors file (needs nothing else; ``row``, its
    report row, is checked against it when given). The file must be a regular file inside
    ``directory`` (default: its own folder) whose cores fit its spec and are finite."""
    path = Path(path)
    resolved = _regular_file(path, directory if directory is not None else path.parent)
    try:
        with safe_open(str(resolved), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            spec, module, dtype = _layer_spec(path, meta, row)
            _check_layer_tensors(path, spec, safetensors_layout(handle))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, SafetensorError, ValueError) as error:
        raise AdntnError(f"{path} is missing or corrupt ({type(error).__name__}).") from None
    for key, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise AdntnError(f"{path} holds NaN or Inf values in {key}; it cannot generate a usable weight.")
    generator = build(spec)  # the sizes are the file's, checked above
    cores = {key.removeprefix("core."): t for key, t in tensors.items() if key.startswith("core.")}
    try:
        generator.load_state_dict(cores, strict=True)
    except RuntimeError:
        raise AdntnError(f"{path} does not hold the cores its spec describes.") from None
    return CompressedLayer(module=module, alias=meta.get("alias") or None, generator=generator,
                           bias=tensors.get("bias"), dtype=dtype)


def dense_path(directory: Path) -> Path:
    """dense.safetensors of ``directory``, resolved; refused unless a regular file inside it."""
    return _regular_file(Path(directory) / DENSE_FILE, directory)


def read_dense(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``directory``'s dense.safetensors (every layer not compressed), each finite."""
    path = Path(directory) / DENSE_FILE
    try:
        with safe_open(str(dense_path(directory)), framework="pt") as handle:
            return {key: finite_dense(handle.get_tensor(key), key, path) for key in handle.keys()}
    except (OSError, SafetensorError) as error:
        raise AdntnError(f"{path} is missing or corrupt ({type(error).__name__}).") from None


def finite_dense(tensor: torch.Tensor, key: str, path: Path) -> torch.Tensor:
    """``tensor`` (``key`` of the dense file ``path``), refused when it holds NaN or Inf values."""
    check_runnable({key: tensor}, str(path))
    return tensor


def layer_paths(directory: Path, report: dict) -> list[Path]:
    """Each report row's layer file, refused unless its name is a module path."""
    return [Path(directory) / LAYER_DIR / f"{check_module_name(row['name'], 'report.json')}.safetensors"
            for row in report["layers"]]


def read_layers(directory: Path, report: dict) -> list[CompressedLayer]:
    """The compressed layers of ``directory`` (each rebuilt from its own file, checked against its
    report row)."""
    return [read_layer(path, row, directory=directory)
            for row, path in zip(report["layers"], layer_paths(directory, report))]


def archive_layout(directory: Path, report: dict,
                   layers: list[CompressedLayer]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor the expanded state_dict holds, in the checkpoint's
    order (report.json's ``keys``), from dense.safetensors' header and the layers: refused unless
    those tensors are exactly the keys, each once."""
    path = Path(directory) / DENSE_FILE
    try:
        with safe_open(str(dense_path(directory)), framework="pt") as handle:
            layout = safetensors_layout(handle)
    except (OSError, SafetensorError) as error:
        raise AdntnError(f"{path} is missing or corrupt ({type(error).__name__}).") from None
    for layer in layers:
        for key, tensor in ((layer.weight_key, layer.generator.spec), (layer.bias_key, layer.bias)):
            if tensor is None:
                continue
            if key in layout:
                raise AdntnError(f"{path} holds {key}, which the layer file of {layer.module} gives too.")
            layout[key] = ((layer.dtype, tuple(tensor.shape)) if isinstance(tensor, GeneratorSpec)
                           else (tensor.dtype, tuple(tensor.shape)))
    keys = report["keys"]
    missing = [key for key in keys if key not in layout]
    if missing:
        raise AdntnError(f"{directory} is incomplete: {missing[0]} is in neither dense.safetensors nor a layer file.")
    listed = set(keys)
    extra = [key for key in layout if key not in listed]
    if extra:
        raise AdntnError(f"{directory} holds {extra[0]}, which report.json does not list among the checkpoint's keys.")
    return {key: layout[key] for key in keys}
