"""Noise layers, drop-in like nn.Dropout; each owns a Stream (saved in the state_dict)."""

from .random_spike import RandomSpike

__all__ = ["RandomSpike"]
