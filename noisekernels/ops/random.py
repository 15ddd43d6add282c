"""philox4x32, uniform and normal: the stream contract's building blocks on every backend.

uniform(size, ...) fills a tensor with U(word j mod 4) of counter offset + k*ceil(S/4) + j//4 for
element j of segment k (version 2 of the contract: ARCHITECTURE.md section 2); normal with the
Box-Muller pairs (cos, sin) of (w0, w1) and (w2, w3) (Triton's tl.rand4x / tl.randn4x). Uniforms
are bit-identical on every backend, normals agree to a few ulp. float16/bfloat16 outputs are the
float32 values rounded to nearest (so a uniform may round up to 1.0 there).
"""

import torch

from .. import philox
from .._extension import call_op, register_op, triton_kernel
from ._args import check_floating_dtype, check_size
from ._streams import call_stream


def philox4x32_reference(counter, key):
    c = counter.reshape(-1, 4)
    w = philox.philox4x32_10(c[:, 0], c[:, 1], c[:, 2], c[:, 3], key[0], key[1])
    return torch.stack(w, dim=-1).reshape(counter.shape)


def philox_uniform_reference(seed, offset, size, dtype, segments):
    n = torch.Size(size).numel()
    return philox.call_uniforms(seed, offset, n, segments).to(dtype).reshape(size)


def philox_normal_reference(seed, offset, size, dtype, segments):
    n = torch.Size(size).numel()
    return philox.call_normals(seed, offset, n, segments).to(dtype).reshape(size)


register_op("philox4x32", "philox4x32(Tensor counter, Tensor key) -> Tensor",
            reference=philox4x32_reference, triton=triton_kernel("random_fill", "philox4x32"))
register_op("philox_uniform", "philox_uniform(Tensor seed, Tensor offset, SymInt[] size, ScalarType dtype, "
            "int segments) -> Tensor",
            reference=philox_uniform_reference, triton=triton_kernel("random_fill", "philox_uniform"))
register_op("philox_normal", "philox_normal(Tensor seed, Tensor offset, SymInt[] size, ScalarType dtype, "
            "int segments) -> Tensor",
            reference=philox_normal_reference, triton=triton_kernel("random_fill", "philox_normal"))


@torch.library.register_fake("noisekernels::philox4x32")
def _(counter, key):
    return torch.empty_like(counter)


@torch.library.register_fake("noisekernels::philox_uniform")
def _(seed, offset, size, dtype, segments):
    return seed.new_empty(size, dtype=dtype)


@torch.library.register_fake("noisekernels::philox_normal")
def _(seed, offset, size, dtype, segments):
    return seed.new_empty(size, dtype=dtype)


def philox4x32(counter, key, *, backend=None):
    """Philox4x32-10 words of counters (..., 4) under key (k0, k1): int64 tensors of 32-bit words
    (values in [0, 2**32); checked, which reads the tensors on the host)."""
    for name, t, shape_ok in (("counter", counter, counter.dim() >= 1 and counter.shape[-1] == 4),
                              ("key", key, key.shape == (2,))):
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be an int64 tensor of 32-bit words, got {t.dtype}")
        if not shape_ok:
            raise ValueError(f"{name} must have shape {'(..., 4)' if name == 'counter' else '(2,)'}, got {tuple(t.shape)}")
        if t.numel() and bool(((t < 0) | (t > philox.MASK32)).any()):
            raise ValueError(f"{name} words must be in [0, 2**32), got values from {t.min().item()} to {t.max().item()}")
    if key.device != counter.device:
        raise ValueError(f"key is on {key.device} but counter is on {counter.device}")
    return call_op("philox4x32", backend, counter.device, counter, key)


def _fill(name, size, seed, offset, stream, segments, dtype, device, backend):
    check_floating_dtype(dtype)
    size = check_size(size)
    numel = torch.Size(size).numel()
    philox.check_segments(numel, segments)
    if device is None and stream is not None and seed is None:
        device = stream.seed.device
    seed, offset = call_stream(seed, offset, stream, device, philox.counters(numel, segments))
    return call_op(name, backend, seed.device, seed, offset, size, dtype, segments)


def uniform(size, seed=None, offset=None, *, stream=None, segments=1, dtype=torch.float32, device=None, backend=None):
    """A tensor of `size` of uniforms in [0, 1) from the stream contract.

    Noise source: explicit seed and offset (ints in [0, 2**64) or one-element int64 tensors; the
    call uses philox.counters(numel, segments) counters from offset), else a reservation from
    `stream`, else from the device's default stream. segments: how many equal segments (replicas)
    the tensor holds, each on fresh counters, so a batched call equals per-replica calls. The output
    is on the stream's device (or `device`). backend: None (the device's native kernel),
    "reference", "cpu", "cuda" or "triton".
    """
    return _fill("philox_uniform", size, seed, offset, stream, segments, dtype, device, backend)


def normal(size, seed=None, offset=None, *, stream=None, segments=1, dtype=torch.float32, device=None, backend=None):
    """Like uniform, with the contract's standard normals (Box-Muller pairs)."""
    return _fill("philox_normal", size, seed, offset, stream, segments, dtype, device, backend)
