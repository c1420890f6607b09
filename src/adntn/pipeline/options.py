"""One options object for ``compress``: every setting of every stage, checked once.

:class:`CompressOptions` carries the CLI's names (``adntn compress --help``) and is what the
Python API takes as keyword arguments (``adntn.compress(model, layers, steps=100, ...)``). It is
frozen: each stage reads it and none edits it. ``describe()`` is what the report records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from adntn.core.registry import archs
from adntn.core.spec import ACTIVATIONS
from adntn.errors import AdntnError
from adntn.training.distill import FinetuneConfig

DEFAULT_RATIO = 2000.0
TARGET_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --target-dtype
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer
MAX_BATCH_SIZE = 1 << 20
FEATURE_DTYPE_NAMES = ("float16", "bfloat16", "float32")  # --feature-dtype (training.features.FEATURE_DTYPES)

# The fine-tuning settings, which only apply with ``data``: None means this default.
FINETUNE_DEFAULTS = {"epochs": 3, "finetune_lr": 1e-2, "batch_size": 256, "temperature": 4.0, "kd_weight": 0.9,
                     "dropout": True}
FINETUNE_FLAGS = {"epochs": "--epochs", "finetune_lr": "--finetune-lr", "batch_size": "--batch-size",
                  "temperature": "--temperature", "kd_weight": "--kd-weight", "cache_dir": "--cache-dir"}


def resolve_device(name: str) -> torch.device:
    """``--device``: cpu, cuda or cuda:N, refused with a sentence when it is not there."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise AdntnError(f"Unknown device '{name}'; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdntnError(f"--device {name} was asked for, but no CUDA GPU is available here.")
    if device.type not in ("cpu", "cuda"):
        raise AdntnError(f"Device '{name}' is not supported; use cpu, cuda or cuda:N.")
    return device


def parse_total_ratio(text: str) -> float | None:
    """``--ratio total:R``: the whole set of compressed layers at dense/R (None for other forms)."""
    head, _, value = text.partition(":")
    if head.strip().lower() != "total" or not _:
        return None
    try:
        return float(value)
    except ValueError:
        raise AdntnError(f"--ratio total:R takes a number R, not '{value}'.") from None


def parse_ratio(text: str) -> tuple[float | None, dict[str, float]]:
    """``--ratio``: one number for every layer, or ``fc6=20000,fc7=80000`` per layer."""
    try:
        if "=" not in text:
            return float(text), {}
        pairs = [(name.strip(), float(value)) for name, value in
                 (item.split("=", 1) for item in text.split(",") if item.strip())]
    except ValueError:
        raise AdntnError(f"--ratio takes a number or LAYER=NUMBER pairs separated by commas, not '{text}'.") from None
    ratios: dict[str, float] = {}
    for name, value in pairs:
        if name in ratios:
            raise AdntnError(f"--ratio names {name} more than once; give each layer one ratio.")
        ratios[name] = value
    return None, ratios


