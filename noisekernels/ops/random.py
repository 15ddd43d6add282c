"""philox4x32, uniform and normal: the stream contract's building blocks on every backend.

uniform(size, seed, offset) fills a tensor with U(w0) of counters offset + i (i in logical
order); normal with the Box-Muller normal of (w0, w1). Uniforms are bit-identical on every
backend, normals agree to a few ulp. float16/bfloat16 outputs are the float32 values rounded to
nearest (so a uniform may round up to 1.0 there).
"""

import torch

from .. import philox
from .._extension import call_op, register_op, triton_kernel
from ._args import check_floating_dtype, check_size, stream_tensors

def philox4x32_reference(counter, key):
    c = counter.reshape(-1, 4)
    w = philox.philox4x32_10(c[:, 0], c[:, 1], c[:, 2], c[:, 3], key[0], key[1])
    return torch.stack(w, dim=-1).reshape(counter.shape)


def philox_uniform_reference(seed, offset, size, dtype):
    n = torch.Size(size).numel()
    w0, _, _, _ = philox.words(seed, offset, n)
    return philox.uniform_from_word(w0).to(dtype).reshape(size)


def philox_normal_reference(seed, offset, size, dtype):
    n = torch.Size(size).numel()
    w0, w1, _, _ = philox.words(seed, offset, n)
    return philox.normal_from_words(w0, w1).to(dtype).reshape(size)


register_op("philox4x32", "philox4x32(Tensor counter, Tensor key) -> Tensor",
            reference=philox4x32_reference, triton=triton_kernel("random_fill", "philox4x32"))
register_op("philox_uniform", "philox_uniform(Tensor seed, Tensor offset, SymInt[] size, ScalarType dtype) -> Tensor",
            reference=philox_uniform_reference, triton=triton_kernel("random_fill", "philox_uniform"))
register_op("philox_normal", "philox_normal(Tensor seed, Tensor offset, SymInt[] size, ScalarType dtype) -> Tensor",
            reference=philox_normal_reference, triton=triton_kernel("random_fill", "philox_normal"))


@torch.library.register_fake("noisekernels::philox4x32")
def _(counter, key):
    return torch.empty_like(counter)


@torch.library.register_fake("noisekernels::philox_uniform")
def _(seed, offset, size, dtype):
    return seed.new_empty(size, dtype=dtype)


@torch.library.register_fake("noisekernels::philox_normal")
def _(seed, offset, size, dtype):
    return seed.new_empty(size, dtype=dtype)


def philox4x32(counter, key, *, backend=None):
    """Philox4x32-10 words of counters (..., 4) under key (k0, k1): int64 tensors of 32-bit words."""
    for name, t, shape_ok in (("counter", counter, counter.dim() >= 1 and counter.shape[-1] == 4),
                              ("key", key, key.shape == (2,))):
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be an int64 tensor of 32-bit words, got {t.dtype}")
        if not shape_ok:
            raise ValueError(f"{name} must have shape {'(..., 4)' if name == 'counter' else '(2,)'}, got {tuple(t.shape)}")
    if key.device != counter.device:
        raise ValueError(f"key is on {key.device} but counter is on {counter.device}")
    return call_op("philox4x32", backend, counter.device, counter, key)


def _fill(name, size, seed, offset, dtype, device, backend):
    check_floating_dtype(dtype)
    size = check_size(size)
    seed, offset = stream_tensors(seed, offset, device)
    return call_op(name, backend, seed.device, seed, offset, size, dtype)


def uniform(size, seed, offset, *, dtype=torch.float32, device=None, backend=None):
    """A tensor of `size` holding U(w0) of counters offset + i under key `seed`, in [0, 1).

    seed, offset: ints in [0, 2**64) or one-element int64 tensors (a Stream's buffers); the output
    is on their device (or `device`). backend: None (the device's native kernel), "reference",
    "cpu", "cuda" or "triton".
    """
    return _fill("philox_uniform", size, seed, offset, dtype, device, backend)


def normal(size, seed, offset, *, dtype=torch.float32, device=None, backend=None):
    """Like uniform, with the contract's standard normal of (w0, w1)."""
    return _fill("philox_normal", size, seed, offset, dtype, device, backend)
