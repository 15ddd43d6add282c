"""Functional forms of the noise layers: explicit seed and offset, like torch.nn.functional."""

from .ops.noise_add import gaussian_augment, noise_add
from .ops.random_spike import random_spike

__all__ = ["gaussian_augment", "noise_add", "random_spike"]
