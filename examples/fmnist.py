"""Fashion-MNIST data and the example networks (a ResNet-20-style net, a VGG-style net and a MobileNetV2-style net).

The data comes from the idx .gz files of Debian's dataset-fashion-mnist (`make setup` fetches them into
.deps/fashion-mnist). Images are normalised with the training set's mean and std, shape (N, 1, 28, 28).
"""

import gzip
import pathlib

import numpy as np
import torch
from torch import nn

__all__ = ["FMNIST_DIR", "MEAN", "STD", "load_fmnist", "write_npz", "ResNet20", "VGGNet", "MobileNetV2", "CLASSES"]

FMNIST_DIR = pathlib.Path(__file__).resolve().parent.parent / ".deps" / "fashion-mnist"
# Training-set pixel statistics (pixels scaled to [0, 1]).
MEAN = 0.2860
STD = 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: pathlib.Path) -> np.ndarray:
    """Parse one idx file: a big-endian header (magic, dims) followed by uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


def load_fmnist(split: str, root: pathlib.Path = FMNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Return (x float32 (N,1,28,28) normalised, y int64 (N,)) for split 'train' (60k) or 'test' (10k)."""
    images, labels = _FILES[split]
    root = pathlib.Path(root)
    if not (root / images).exists():
        raise FileNotFoundError(f"{root / images} not found: run `make setup` (scripts/fetch_fashion_mnist.sh)")
    x = _read_idx(root / images).astype(np.float32)[:, None] / 255.0
    x = (x - MEAN) / STD
    y = _read_idx(root / labels).astype(np.int64)
    return x.astype(np.float32), y


def write_npz(root: pathlib.Path = FMNIST_DIR) -> None:
    """Write train.npz and test.npz (x, y) beside the .gz files: the format `ctprune --data` reads."""
    for split in _FILES:
        x, y = load_fmnist(split, root)
        np.savez(pathlib.Path(root) / f"{split}.npz", x=x, y=y)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN and a residual add; a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 (He et al.'s CIFAR layout) for 28x28x1: a 3x3 stem, 3 stages of 3 blocks (16/32/64), pool, linear."""

    def __init__(self, num_classes: int = 10, widths=(16, 32, 64), blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, c_in = [], widths[0]
        for stage, width in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(c_in, width, 2 if (stage > 0 and b == 0) else 1))
                c_in = width
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class VGGNet(nn.Module):
    """VGG-style: conv-BN-ReLU pairs with max-pooling (28→14→7→3), then Flatten → Gemm → ReLU → Dropout → Gemm."""

    def __init__(self, num_classes: int = 10, widths=(32, 64, 128)):
        super().__init__()
        layers, c_in = [], 1
        for i, width in enumerate(widths):
            convs = 2 if i < len(widths) - 1 else 1
            for _ in range(convs):
                layers += [nn.Conv2d(c_in, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU()]
                c_in = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * 3 * 3, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand (t x) + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 project + BN (linear), and
    a residual add when the shape is unchanged. With t = 1 there is no expand Conv."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al.) shrunk for 28x28x1: a 3x3 stem at full resolution, inverted residual stages
    (expansion t, width c, blocks n, first stride s) down to 7x7, a 1x1 head Conv, average pool, linear.
    Most of its multiply-adds are in 1x1 Convs, as in the ImageNet net."""

    # (t, c, n, s) as in the paper's Table 2, with fewer, narrower stages for 28x28 inputs.
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 3, 1), (6, 96, 2, 1))

    def __init__(self, num_classes: int = 10, stem: int = 16, head: int = 320, stages=STAGES):
        super().__init__()
        layers = [nn.Conv2d(1, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6()]
        c_in = stem
        for t, c, n, s in stages:
            for b in range(n):
                layers.append(InvertedResidual(c_in, c, s if b == 0 else 1, t))
                c_in = c
        layers += [nn.Conv2d(c_in, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
