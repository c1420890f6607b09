"""Offline demo assets: a small VGG-11 trained on scikit-learn's bundled handwritten digits.

``python -m adntn.demo DIR`` writes

    DIR/digits-vgg11.safetensors    a torchvision VGG-11 layout at 1/8 width (convs 8..64 channels,
                                    classifier 64 -> 256 -> 256 -> 10), trained on the digits
    DIR/digits/{train,test}/<class>/*.png   the same 1,797 images as 32x32 RGB PNGs (80/20 split)

No download is needed: the 8x8 digits ship inside scikit-learn. Training takes well under a
minute on two CPU cores and is deterministic for a given seed; existing assets are reused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.vgg import VGG, make_layers

from adntn.io.checkpoint import save_state_dict

WIDTH_CONFIG = [8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"]  # VGG-11 ('A') at 1/8 width
HIDDEN = 256
SIDE = 32
CHECKPOINT_NAME = "digits-vgg11.safetensors"
DATA_NAME = "digits"


def small_vgg11(num_classes: int = 10) -> VGG:
    """torchvision's VGG-11 module layout at 1/8 width for 32x32 inputs (avgpool output 1x1)."""
    model = VGG(make_layers(WIDTH_CONFIG), num_classes=num_classes, init_weights=True)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier[0] = nn.Linear(WIDTH_CONFIG[-2], HIDDEN)
    model.classifier[3] = nn.Linear(HIDDEN, HIDDEN)
    model.classifier[6] = nn.Linear(HIDDEN, num_classes)
    return model


def digit_images(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_images, train_labels, test_images, test_labels); images uint8 (n, 3, 32, 32)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    large = F.interpolate(small, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    images = (large.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(order))
    return images[order[:cut]], labels[order[:cut]], images[order[cut:]], labels[order[cut:]]


def export_image_folder(root: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    from PIL import Image

    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:04d}.png")


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor,
          std: torch.Tensor, epochs: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    inputs = (images.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * ((len(labels) + 63) // 64))
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(64):
            loss = F.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> float:
    model.eval()
    inputs = (images.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return float((model(inputs).argmax(1) == labels).float().mean())


def make_demo(directory: Path, *, epochs: int = 20, seed: int = 0) -> tuple[Path, Path]:
    """Train (or reuse) the demo checkpoint and data; returns (checkpoint, data root)."""
    directory = Path(directory)
    checkpoint, data = directory / CHECKPOINT_NAME, directory / DATA_NAME
    if checkpoint.exists() and (data / "test").is_dir():
        return checkpoint, data
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = digit_images(seed)
    pixels = train_x.float() / 255
    mean = pixels.mean(dim=(0, 2, 3)).mul(1e4).round().div(1e4)  # 4 decimals, as in the metadata
    std = pixels.std(dim=(0, 2, 3)).mul(1e4).round().div(1e4)
    model = small_vgg11()
    train(model, train_x, train_y, mean, std, epochs, seed)
    test_accuracy = accuracy(model, test_x, test_y, mean, std)
    export_image_folder(data / "train", train_x, train_y)
    export_image_folder(data / "test", test_x, test_y)
    metadata = {
        "arch": "vgg11", "num_classes": "10", "input_size": str(SIDE),
        "mean": json.dumps([round(float(v), 4) for v in mean]),
        "std": json.dumps([round(float(v), 4) for v in std]),
        "classes": json.dumps([str(c) for c in range(10)]),
        "trained_on": f"scikit-learn digits, {len(train_y)} train images, {epochs} epochs, seed {seed}",
        "test_top1": f"{test_accuracy:.4f}",
    }
    save_state_dict(model.state_dict(), checkpoint, metadata=metadata)
    return checkpoint, data


def main(argv: list[str]) -> None:
    directory = Path(argv[0] if argv else "demo-out")
    checkpoint, data = make_demo(directory)
    print(f"demo checkpoint: {checkpoint}\ndemo data:       {data}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
