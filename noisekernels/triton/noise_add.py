"""Triton kernels of noise_add and noise_mul (additive noise, its replicas, grad * eps): one
counter per program step, four elements per counter. Launched with enable_fp_fusion=False so
x + scale * eps rounds as on the CPU (no FMA)."""

import torch
import triton
import triton.language as tl

from .common import noise_eps4, round_to, segment_elements

BLOCK = 256  # counters per program


@triton.jit
def _add_one(x_ptr, scale_ptr, out_ptr, i, live, eps, numel_x, inner, channels, lo, hi, CLAMP: tl.constexpr):
    j = i % numel_x
    s = tl.load(scale_ptr + (j // inner) % channels, mask=live, other=0.0)
    x = tl.load(x_ptr + j, mask=live, other=0.0).to(s.dtype)
    v = x + s * eps.to(s.dtype)
    if CLAMP:
        v = tl.where(v < lo, lo, v)
        v = tl.where(v > hi, hi, v)
    tl.store(out_ptr + i, round_to(v, out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _noise_add_kernel(x_ptr, scale_ptr, out_ptr, seed_ptr, offset_ptr, total, size, per_segment, numel_x, inner,
                      channels, lo, hi, DIST: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    live = c < total
    first, j = segment_elements(c, size, per_segment, 4)
    e0, e1, e2, e3 = noise_eps4(DIST, tl.load(seed_ptr), tl.load(offset_ptr) + c)
    _add_one(x_ptr, scale_ptr, out_ptr, first, live & (j < size), e0, numel_x, inner, channels, lo, hi, CLAMP)
    _add_one(x_ptr, scale_ptr, out_ptr, first + 1, live & (j + 1 < size), e1, numel_x, inner, channels, lo, hi, CLAMP)
    _add_one(x_ptr, scale_ptr, out_ptr, first + 2, live & (j + 2 < size), e2, numel_x, inner, channels, lo, hi, CLAMP)
    _add_one(x_ptr, scale_ptr, out_ptr, first + 3, live & (j + 3 < size), e3, numel_x, inner, channels, lo, hi, CLAMP)


@triton.jit
def _mul_one(g_ptr, out_ptr, i, live, eps, WIDE: tl.constexpr):
    if WIDE:
        v = tl.load(g_ptr + i, mask=live, other=0.0) * eps.to(tl.float64)
    else:
        v = tl.load(g_ptr + i, mask=live, other=0.0).to(tl.float32) * eps
    tl.store(out_ptr + i, round_to(v, out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _noise_mul_kernel(g_ptr, out_ptr, seed_ptr, offset_ptr, total, size, per_segment, DIST: tl.constexpr,
                      WIDE: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    live = c < total
    first, j = segment_elements(c, size, per_segment, 4)
    e0, e1, e2, e3 = noise_eps4(DIST, tl.load(seed_ptr), tl.load(offset_ptr) + c)
    _mul_one(g_ptr, out_ptr, first, live & (j < size), e0, WIDE)
    _mul_one(g_ptr, out_ptr, first + 1, live & (j + 1 < size), e1, WIDE)
    _mul_one(g_ptr, out_ptr, first + 2, live & (j + 2 < size), e2, WIDE)
    _mul_one(g_ptr, out_ptr, first + 3, live & (j + 3 < size), e3, WIDE)


def _geometry(n, segments):
    size = n // segments
    per_segment = triton.cdiv(size, 4)
    return size, per_segment, segments * per_segment


def noise_add(x, scale, seed, offset, dist, inner, channels, replicas, lo, hi, segments):
    x = x.contiguous()
    out = torch.empty((x.shape[0] * replicas, *x.shape[1:]) if replicas != 1 else x.shape, dtype=x.dtype, device=x.device)
    n = out.numel()
    if n:
        clamp = lo is not None
        size, per_segment, total = _geometry(n, segments)
        _noise_add_kernel[(triton.cdiv(total, BLOCK),)](
            x, scale.contiguous(), out, seed, offset, total, size, per_segment, x.numel(), inner, channels,
            lo if clamp else 0.0, hi if clamp else 0.0, DIST=dist, CLAMP=clamp, BLOCK=BLOCK, enable_fp_fusion=False)
    return out


def noise_mul(grad, seed, offset, dist, segments):
    grad = grad.contiguous()
    out = torch.empty_like(grad)
    n = grad.numel()
    if n:
        size, per_segment, total = _geometry(n, segments)
        _noise_mul_kernel[(triton.cdiv(total, BLOCK),)](grad, out, seed, offset, total, size, per_segment, DIST=dist,
                                                        WIDE=grad.dtype == torch.float64, BLOCK=BLOCK,
                                                        enable_fp_fusion=False)
    return out
