"""Triton kernels of random_spike and random_spike_backward (Random Spiking).

Forward: per-program finite min/max partials of each group (in float64 for float64 x, else
float32), reduced on the device by amin/amax, then the spike pass over BLOCK elements per program:
two elements per counter ((w0, w1) and (w2, w3): keep test, value), one tl.rand4x per counter for
one segment or segments of an even size (element e is then lane e % 2 of counter e // 2), else one
per element. The keep tests are packed 8 per byte (element i at bit i % 8 of byte i // 8) for
the backward, a masked copy of grad. Launched with enable_fp_fusion=False so lo + u * (hi - lo)
rounds exactly as on the CPU (no FMA)."""

import torch
import triton
import triton.language as tl

from .common import round_to

BLOCK = 1024  # elements per program: a multiple of 8, so programs own whole bytes of the mask
REDUCE_BLOCK = 4096


@triton.jit
def _group_minmax_kernel(x_ptr, lo_ptr, hi_ptr, group_size, per_group, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    g = pid // per_group
    idx = (pid % per_group) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < group_size
    x = tl.load(x_ptr + g * group_size + idx, mask=mask, other=0.0).to(lo_ptr.dtype.element_ty)
    finite = mask & (tl.abs(x) < float("inf"))  # false for NaN and +-inf
    tl.store(lo_ptr + pid, tl.min(tl.where(finite, x, float("inf")), axis=0))
    tl.store(hi_ptr + pid, tl.max(tl.where(finite, x, -float("inf")), axis=0))


@triton.jit
def _random_spike_kernel(x_ptr, out_ptr, mask_ptr, lo_ptr, hi_ptr, seed_ptr, offset_ptr, n, size, per_segment,
                         group_size, p, BLOCK: tl.constexpr, PAIRED: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    e = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    seed, offset = tl.load(seed_ptr), tl.load(offset_ptr)
    if PAIRED:  # elements 2c and 2c + 1 share counter c
        c = pid * (BLOCK // 2) + tl.arange(0, BLOCK // 2).to(tl.int64)
        u0, u1, u2, u3 = tl.rand4x(seed, offset + c)
        keep_u, value_u = tl.interleave(u0, u2), tl.interleave(u1, u3)
    else:  # element j of segment k: lanes (w0, w1) or (w2, w3) of counter k * per_segment + j // 2
        k = e // size
        j = e - k * size
        u0, u1, u2, u3 = tl.rand4x(seed, offset + k * per_segment + j // 2)
        odd = (j % 2) == 1
        keep_u, value_u = tl.where(odd, u2, u0), tl.where(odd, u3, u1)
    live = e < n
    x = tl.load(x_ptr + e, mask=live, other=0.0)
    g = e // group_size
    lo = tl.load(lo_ptr + g, mask=live, other=0.0)
    hi = tl.load(hi_ptr + g, mask=live, other=0.0)
    u = value_u.to(lo.dtype)
    d = hi - lo
    wide = tl.abs(d) == float("inf")  # a range wider than the dtype's largest value
    v = tl.where(wide, (lo - u * lo) + u * hi, lo + u * d)
    v = tl.where(v > hi, hi, v)
    keep = live & (keep_u < p)
    tl.store(out_ptr + e, tl.where(keep, x, round_to(v, x.dtype)), mask=live)
    bits = tl.reshape(keep.to(tl.int32), (BLOCK // 8, 8)) << tl.arange(0, 8)[None, :]
    b = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8).to(tl.int64)
    tl.store(mask_ptr + b, tl.sum(bits, axis=1).to(tl.uint8), mask=b * 8 < n)


@triton.jit
def _random_spike_backward_kernel(grad_ptr, mask_ptr, out_ptr, n, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    live = e < n
    bits = tl.load(mask_ptr + e // 8, mask=live, other=0).to(tl.int32)
    keep = ((bits >> (e % 8).to(tl.int32)) & 1) != 0
    g = tl.load(grad_ptr + e, mask=live, other=0.0)
    tl.store(out_ptr + e, tl.where(keep, g, tl.zeros_like(g)), mask=live)


def group_minmax(x, groups):
    """Finite (min, max) of each of `groups` contiguous groups of contiguous x, in its compute
    dtype (float64 for float64 x, else float32)."""
    group_size = x.numel() // groups
    per_group = triton.cdiv(group_size, REDUCE_BLOCK)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    lo = torch.empty(groups * per_group, dtype=acc, device=x.device)
    hi = torch.empty_like(lo)
    _group_minmax_kernel[(groups * per_group,)](x, lo, hi, group_size, per_group, BLOCK=REDUCE_BLOCK)
    return lo.view(groups, per_group).amin(1), hi.view(groups, per_group).amax(1)


def random_spike(x, p, seed, offset, groups, segments):
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    mask = torch.empty(triton.cdiv(n, 8), dtype=torch.uint8, device=x.device)
    if n:
        lo, hi = group_minmax(x, groups)
        size = n // segments
        paired = segments == 1 or size % 2 == 0
        _random_spike_kernel[(triton.cdiv(n, BLOCK),)](x, out, mask, lo, hi, seed, offset, n, size, triton.cdiv(size, 2),
                                                       n // groups, p, BLOCK=BLOCK, PAIRED=paired,
                                                       enable_fp_fusion=False)
    return out, mask


def random_spike_backward(grad, mask):
    grad = grad.contiguous()
    out = torch.empty_like(grad)
    n = grad.numel()
    if n:
        _random_spike_backward_kernel[(triton.cdiv(n, BLOCK),)](grad, mask.contiguous(), out, n, BLOCK=BLOCK)
    return out
