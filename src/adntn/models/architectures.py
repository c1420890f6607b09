"""Recognising torchvision AlexNet / VGG state_dicts and rebuilding the matching model.

A state_dict is matched against the module layout of torchvision's ``alexnet`` and ``vgg11`` ..
``vgg19_bn`` (which ``features.N`` / ``classifier.N`` indices hold a conv, batch norm or linear
layer). Widths are read from the checkpoint's shapes, never assumed: reduced-width VGGs, other
class counts and the CIFAR-10 VGG whose fc6 is ``4096 x 512`` (avgpool output 1x1) are all
recognised, and :func:`build_model` rebuilds a model whose ``load_state_dict(strict=True)``
accepts the checkpoint.

Layer aliases follow the papers: ``fc6``, ``fc7``, ``fc8`` for the three classifier layers;
``conv1`` .. ``conv5`` for AlexNet; ``convB_K`` (block B between max-pools, K-th conv in the
block) for VGG, e.g. VGG-16's ``conv1_1`` .. ``conv5_3``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from adntn.errors import AdntnError

VGG_CONFIGS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}  # torchvision cfg letters
# torchvision.models.vgg.cfgs (a test pins the copy): recognising a checkpoint does not import
# torchvision, whose import alone costs 0.17 GB of memory; only build_model needs it.
VGG_CFGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
MODEL_NAMES = ("alexnet",) + tuple(
    name for depth in VGG_CONFIGS for name in (depth, f"{depth}_bn")
)
CLASSIFIER_ALIASES = ("fc6", "fc7", "fc8")
INPUT_CHANNELS = 3
BATCH_NORM_PARAMS = ("weight", "bias", "running_mean", "running_var")
BATCH_NORM_OPTIONAL = "num_batches_tracked"  # absent from checkpoints saved before torch 0.4.1


@dataclass(frozen=True)
class LayerInfo:
    """One convolution or linear layer of a recognised model.

    Attributes:
        module: the module path in the state_dict, e.g. ``"classifier.3"``.
        alias: the conventional name, e.g. ``"fc7"`` or ``"conv3_2"``.
        kind: ``"linear"`` (weight ``(out, in)``) or ``"conv"`` (weight ``(out, in, kh, kw)``).
        weight_shape: the weight's shape as stored in the checkpoint.
        has_bias: whether the layer has a bias of shape ``(out,)``.
        stride: the convolution's stride (``(1, 1)`` for linear layers).
        padding: the convolution's zero padding (``(0, 0)`` for linear layers).
    """

    module: str
    alias: str | None
    kind: str
    weight_shape: tuple[int, ...]
    has_bias: bool
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @property
    def weight_key(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias_key(self) -> str | None:
        return f"{self.module}.bias" if self.has_bias else None

    @property
    def params(self) -> int:
        """Number of weight entries (bias excluded)."""
        return math.prod(self.weight_shape)

    @property
    def label(self) -> str:
        """The alias when there is one, else the module path."""
        return self.alias or self.module


@dataclass(frozen=True)
class ModelInfo:
    """A recognised model: its torchvision name and everything needed to rebuild it.

    Attributes:
        name: ``"alexnet"``, ``"vgg11"``, ``"vgg11_bn"``, ..., ``"vgg19_bn"``.
        num_classes: fc8's output width.
        layers: every conv and linear layer in forward order (convs, then fc6, fc7, fc8).
        features_size: side s of the avgpool output ``(C_last, s, s)``; fc6's input width is
            ``C_last * s * s`` (7 for ImageNet VGG, 6 for AlexNet, 1 for CIFAR-style VGG).
    """

    name: str
    num_classes: int
    layers: tuple[LayerInfo, ...]
    features_size: int

    @property
    def family(self) -> str:
        """``"alexnet"`` or ``"vgg"``."""
        return "alexnet" if self.name == "alexnet" else "vgg"

    @property
    def batch_norm(self) -> bool:
        """Whether every conv is followed by a BatchNorm2d (the ``_bn`` variants)."""
        return self.name.endswith("_bn")

    @property
    def conv_widths(self) -> tuple[int, ...]:
        """Output channels of each conv, in forward order."""
        return tuple(layer.weight_shape[0] for layer in self.layers if layer.kind == "conv")

    def layer(self, name: str) -> LayerInfo:
        """The layer called ``name``: an alias (``fc7``), module (``classifier.3``) or weight key.

        Raises:
            AdntnError: no layer has that name.
        """
        for layer in self.layers:
            if name in (layer.alias, layer.module, layer.weight_key):
                return layer
        raise AdntnError(
            f"Unknown layer '{name}'; valid layers are {_brief_aliases(self)} "
            f"(or module names such as {self.layers[-1].module})."
        )


def _brief_aliases(info: ModelInfo) -> str:
    """E.g. ``"conv1_1..conv5_3, fc6, fc7, fc8"``."""
    convs = [layer.label for layer in info.layers if layer.kind == "conv"]
    linears = [layer.label for layer in info.layers if layer.kind == "linear"]
    return ", ".join([f"{convs[0]}..{convs[-1]}", *linears])


# --- torchvision layouts ---------------------------------------------------------------------


@dataclass(frozen=True)
class _ConvSlot:
    """Where torchvision puts one conv in ``features`` and its fixed hyper-parameters."""

    index: int
    alias: str
    kernel: int
    stride: int
    padding: int


@dataclass(frozen=True)
class _Layout:
    """Module positions of one torchvision model (widths excluded)."""

    name: str
    convs: tuple[_ConvSlot, ...]
    batch_norm: bool
    classifier: tuple[int, int, int]  # ``classifier`` indices of fc6, fc7, fc8


def _layout(name: str) -> _Layout:
    """The layout of torchvision's ``name`` (one of :data:`MODEL_NAMES`)."""
    if name == "alexnet":
        convs = (
            _ConvSlot(0, "conv1", kernel=11, stride=4, padding=2),
            _ConvSlot(3, "conv2", kernel=5, stride=1, padding=2),
            _ConvSlot(6, "conv3", kernel=3, stride=1, padding=1),
            _ConvSlot(8, "conv4", kernel=3, stride=1, padding=1),
            _ConvSlot(10, "conv5", kernel=3, stride=1, padding=1),
        )
        return _Layout(name, convs, batch_norm=False, classifier=(1, 4, 6))
    batch_norm = name.endswith("_bn")
    slots, index, block, position = [], 0, 1, 1
    for entry in VGG_CFGS[VGG_CONFIGS[name.removesuffix("_bn")]]:
        if entry == "M":  # MaxPool2d ends a block
            index, block, position = index + 1, block + 1, 1
            continue
        slots.append(_ConvSlot(index, f"conv{block}_{position}", kernel=3, stride=1, padding=1))
        index += 3 if batch_norm else 2  # conv, [BatchNorm2d,] ReLU
        position += 1
    return _Layout(name, tuple(slots), batch_norm=batch_norm, classifier=(0, 3, 6))


