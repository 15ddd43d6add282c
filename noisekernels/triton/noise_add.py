"""Triton kernels of noise_add and noise_mul (additive noise, its replicas, grad * eps). Launched
with enable_fp_fusion=False so x + scale * eps rounds as on the CPU (no FMA)."""

import torch
import triton
import triton.language as tl

from .common import noise_eps, round_to

BLOCK = 1024


@triton.jit
def _noise_add_kernel(x_ptr, scale_ptr, out_ptr, seed_ptr, offset_ptr, n, numel_x, inner, channels, lo, hi,
                      DIST: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < n
    j = idx % numel_x
    s = tl.load(scale_ptr + (j // inner) % channels, mask=mask, other=0.0)
    x = tl.load(x_ptr + j, mask=mask, other=0.0).to(s.dtype)
    eps = noise_eps(DIST, tl.load(seed_ptr), tl.load(offset_ptr) + idx)
    v = x + s * eps.to(s.dtype)
    if CLAMP:
        v = tl.where(v < lo, lo, v)
        v = tl.where(v > hi, hi, v)
    tl.store(out_ptr + idx, round_to(v, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _noise_mul_kernel(g_ptr, out_ptr, seed_ptr, offset_ptr, n, DIST: tl.constexpr, WIDE: tl.constexpr,
                      BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < n
    eps = noise_eps(DIST, tl.load(seed_ptr), tl.load(offset_ptr) + idx)
    if WIDE:
        v = tl.load(g_ptr + idx, mask=mask, other=0.0) * eps.to(tl.float64)
    else:
        v = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32) * eps
    tl.store(out_ptr + idx, round_to(v, out_ptr.dtype.element_ty), mask=mask)


def noise_add(x, scale, seed, offset, dist, inner, channels, replicas, lo, hi):
    x = x.contiguous()
    out = torch.empty((x.shape[0] * replicas, *x.shape[1:]) if replicas != 1 else x.shape, dtype=x.dtype, device=x.device)
    n = out.numel()
    if n:
        clamp = lo is not None
        _noise_add_kernel[(triton.cdiv(n, BLOCK),)](
            x, scale.contiguous(), out, seed, offset, n, x.numel(), inner, channels,
            lo if clamp else 0.0, hi if clamp else 0.0, DIST=dist, CLAMP=clamp, BLOCK=BLOCK, enable_fp_fusion=False)
    return out


def noise_mul(grad, seed, offset, dist):
    grad = grad.contiguous()
    out = torch.empty_like(grad)
    n = grad.numel()
    if n:
        _noise_mul_kernel[(triton.cdiv(n, BLOCK),)](grad, out, seed, offset, n, DIST=dist,
                                                    WIDE=grad.dtype == torch.float64, BLOCK=BLOCK, enable_fp_fusion=False)
    return out
