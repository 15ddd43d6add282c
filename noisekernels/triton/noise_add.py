"""Triton kernels of noise_add, noise_mul and noise_mul_sum (additive noise, its replicas, grad * eps
and its sum per scale entry): one counter per program step, four elements per counter. Launched with enable_fp_fusion=False so
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


@triton.jit
def _mul_sum_one(g_ptr, i, live, eps, WIDE: tl.constexpr):
    if WIDE:
        return tl.load(g_ptr + i, mask=live, other=0.0).to(tl.float64) * eps.to(tl.float64)
    else:
        return tl.load(g_ptr + i, mask=live, other=0.0).to(tl.float32) * eps


@triton.jit
def _noise_mul_sum_kernel(g_ptr, sums_ptr, seed_ptr, offset_ptr, size, per_segment, inner, parts, piece,
                          DIST: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """sums[q] = sum(grad * eps) over piece q: part q % parts (`piece` elements) of run q // parts
    (`inner` consecutive elements of one scale entry), over the counters that hold its elements."""
    q = tl.program_id(0).to(tl.int64)
    u = q // parts
    begin = u * inner + (q - u * parts) * piece
    end = tl.minimum(begin + piece, (u + 1) * inner)
    k0, k1 = begin // size, (end - 1) // size
    first_counter = k0 * per_segment + (begin - k0 * size) // 4
    last_counter = k1 * per_segment + (end - 1 - k1 * size) // 4
    seed, offset = tl.load(seed_ptr), tl.load(offset_ptr)
    total = tl.zeros([BLOCK], dtype=tl.float64 if WIDE else tl.float32)
    for c0 in range(first_counter, last_counter + 1, BLOCK):
        c = c0 + tl.arange(0, BLOCK).to(tl.int64)
        live = c <= last_counter
        first, j = segment_elements(c, size, per_segment, 4)
        e0, e1, e2, e3 = noise_eps4(DIST, seed, offset + c)
        total += _mul_sum_one(g_ptr, first, live & (j < size) & (first >= begin) & (first < end), e0, WIDE)
        total += _mul_sum_one(g_ptr, first + 1, live & (j + 1 < size) & (first + 1 >= begin) & (first + 1 < end), e1,
                              WIDE)
        total += _mul_sum_one(g_ptr, first + 2, live & (j + 2 < size) & (first + 2 >= begin) & (first + 2 < end), e2,
                              WIDE)
        total += _mul_sum_one(g_ptr, first + 3, live & (j + 3 < size) & (first + 3 >= begin) & (first + 3 < end), e3,
                              WIDE)
    tl.store(sums_ptr + q, tl.sum(total, axis=0))


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


PIECE = 16 * BLOCK  # elements per noise_mul_sum program at most


def noise_mul_sum(grad, seed, offset, dist, inner, channels, segments):
    grad = grad.contiguous()
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    n = grad.numel()
    if n == 0:
        return torch.zeros(channels, dtype=acc, device=grad.device)
    if channels == 1:
        inner = n  # one entry: all elements are one run
    runs, parts = n // inner, triton.cdiv(inner, PIECE)
    size, per_segment, _ = _geometry(n, segments)
    sums = torch.empty(runs * parts, dtype=acc, device=grad.device)
    _noise_mul_sum_kernel[(runs * parts,)](grad, sums, seed, offset, size, per_segment, inner, parts, min(inner, PIECE),
                                           DIST=dist, WIDE=acc == torch.float64, BLOCK=BLOCK, enable_fp_fusion=False)
    # Pieces in order: run u = r * channels + c is entry c's.
    return sums.view(runs // channels, channels, parts).sum((0, 2))
