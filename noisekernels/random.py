"""Reproducible random tensors from (seed, offset) on every backend: the stream contract's fills."""

from .ops.random import normal, philox4x32, uniform

__all__ = ["normal", "philox4x32", "uniform"]