class _DoesNotFit(Exception):
    """A state_dict does not match a layout; ``keys_match`` says whether only shapes differ."""

    def __init__(self, reason: str, *, keys_match: bool) -> None:
        super().__init__(reason)
        self.keys_match = keys_match


def _check_keys(layout: _Layout, keys: set[str]) -> None:
    required, optional = set(), set()
    for slot in layout.convs:
        required |= {f"features.{slot.index}.weight", f"features.{slot.index}.bias"}
        if layout.batch_norm:
            norm = f"features.{slot.index + 1}"
            required |= {f"{norm}.{param}" for param in BATCH_NORM_PARAMS}
            optional.add(f"{norm}.{BATCH_NORM_OPTIONAL}")
    for index in layout.classifier:
        required |= {f"classifier.{index}.weight", f"classifier.{index}.bias"}
    missing = sorted(required - keys, key=_report_order)
    if missing:
        raise _DoesNotFit(f"it has no {missing[0]}", keys_match=False)
    unexpected = sorted(keys - required - optional, key=_report_order)
    if unexpected:
        raise _DoesNotFit(f"it has an unexpected {unexpected[0]}", keys_match=False)


def _check_dtypes(layout: _Layout, state: dict[str, torch.Tensor]) -> None:
    """Every tensor of the layout's keys is real floating point but the BatchNorm step counters
    (which torchvision keeps as integers); a model given anything else could not run."""
    for key in sorted(state, key=_report_order):
        dtype = state[key].dtype
        if not key.endswith(f".{BATCH_NORM_OPTIONAL}") and (dtype.is_complex or not dtype.is_floating_point):
            raise AdntnError(f"{key} holds {str(dtype).removeprefix('torch.')} values, but torchvision's "
                             f"{layout.name} takes real floating-point tensors there.")


