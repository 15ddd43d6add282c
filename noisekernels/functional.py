"""Functional forms of the noise layers: explicit seed and offset, like torch.nn.functional."""

from .ops.random_spike import random_spike

__all__ = ["random_spike"]
