"""Noise layers, drop-in like nn.Dropout; each owns a Stream (saved in the state_dict)."""

from .anisotropic import AnisotropicNoise, max_entropy_loss, project_unit_rows_, wca_loss
from .brelu import BReLU, to_brelu
from .inject import inject
from .noise import (AdditiveNoise, GaussianNoise, LaplaceNoise, LearnableNoise, UniformNoise, WeightNoise,
                    add_weight_noise)
from .random_spike import RandomSpike

__all__ = ["AdditiveNoise", "AnisotropicNoise", "BReLU", "GaussianNoise", "LaplaceNoise", "LearnableNoise",
           "RandomSpike", "UniformNoise", "WeightNoise", "add_weight_noise", "inject", "max_entropy_loss",
           "project_unit_rows_", "to_brelu", "wca_loss"]
