"""Noise layers, drop-in like nn.Dropout; each owns a Stream (saved in the state_dict)."""

from .noise import (AdditiveNoise, GaussianNoise, LaplaceNoise, LearnableNoise, UniformNoise, WeightNoise,
                    add_weight_noise)
from .random_spike import RandomSpike

__all__ = ["AdditiveNoise", "GaussianNoise", "LaplaceNoise", "LearnableNoise", "RandomSpike", "UniformNoise",
           "WeightNoise", "add_weight_noise"]
