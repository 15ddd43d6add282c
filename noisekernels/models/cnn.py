"""Plain convolutional models of the papers: the C&W/MagNet MNIST CNN (random-spiking.txt Table 6),
LeNet++ with a low-dimensional penultimate layer (A2SNN, a2snn-anisotropic-noise.txt section 4)
and a VGG-style net with batch norm (RSE's VGG16, random-self-ensemble.txt Fig. 1)."""

from torch import nn

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _check_widths(widths, name, count=None):
    widths = tuple(widths)
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"{name} must be positive ints, got {widths!r}")
    if count is not None and len(widths) != count:
        raise ValueError(f"{name} must hold {count} values, got {widths!r}")
    return widths


def _same_padding(size, kernel):
    """Valid convolutions on full-size inputs (as the paper), size-keeping ones on small inputs."""
    return 0 if size >= 28 else kernel // 2


def mnist_cnn(shape, num_classes, widths=(32, 64), dense=200, padding=None):
    """Conv(w0) x2, MaxPool, Conv(w1) x2, MaxPool, Dense(dense) x2 (the C&W/MagNet MNIST model);
    3x3 convs, ReLU. padding: None = valid convs on 28x28 or larger inputs, size-keeping on smaller
    ones (8x8 digits). Returns (body, features)."""
    c, h, w = shape
    w0, w1 = _check_widths(widths, "widths", 2)
    (dense,) = _check_widths((dense,), "dense")
    pad = _same_padding(min(h, w), 3) if padding is None else padding
    layers, size, channels = [], min(h, w), c
    for width in (w0, w1):
        for _ in range(2):
            layers += [nn.Conv2d(channels, width, 3, padding=pad), nn.ReLU()]
            channels, size = width, size - 2 + 2 * pad
        layers.append(nn.MaxPool2d(2))
        size //= 2
    if size < 1:
        raise ValueError(f"input shape {shape} is too small for mnist_cnn with padding={pad}")
    features = channels * size * size
    layers += [nn.Flatten(), nn.Linear(features, dense), nn.ReLU(), nn.Linear(dense, dense), nn.ReLU()]
    return nn.Sequential(*layers), dense


def lenet_plus(shape, num_classes, widths=(32, 64, 128), embed=32):
    """LeNet++ (Wen et al.): three stages of two 5x5 convs + PReLU and a 2x2 max-pool, then a
    Linear to an `embed`-d layer (32 in A2SNN) + PReLU. Returns (body, features)."""
    c, h, w = shape
    widths = _check_widths(widths, "widths")
    (embed,) = _check_widths((embed,), "embed")
    layers, channels, size = [], c, min(h, w)
    for width in widths:
        layers += [nn.Conv2d(channels, width, 5, padding=2), nn.PReLU(), nn.Conv2d(width, width, 5, padding=2), nn.PReLU()]
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        channels = width
    layers += [nn.Flatten(), nn.Linear(channels * size * size, embed), nn.PReLU()]
    return nn.Sequential(*layers), embed


def vgg(shape, num_classes, config=VGG16, width=1.0):
    """VGG-style: 3x3 conv + BN + ReLU per int of `config`, "M" a 2x2 max-pool (skipped once the map
    is 1x1), channels scaled by `width`, then global average pooling. Returns (body, features)."""
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"width must be a float > 0, got {width!r}")
    c, h, w = shape
    layers, channels, size = [], c, min(h, w)
    for item in config:
        if item == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            continue
        (out,) = _check_widths((max(1, round(item * width)),), "config")
        layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), channels
