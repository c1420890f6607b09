"""Tests for adntn.architectures: detecting torchvision AlexNet / VGG and rebuilding them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vgg import VGG, make_layers

from adntn.models.architectures import (
    MODEL_NAMES,
    build_model,
    describe,
    detect_model,
    resolve_layers,
)
from adntn.io.checkpoint import load_state_dict
from adntn.errors import AdntnError
from tolerances import assert_close_scaled

CIFAR_CHECKPOINT = Path("/work/shared/models/vgg16_bn_cifar10.safetensors")
TINY_VGG11_CONFIG = [8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"]
VGG11_ALIASES = [
    "conv1_1", "conv2_1", "conv3_1", "conv3_2", "conv4_1", "conv4_2", "conv5_1", "conv5_2",
    "fc6", "fc7", "fc8",
]
VGG16_ALIASES = [
    "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
    "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7", "fc8",
]


def tiny_vgg11(*, batch_norm: bool, pool_size: int = 1, num_classes: int = 10) -> VGG:
    """A genuine torchvision VGG with the VGG-11 layout, conv widths 8..64, classifier 128-128.

    Built independently of adntn: torchvision's own ``make_layers`` for the features and a
    classifier mirroring torchvision's (fc6 takes 64 * pool_size**2 inputs). Only the default
    classifier is constructed on the meta device, so nothing full-size is allocated.
    """
    torch.manual_seed(0)
    with torch.device("meta"):
        model = VGG(nn.Identity(), num_classes=num_classes, init_weights=False)
    model.features = make_layers(TINY_VGG11_CONFIG, batch_norm=batch_norm)
    model.avgpool = nn.AdaptiveAvgPool2d(pool_size)
    model.classifier = nn.Sequential(
        nn.Linear(64 * pool_size**2, 128), nn.ReLU(True), nn.Dropout(),
        nn.Linear(128, 128), nn.ReLU(True), nn.Dropout(),
        nn.Linear(128, num_classes),
    )
    if batch_norm:  # non-trivial running statistics, so a wrong rebuild changes the output
        for module in model.features:
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(5)
    return model.eval()


def assert_rebuilds(reference: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """Detect ``reference``'s state_dict, rebuild, load strictly and compare outputs."""
    state = reference.state_dict()
    rebuilt = build_model(detect_model(state))
    rebuilt.load_state_dict(state, strict=True)
    assert not rebuilt.training
    inputs = torch.randn(input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = reference.eval()(inputs), rebuilt(inputs)
    assert actual.shape == expected.shape
    assert_close_scaled(actual, expected)
    return rebuilt


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_full_size_layout_is_detected_as_itself(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        state = getattr(torchvision.models, name)(weights=None).state_dict()
    info = detect_model(state)
    assert info.name == name
    assert info.num_classes == 1000
    assert info.layers[-3].weight_shape == ((4096, 9216) if name == "alexnet" else (4096, 25088))


def test_full_size_vgg16() -> None:
    state = torchvision.models.vgg16(weights=None).state_dict()
    info = detect_model(state)
    assert info.name == "vgg16"
    assert info.family == "vgg" and not info.batch_norm
    assert info.num_classes == 1000
    assert info.features_size == 7
    assert [layer.alias for layer in info.layers] == VGG16_ALIASES
    assert info.conv_widths == (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    assert [layer.weight_shape[0] for layer in info.layers if layer.alias in ("fc6", "fc7")] == [4096, 4096]
    fc6 = info.layer("fc6")
    assert (fc6.module, fc6.kind, fc6.weight_shape) == ("classifier.0", "linear", (4096, 25088))
    assert info.layer("conv3_3").module == "features.14"
    assert info.layer("conv5_3").weight_shape == (512, 512, 3, 3)
    assert (info.layer("conv1_1").stride, info.layer("conv1_1").padding) == ((1, 1), (1, 1))


def test_alexnet_detection_and_rebuild() -> None:
    torch.manual_seed(0)
    reference = torchvision.models.alexnet(weights=None, num_classes=10)
    info = detect_model(reference.state_dict())
    assert info.name == "alexnet"
    assert info.num_classes == 10
    assert info.features_size == 6
    assert [layer.alias for layer in info.layers] == [
        "conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8",
    ]
    assert [layer.module for layer in info.layers] == [
        "features.0", "features.3", "features.6", "features.8", "features.10",
        "classifier.1", "classifier.4", "classifier.6",
    ]
    conv1 = info.layer("conv1")
    assert conv1.weight_shape == (64, 3, 11, 11)
    assert (conv1.stride, conv1.padding) == ((4, 4), (2, 2))
    assert (info.layer("conv2").stride, info.layer("conv2").padding) == ((1, 1), (2, 2))
    assert info.layer("fc6").weight_shape == (4096, 9216)
    assert info.layer("fc8").weight_shape == (10, 4096)
    rebuilt = assert_rebuilds(reference, (1, 3, 224, 224))
    assert rebuilt(torch.zeros(1, 3, 224, 224)).shape == (1, 10)


def test_cifar_shaped_vgg16_bn() -> None:
    torch.manual_seed(0)
    reference = torchvision.models.vgg16_bn(weights=None, num_classes=10)
    reference.avgpool = nn.AdaptiveAvgPool2d(1)
    reference.classifier[0] = nn.Linear(512, 4096)
    info = detect_model(reference.state_dict())
    assert info.name == "vgg16_bn"
    assert info.batch_norm
    assert info.num_classes == 10
    assert info.features_size == 1
    assert info.layer("fc6").weight_shape == (4096, 512)
    assert info.layer("fc7").weight_shape == (4096, 4096)
    assert info.layer("conv1_2").module == "features.3"  # conv, BN, ReLU per step
    assert [layer.alias for layer in info.layers] == VGG16_ALIASES
    rebuilt = assert_rebuilds(reference, (1, 3, 32, 32))
    assert rebuilt.classifier[0].weight.shape == (4096, 512)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_reduced_width_vgg11(batch_norm: bool) -> None:
    reference = tiny_vgg11(batch_norm=batch_norm)
    info = detect_model(reference.state_dict())
    assert info.name == ("vgg11_bn" if batch_norm else "vgg11")
    assert info.conv_widths == (8, 16, 32, 32, 64, 64, 64, 64)
    assert [layer.weight_shape[0] for layer in info.layers if layer.alias in ("fc6", "fc7")] == [128, 128]
    assert info.num_classes == 10
    assert info.features_size == 1
    assert [layer.alias for layer in info.layers] == VGG11_ALIASES
    assert info.layer("conv3_2").weight_shape == (32, 32, 3, 3)
    assert info.layer("fc6").weight_shape == (128, 64)
    rebuilt = assert_rebuilds(reference, (2, 3, 32, 32))
    assert rebuilt(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_reduced_width_vgg11_with_2x2_avgpool_output() -> None:
    reference = tiny_vgg11(batch_norm=False, pool_size=2, num_classes=7)
    info = detect_model(reference.state_dict())
    assert info.features_size == 2
    assert info.num_classes == 7
    assert info.layer("fc6").weight_shape == (128, 256)
    assert_rebuilds(reference, (1, 3, 64, 64))


def test_checkpoint_without_num_batches_tracked_still_fits() -> None:
    reference = tiny_vgg11(batch_norm=True)
    state = {k: v for k, v in reference.state_dict().items() if "num_batches_tracked" not in k}
    info = detect_model(state)
    assert info.name == "vgg11_bn"
    build_model(info).load_state_dict(state, strict=True)


def test_meta_tensors_are_enough_for_detection() -> None:
    real_state = tiny_vgg11(batch_norm=True).state_dict()
    state = {name: torch.empty_like(value, device="meta") for name, value in real_state.items()}
    assert detect_model(state).name == "vgg11_bn"


def test_override_accepts_the_right_model() -> None:
    state = tiny_vgg11(batch_norm=True).state_dict()
    assert detect_model(state, override="vgg11_bn") == detect_model(state)
    assert detect_model(state, override=" VGG11_BN ").name == "vgg11_bn"


def test_override_with_an_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(AdntnError) as raised:
        detect_model(tiny_vgg11(batch_norm=False).state_dict(), override="resnet50")
    message = str(raised.value)
    assert "Unknown model 'resnet50'" in message
    assert all(name in message for name in MODEL_NAMES)


def test_override_with_a_model_that_does_not_fit() -> None:
    state = tiny_vgg11(batch_norm=True).state_dict()
    with pytest.raises(AdntnError) as raised:
        detect_model(state, override="vgg11")
    assert str(raised.value) == (
        "The checkpoint is not a vgg11 state_dict: it has no features.3.weight."
    )
    with pytest.raises(AdntnError, match="not a vgg16_bn state_dict"):
        detect_model(state, override="vgg16_bn")


def test_unrecognised_checkpoint() -> None:
    state = torchvision.models.squeezenet1_1(weights=None).state_dict()
    with pytest.raises(AdntnError, match="not a torchvision AlexNet or VGG state_dict; pass --"):
        detect_model(state)


def test_extra_key_prevents_detection() -> None:
    state = dict(tiny_vgg11(batch_norm=False).state_dict())
    state["head.weight"] = torch.zeros(2, 2)
    with pytest.raises(AdntnError, match="not a torchvision AlexNet or VGG"):
        detect_model(state)
    with pytest.raises(AdntnError, match="unexpected head.weight"):
        detect_model(state, override="vgg11")


def test_right_keys_with_inconsistent_shapes() -> None:
    state = dict(tiny_vgg11(batch_norm=False).state_dict())
    state["classifier.3.weight"] = torch.zeros(128, 100)
    with pytest.raises(AdntnError) as raised:
        detect_model(state)
    assert str(raised.value) == (
        "The checkpoint has the keys of vgg11 but not its shapes: "
        "classifier.3.weight has shape (128, 100), expected (128, 128)."
    )


def test_fc6_width_that_is_not_channels_times_a_square() -> None:
    state = dict(tiny_vgg11(batch_norm=False).state_dict())
    state["classifier.0.weight"] = torch.zeros(128, 64 * 3)
    with pytest.raises(AdntnError, match="fc6 takes 192 inputs, which is not 64 channels x s x s"):
        detect_model(state)


def test_conv_chain_mismatch() -> None:
    state = dict(tiny_vgg11(batch_norm=False).state_dict())
    state["features.3.weight"] = torch.zeros(16, 4, 3, 3)  # conv2_1 must take conv1_1's 8 channels
    expected = r"features.3.weight has shape \(16, 4, 3, 3\), expected \(16, 8, 3, 3\)"
    with pytest.raises(AdntnError, match=expected):
        detect_model(state)


def test_weight_with_the_wrong_number_of_dimensions() -> None:
    state = dict(tiny_vgg11(batch_norm=False).state_dict())
    state["classifier.6.weight"] = torch.zeros(10, 128, 1)
    expected = r"classifier.6.weight has shape \(10, 128, 1\), expected 2 dimensions"
    with pytest.raises(AdntnError, match=expected):
        detect_model(state)


def test_batch_norm_width_mismatch() -> None:
    state = dict(tiny_vgg11(batch_norm=True).state_dict())
    state["features.5.running_var"] = torch.ones(17)  # conv2_1 has 16 channels
    with pytest.raises(AdntnError, match=r"features.5.running_var has shape \(17,\), expected"):
        detect_model(state)


def test_resolve_layers_by_alias_module_and_weight_key_in_given_order() -> None:
    info = detect_model(tiny_vgg11(batch_norm=False).state_dict())
    layers = resolve_layers(info, ["fc7", "classifier.0", " conv3_2 ", "features.0.weight"])
    assert [layer.module for layer in layers] == [
        "classifier.3", "classifier.0", "features.8", "features.0",
    ]
    assert [layer.alias for layer in layers] == ["fc7", "fc6", "conv3_2", "conv1_1"]
    assert layers[0].weight_key == "classifier.3.weight"
    assert layers[0].bias_key == "classifier.3.bias"
    assert layers[0].params == 128 * 128


def test_resolve_layers_rejects_a_layer_named_twice() -> None:
    info = detect_model(tiny_vgg11(batch_norm=False).state_dict())
    with pytest.raises(AdntnError, match=r"Layer fc7 \(classifier.3\) is named more than once"):
        resolve_layers(info, ["fc7", "fc6", "classifier.3"])
    with pytest.raises(AdntnError, match="named more than once"):
        resolve_layers(info, ["fc8", "fc8"])


def test_resolve_layers_rejects_unknown_names_listing_valid_ones() -> None:
    info = detect_model(tiny_vgg11(batch_norm=False).state_dict())
    with pytest.raises(AdntnError) as raised:
        resolve_layers(info, ["fc6", "conv1_2"])  # VGG-11 has one conv in block 1
    assert str(raised.value) == (
        "Unknown layer 'conv1_2'; valid layers are conv1_1..conv5_2, fc6, fc7, fc8 "
        "(or module names such as classifier.6)."
    )


def test_resolve_layers_rejects_an_empty_list() -> None:
    info = detect_model(tiny_vgg11(batch_norm=False).state_dict())
    with pytest.raises(AdntnError, match="No layers were named"):
        resolve_layers(info, [])


def test_describe_rows() -> None:
    info = detect_model(tiny_vgg11(batch_norm=True).state_dict())
    rows = describe(info)
    assert [row["alias"] for row in rows] == VGG11_ALIASES
    assert rows[0] == {
        "alias": "conv1_1", "module": "features.0", "kind": "conv",
        "shape": (8, 3, 3, 3), "params": 8 * 3 * 3 * 3 + 8,
    }
    assert rows[-1] == {
        "alias": "fc8", "module": "classifier.6", "kind": "linear",
        "shape": (10, 128), "params": 10 * 128 + 10,
    }
    model = tiny_vgg11(batch_norm=True)
    conv_and_linear = sum(
        p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
        for p in m.parameters()
    )
    assert sum(row["params"] for row in rows) == conv_and_linear


def test_reference_cifar10_checkpoint() -> None:
    if not CIFAR_CHECKPOINT.exists():
        pytest.skip(f"{CIFAR_CHECKPOINT} is not available")
    state, metadata = load_state_dict(CIFAR_CHECKPOINT)
    info = detect_model(state)
    assert info.name == "vgg16_bn"
    assert info.num_classes == 10
    assert info.features_size == 1
    assert info.layer("fc6").weight_shape == (4096, 512)
    assert metadata.get("arch") == "vgg16_bn"
    model = build_model(info)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_vgg_configs_are_torchvisions():
    from torchvision.models.vgg import cfgs

    from adntn.models.architectures import VGG_CFGS

    assert VGG_CFGS == cfgs
