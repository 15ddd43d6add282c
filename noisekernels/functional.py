"""Functional forms of the noise layers: explicit seed and offset, like torch.nn.functional."""

from .ops.noise_add import gaussian_augment, noise_add
from .ops.noise_add_foreach import noise_add_foreach
from .ops.random_spike import random_spike

__all__ = ["gaussian_augment", "noise_add", "noise_add_foreach", "random_spike"]
