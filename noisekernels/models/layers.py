"""The frame every zoo model shares, and its small layers.

A model is Net: input_noise -> normalize -> body -> penultimate -> classifier. input_noise and
penultimate are identity slots a defense preset fills (RSE's init noise on the [0, 1] input,
A2SNN's anisotropic noise on the penultimate features); noise inside the body is attached by the
preset with hooks. Normalisation is the model's first layer, so attacks and noise see [0, 1] inputs.
"""

import torch
from torch import nn

from ..random import uniform
from ..ops._args import check_probability
from ..stream import Stream


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers (saved with the weights)."""

    def __init__(self, mean, std):
        super().__init__()
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != std.shape or mean.dim() != 1 or not bool((std > 0).all()):
            raise ValueError(f"mean and std must be 1-d of the same length with std > 0, got {mean} and {std}")
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std

    def extra_repr(self):
        return f"channels={self.mean.shape[1]}"


class Dropout(nn.Module):
    """Inverted dropout whose mask comes from its own Stream (never torch's global RNG), so a
    resumed run drops the same units as an uninterrupted one. Active in training only."""

    def __init__(self, p=0.5, seed=None):
        super().__init__()
        self.p = check_probability(p)
        if self.p == 1.0:
            raise ValueError("p must be < 1 (p is the drop probability)")
        self.stream = Stream(seed)

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        u = uniform(x.shape, *self.stream.reserve(x.numel()), dtype=x.dtype, device=x.device)
        return x * (u >= self.p).to(x.dtype) / (1 - self.p)

    def extra_repr(self):
        return f"p={self.p}"


class Net(nn.Module):
    """classifier(penultimate(body(normalize(input_noise(x))))); body maps (B, C, H, W) inputs to
    (B, features) and classifier is the final nn.Linear (A2SNN projects its rows)."""

    def __init__(self, body, features, num_classes, mean, std):
        super().__init__()
        self.input_noise = nn.Identity()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.penultimate = nn.Identity()
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x):
        return self.classifier(self.penultimate(self.body(self.normalize(self.input_noise(x)))))