def _positive_finite(value: float, flag: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise AdntnError(f"{flag} must be a positive finite number, not {value}.")


@dataclass(frozen=True)
class CompressOptions:
    """Everything ``compress`` does, by the CLI's names.

    Structure: ``arch``, ``ratio`` (one for every layer) or ``layer_ratios`` (per layer name) or
    ``bond_dim``, or one budget for all compressed layers together: ``budget`` (core parameters)
    or ``total_ratio`` (their dense parameters / R), split by measured sensitivity
    (``pipeline.allocate``); ``activation``. Weight-space and activation-space fits: ``steps``, ``lr``,
    ``target_dtype``. ``seed`` fixes the cores and the fine-tuning. ``device``. Reading the
    checkpoint: ``model`` (force the architecture), ``allow_pickle``. With ``data`` (an ImageFolder
    root): ``config`` (preprocessing TOML), ``epochs``, ``finetune_lr``, ``batch_size``,
    ``temperature``, ``kd_weight``, ``dropout``, ``train`` (dense layers trained too),
    ``cache_dir`` (trunk features kept between runs), ``feature_dtype`` (how they are stored:
    float16, bfloat16 or float32), ``record_samples`` (inputs recorded per layer for the
    activation-space fit), ``max_images`` (at most this many images per split, stratified by
    class, seeded by ``seed``), ``class_map`` (which output each class folder is), ``resume``
    (continue an interrupted fine-tuning from its last completed epoch, see ``compress_to``). The fine-tuning settings default to None, which means
    ``FINETUNE_DEFAULTS`` (see ``finetune``); given without ``data`` they are refused.
    """

    arch: str = "ttn"
    ratio: float | None = None
    layer_ratios: dict[str, float] = field(default_factory=dict)
    bond_dim: int | None = None
    budget: int | None = None
    total_ratio: float | None = None
    activation: str = "tanh"
    steps: int = 200
    lr: float = 1e-2
    seed: int = 0
    device: str = "cpu"
    target_dtype: str = "float32"
    model: str | None = None
    allow_pickle: bool = False
    data: Path | None = None
    config: Path | None = None
    epochs: int | None = None
    finetune_lr: float | None = None
    batch_size: int | None = None
    temperature: float | None = None
    kd_weight: float | None = None
    dropout: bool | None = None
    train: tuple[str, ...] = ()
    cache_dir: Path | None = None
    record_samples: int = 4096
    resume: bool = False
    feature_dtype: str = "float16"
    max_images: int | None = None
    class_map: Path | None = None

    def __post_init__(self) -> None:
        if self.arch not in archs():
            raise AdntnError(f"Unknown arch '{self.arch}'; choose one of {', '.join(archs())}.")
        if self.activation not in ACTIVATIONS:
            raise AdntnError(f"Unknown activation '{self.activation}'; choose one of {', '.join(ACTIVATIONS)}.")
        if (self.ratio is not None or self.layer_ratios) and self.bond_dim is not None:
            raise AdntnError("Give either --ratio or --bond-dim, not both.")
        if self.budget is not None or self.total_ratio is not None:
            given = [flag for flag, value in (("--budget", self.budget), ("--ratio total:R", self.total_ratio),
                                              ("--ratio", self.ratio if self.ratio is not None else (self.layer_ratios or None)),
                                              ("--bond-dim", self.bond_dim)) if value is not None]
            if len(given) > 1:
                raise AdntnError(f"Give one of {' and '.join(given)}, not both: each sets the layers' sizes.")
            if self.budget is not None:
                from adntn.pipeline.allocate import parse_budget

                object.__setattr__(self, "budget", parse_budget(self.budget))
            if self.total_ratio is not None and not (math.isfinite(self.total_ratio) and self.total_ratio > 1):
                raise AdntnError(f"--ratio total:R needs R greater than 1, not {self.total_ratio}.")
        elif self.ratio is None and self.bond_dim is None and not self.layer_ratios:
            object.__setattr__(self, "ratio", DEFAULT_RATIO)
        for ratio in [self.ratio, *self.layer_ratios.values()]:
            if ratio is not None and not math.isfinite(ratio):
                raise AdntnError(f"The compression ratio must be a finite number, not {ratio}.")
        if self.steps < 0:
            raise AdntnError(f"--steps must be 0 or more, not {self.steps}.")
        _positive_finite(self.lr, "--lr")
        if not 0 <= self.seed <= MAX_SEED:
            raise AdntnError(f"--seed must be between 0 and {MAX_SEED}, not {self.seed}.")
        if self.target_dtype not in TARGET_DTYPES:
            raise AdntnError(f"--target-dtype must be one of {', '.join(TARGET_DTYPES)}, not '{self.target_dtype}'.")
        resolve_device(self.device)
        if not 1 <= self.setting("batch_size") <= MAX_BATCH_SIZE:
            raise AdntnError(f"--batch-size must be between 1 and {MAX_BATCH_SIZE:,}, not {self.batch_size}.")
        _positive_finite(self.setting("finetune_lr"), "--finetune-lr")
        _positive_finite(self.setting("temperature"), "--temperature")
        if self.record_samples < 1:
            raise AdntnError(f"record_samples must be at least 1, not {self.record_samples}.")
        if self.feature_dtype not in FEATURE_DTYPE_NAMES:
            raise AdntnError(f"--feature-dtype must be one of {', '.join(FEATURE_DTYPE_NAMES)}, "
                             f"not '{self.feature_dtype}'.")
        if self.max_images is not None and (isinstance(self.max_images, bool) or not isinstance(self.max_images, int)
                                            or self.max_images < 1):
            raise AdntnError(f"--max-images must be a positive integer, not {self.max_images!r}.")
        if self.data is None:
            given = [flag for name, flag in FINETUNE_FLAGS.items() if getattr(self, name) is not None]
            if self.dropout is not None:
                given.append("--dropout" if self.dropout else "--no-dropout")
            if given:
                raise AdntnError(f"{given[0]} only applies with --data (the fine-tuning on images), "
                                 "so it would be ignored; pass --data or leave it out.")
        if self.data is None and (self.config is not None or self.train or self.max_images is not None
                                  or self.class_map is not None or self.resume):
            raise AdntnError("--config, --train, --max-images, --class-map and --resume only apply with --data.")
        self.finetune  # the fine-tuning settings are checked too

    @classmethod
    def from_kwargs(cls, **options) -> CompressOptions:
        """Options from keyword arguments; an unknown name is the user's error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise AdntnError(f"Unknown option '{unknown[0]}'; the options are {', '.join(sorted(known))}.")
        if isinstance(options.get("ratio"), Mapping):  # ratio={"fc6": 20000, "fc7": 80000}
            options["layer_ratios"] = {str(k): float(v) for k, v in options.pop("ratio").items()}
        elif isinstance(options.get("ratio"), str):  # ratio="total:5000" or "fc6=20000,fc7=80000" or "2000"
            text = options.pop("ratio")
            total = parse_total_ratio(text)
            if total is not None:
                options["total_ratio"] = total
            else:
                options["ratio"], layer_ratios = parse_ratio(text)
                if layer_ratios:
                    options["layer_ratios"] = layer_ratios
        for name in ("data", "config", "cache_dir", "class_map"):
            if options.get(name) is not None:
                options[name] = Path(options[name])
        if "train" in options:
            options["train"] = tuple(options["train"])
        return cls(**options)

    def setting(self, name: str):
        """A fine-tuning setting (``FINETUNE_DEFAULTS``' names): its value, or the default when None."""
        value = getattr(self, name)
        return FINETUNE_DEFAULTS[name] if value is None else value

    @property
    def finetune(self) -> FinetuneConfig:
        """The task-aware stage's settings (its seed is ``seed``)."""
        return FinetuneConfig(epochs=self.setting("epochs"), lr=self.setting("finetune_lr"),
                              batch_size=self.setting("batch_size"), temperature=self.setting("temperature"),
                              kd_weight=self.setting("kd_weight"), seed=self.seed, dropout=self.setting("dropout"))

    @property
    def target_torch_dtype(self) -> torch.dtype:
        return TARGET_DTYPES[self.target_dtype]

    def ratio_for(self, names: tuple[str | None, ...]) -> float | None:
        """The ratio for a layer known by ``names`` (alias, module): its own, else the common one."""
        return next((self.layer_ratios[name] for name in names if name in self.layer_ratios), self.ratio)

    def describe(self) -> dict:
        """The options as JSON values (paths as strings; fine-tuning defaults filled in), for the report."""
        values = {**asdict(self), **{name: self.setting(name) for name in FINETUNE_DEFAULTS}}
        return {key: str(value) if isinstance(value, Path) else (list(value) if isinstance(value, tuple) else value)
                for key, value in values.items()}
