"""Reference architectures: a small CNN for 28x28 digits, a CIFAR-style ResNet-18 and an ImageNet-style ResNet-50."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


class SmallCNN(nn.Module):
    """Two 3x3 conv layers (16, 32 channels) with 2x2 max-pooling, a 64-unit hidden layer.

    Maps ``[N, in_channels, side, side]`` to logits ``[N, num_classes]``. About 0.1 M parameters
    at 28x28, so a few epochs on a few thousand images train in seconds on CPU. ``side`` must be
    divisible by 4 (two poolings).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, side: int = 28):
        super().__init__()
        if side % 4:
            raise InputError(f"SmallCNN: side must be divisible by 4 (two 2x2 poolings), got {side}")
        self.c1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * (side // 4) ** 2, 64)
        self.out = nn.Linear(64, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[N, 64]`` (post-ReLU), used by neuron-targeting attacks."""
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem without max-pool, four stages of two basic blocks.

    Maps ``[N, in_channels, H, W]`` (32x32 in the paper; any size >= 8 works thanks to the
    adaptive pooling) to logits ``[N, num_classes]``. ``width`` scales every stage (64, 128, 256,
    512 at 1.0); ``width=0.125`` gives a net small enough for CPU tests.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(cin, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled last-stage activations ``[N, 512 * width]``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, with batch norm and an identity (or
    1x1 projection) shortcut: torchvision's ResNet-50 v1.5 block."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet50(nn.Module):
    """ImageNet-style ResNet-50: 7x7 stride-2 stem and 3x3 max-pool, then [3, 4, 6, 3] bottleneck blocks.

    Maps ``[N, in_channels, H, W]`` (224x224 on ImageNet; small sides such as 16 or 32 work thanks
    to the adaptive pooling) to logits ``[N, num_classes]``. ``width`` is the first stage's bottleneck
    width (stages: width, 2, 4, 8 x width; outputs 4x that): 64 is torchvision's layout, about
    25.6 M parameters with 1000 classes; ``width=8`` gives a net small enough for CPU runs.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: int = 64):
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise InputError(f"ResNet50: width must be a positive integer, got {width!r}")
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, blocks in enumerate((3, 4, 6, 3)):
            planes = width * 2**i
            stage = [Bottleneck(cin, planes, 1 if i == 0 else 2)]
            cin = planes * Bottleneck.expansion
            stage += [Bottleneck(cin, planes) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(cin, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled last-stage activations ``[N, 32 * width]``."""
        out = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


ARCHITECTURES: dict[str, type[nn.Module]] = {"small_cnn": SmallCNN, "resnet18": ResNet18, "resnet50": ResNet50}


def build(name: str, **kwargs) -> nn.Module:
    """Instantiate a registered architecture by name (see ``ARCHITECTURES``) with ``kwargs``."""
    try:
        cls = ARCHITECTURES[name]
    except KeyError:
        raise InputError(f"unknown architecture {name!r}; registered: {sorted(ARCHITECTURES)}") from None
    return cls(**kwargs)
