"""Residual models: the CIFAR ResNet-18 (He et al.; A2SNN and RSE use it, A2SNN with a 32-d layer
before the classifier) and the wide-ResNet factory (WRN-depth-k, random-spiking.txt Table 6)."""

from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN, ReLU, identity or 1x1-conv shortcut (post-activation, ResNet-18)."""

    def __init__(self, inp, out, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out)
        self.conv2, self.bn2 = nn.Conv2d(out, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity() if stride == 1 and inp == out else nn.Sequential(
            nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class WideBlock(nn.Module):
    """Pre-activation block of a wide ResNet: BN-ReLU-conv twice (dropout between, optional)."""

    def __init__(self, inp, out, stride, dropout):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(inp), nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(out), nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.dropout = nn.Identity() if dropout == 0 else _dropout(dropout)
        self.shortcut = nn.Identity() if stride == 1 and inp == out else nn.Conv2d(inp, out, 1, stride, bias=False)

    def forward(self, x):
        h = self.conv1(self.relu(self.bn1(x)))
        return self.conv2(self.dropout(self.relu(self.bn2(h)))) + self.shortcut(x)


def _dropout(p):
    from .layers import Dropout
    return Dropout(p)


def _check_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def resnet18(shape, num_classes, width=64, embed=32):
    """CIFAR ResNet-18: 3x3 stem, four stages of two BasicBlocks (width, 2w, 4w, 8w; stride 1, 2,
    2, 2), global average pooling, then Linear to an `embed`-d layer + ReLU (embed=0: none).
    Returns (body, features)."""
    _check_int(width, "width")
    _check_int(embed, "embed", 0)
    layers = [nn.Conv2d(shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    channels = width
    for i, mult in enumerate((1, 2, 4, 8)):
        for j in range(2):
            layers.append(BasicBlock(channels, width * mult, 2 if i > 0 and j == 0 else 1))
            channels = width * mult
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if embed:
        layers += [nn.Linear(channels, embed), nn.ReLU()]
        channels = embed
    return nn.Sequential(*layers), channels


def wide_resnet(shape, num_classes, depth=28, widen=10, dropout=0.0):
    """WRN-depth-widen (Zagoruyko & Komodakis): (depth - 4) / 6 pre-activation blocks per stage at
    16k, 32k, 64k channels. Returns (body, features)."""
    _check_int(depth, "depth", 10)
    if (depth - 4) % 6:
        raise ValueError(f"depth must be 6n + 4 (10, 16, 22, 28, ...), got {depth}")
    _check_int(widen, "widen")
    n = (depth - 4) // 6
    layers, channels = [nn.Conv2d(shape[0], 16, 3, 1, 1, bias=False)], 16
    for i, out in enumerate((16 * widen, 32 * widen, 64 * widen)):
        for j in range(n):
            layers.append(WideBlock(channels, out, 2 if i > 0 and j == 0 else 1, dropout))
            channels = out
    layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), channels
