"""noisekernels: fused kernels for stochastic neural-network defenses."""

from ._extension import BUILD_INFO, REFERENCE_ONLY  # loads noisekernels._C first
from . import attacks, ensemble, functional, input_channels, metrics, nn, random
from .replicas import replicas
from .stream import Stream, checkpoint, for_rank, fresh_noise_in_backward

__version__ = "0.1.0"


def build_info():
    """How the loaded extension was built: source hash, torch version, CUDA, AVX-512 path."""
    return dict(BUILD_INFO, reference_only=REFERENCE_ONLY)


__all__ = ["Stream", "attacks", "build_info", "checkpoint", "ensemble", "metrics", "for_rank", "fresh_noise_in_backward", "functional", "input_channels", "nn", "random", "replicas"]