def _report_order(key: str) -> tuple[bool, list[int | str]]:
    """Sort key for error reports: weights first, ``features.2`` before ``features.10``."""
    return not key.endswith(".weight"), [int(p) if p.isdigit() else p for p in key.split(".")]


def _out_width(state: dict[str, torch.Tensor], key: str, ndim: int) -> int:
    """Output width (first dimension) of the ``ndim``-dimensional weight ``state[key]``."""
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise _DoesNotFit(f"{key} has shape {shape}, expected {ndim} dimensions", keys_match=True)
    return shape[0]


def _expect_shape(state: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> None:
    actual = tuple(state[key].shape)
    if actual != shape:
        raise _DoesNotFit(f"{key} has shape {actual}, expected {shape}", keys_match=True)


def _fit(layout: _Layout, state: dict[str, torch.Tensor]) -> ModelInfo:
    """The :class:`ModelInfo` of ``state`` under ``layout``, or :class:`_DoesNotFit`."""
    _check_keys(layout, set(state))
    _check_dtypes(layout, state)
    layers, in_channels = [], INPUT_CHANNELS
    for slot in layout.convs:
        module = f"features.{slot.index}"
        out_channels = _out_width(state, f"{module}.weight", ndim=4)
        shape = (out_channels, in_channels, slot.kernel, slot.kernel)
        _expect_shape(state, f"{module}.weight", shape)
        _expect_shape(state, f"{module}.bias", (out_channels,))
        if layout.batch_norm:
            for param in BATCH_NORM_PARAMS:
                _expect_shape(state, f"features.{slot.index + 1}.{param}", (out_channels,))
        layers.append(
            LayerInfo(
                module, slot.alias, "conv", shape, has_bias=True,
                stride=(slot.stride, slot.stride), padding=(slot.padding, slot.padding),
            )
        )
        in_channels = out_channels

    fc6_key = f"classifier.{layout.classifier[0]}.weight"
    _out_width(state, fc6_key, ndim=2)
    flat_features = state[fc6_key].shape[1]
    features_size = math.isqrt(flat_features // in_channels) if in_channels > 0 else 0
    if features_size == 0 or in_channels * features_size**2 != flat_features:
        raise _DoesNotFit(
            f"fc6 takes {flat_features} inputs, which is not {in_channels} channels x s x s",
            keys_match=True,
        )
    in_features = flat_features
    for index, alias in zip(layout.classifier, CLASSIFIER_ALIASES):
        module = f"classifier.{index}"
        out_features = _out_width(state, f"{module}.weight", ndim=2)
        _expect_shape(state, f"{module}.weight", (out_features, in_features))
        _expect_shape(state, f"{module}.bias", (out_features,))
        layers.append(LayerInfo(module, alias, "linear", (out_features, in_features), True))
        in_features = out_features
    return ModelInfo(layout.name, in_features, tuple(layers), features_size)


def detect_model(state: dict[str, torch.Tensor], override: str | None = None) -> ModelInfo:
    """Recognise a torchvision AlexNet / VGG state_dict from its keys and shapes.

    Args:
        state: tensor name -> tensor (only ``.shape`` is read, so meta tensors work too).
        override: force this model name (the CLI's ``--model``) instead of detecting it.

    Raises:
        AdntnError: ``override`` is not a known name, the checkpoint does not fit it, or
            (without ``override``) the checkpoint fits no known model.
    """
    if override is not None:
        name = override.strip().lower()
        if name not in MODEL_NAMES:
            raise AdntnError(f"Unknown model '{override}'; choose one of {', '.join(MODEL_NAMES)}.")
        try:
            return _fit(_layout(name), state)
        except _DoesNotFit as mismatch:
            raise AdntnError(f"The checkpoint is not a {name} state_dict: {mismatch}.") from None
    for name in MODEL_NAMES:  # the layouts' key sets are pairwise distinct: at most one fits
        try:
            return _fit(_layout(name), state)
        except _DoesNotFit as mismatch:
            if mismatch.keys_match:
                raise AdntnError(
                    f"The checkpoint has the keys of {name} but not its shapes: {mismatch}."
                ) from None
    raise AdntnError(
        "The checkpoint is not a torchvision AlexNet or VGG state_dict; "
        "pass --model NAME to see why it does not fit a given model."
    )


def resolve_layers(info: ModelInfo, names: list[str]) -> list[LayerInfo]:
    """The layers called ``names`` (aliases, module paths or weight keys), in the given order.

    Raises:
        AdntnError: ``names`` is empty, a name is unknown, or a layer is named twice.
    """
    if not names:
        raise AdntnError("No layers were named; name at least one, e.g. fc6.")
    layers: list[LayerInfo] = []
    for name in names:
        layer = info.layer(name.strip())
        if layer in layers:
            raise AdntnError(f"Layer {layer.label} ({layer.module}) is named more than once.")
        layers.append(layer)
    return layers


def build_model(info: ModelInfo, *, materialize: bool = True) -> nn.Module:
    """The torchvision model described by ``info``, in eval mode, ready for the checkpoint.

    The module structure (and so every state_dict key) is torchvision's; conv widths, classifier
    widths, ``num_classes`` and the avgpool output size are the checkpoint's. Parameters carry
    PyTorch's default initialisation until the caller loads the checkpoint with
    ``model.load_state_dict(state, strict=True)``. Construction happens on the meta device, so
    default-size layers that are replaced are never allocated; with ``materialize=False`` the
    model is returned on the meta device, for ``load_state_dict(..., assign=True)``.
    """
    from torchvision.models import AlexNet
    from torchvision.models.vgg import VGG, make_layers

    with torch.device("meta"):
        if info.family == "alexnet":
            model: nn.Module = AlexNet(num_classes=info.num_classes)
        else:
            widths = iter(info.conv_widths)
            config = [
                entry if entry == "M" else next(widths)
                for entry in VGG_CFGS[VGG_CONFIGS[info.name.removesuffix("_bn")]]
            ]
            model = VGG(
                make_layers(config, batch_norm=info.batch_norm),
                num_classes=info.num_classes,
                init_weights=False,
            )
        model.avgpool = nn.AdaptiveAvgPool2d(info.features_size)
        # Give every conv and linear the checkpoint's shape (torchvision hard-codes AlexNet's
        # widths and every classifier's; VGG's convs from make_layers already match).
        for layer in info.layers:
            parent_path, _, index = layer.module.rpartition(".")
            parent = model.get_submodule(parent_path)
            parent[int(index)] = _fresh_layer(layer)
    if not materialize:
        return model.eval()
    model.to_empty(device="cpu")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            module.reset_parameters()
    return model.eval()


def _fresh_layer(layer: LayerInfo) -> nn.Module:
    """An ``nn.Conv2d`` or ``nn.Linear`` with ``layer``'s shapes and hyper-parameters."""
    if layer.kind == "linear":
        out_features, in_features = layer.weight_shape
        return nn.Linear(in_features, out_features, bias=layer.has_bias)
    out_channels, in_channels, kernel_h, kernel_w = layer.weight_shape
    return nn.Conv2d(
        in_channels, out_channels, (kernel_h, kernel_w),
        stride=layer.stride, padding=layer.padding, bias=layer.has_bias,
    )


def describe(info: ModelInfo) -> list[dict]:
    """One row per layer for ``adntn inspect``.

    Each row: ``alias``, ``module``, ``kind``, ``shape`` (weight shape tuple) and ``params``
    (weight plus bias entries).
    """
    return [
        {
            "alias": layer.alias,
            "module": layer.module,
            "kind": layer.kind,
            "shape": layer.weight_shape,
            "params": layer.params + (layer.weight_shape[0] if layer.has_bias else 0),
        }
        for layer in info.layers
    ]
