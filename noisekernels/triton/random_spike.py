"""Triton kernels of random_spike and random_spike_backward (Random Spiking).

Forward: per-program finite min/max partials of each group (in float64 for float64 x, else
float32), reduced on the device by amin/amax, then the spike pass: one tl.rand4x per counter, two
elements per counter ((w0, w1) and (w2, w3): keep test, value). Launched with
enable_fp_fusion=False so lo + u * (hi - lo) rounds exactly as on the CPU (no FMA)."""

import torch
import triton
import triton.language as tl

from .common import round_to, segment_elements

BLOCK = 512  # counters per program
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
def _spike_one(x_ptr, out_ptr, lo_ptr, hi_ptr, e, live, group_size, keep_u, value_u, p):
    x = tl.load(x_ptr + e, mask=live, other=0.0)
    g = e // group_size
    lo = tl.load(lo_ptr + g, mask=live, other=0.0)
    hi = tl.load(hi_ptr + g, mask=live, other=0.0)
    v = lo + value_u.to(lo.dtype) * (hi - lo)
    v = tl.where(v > hi, hi, v)
    tl.store(out_ptr + e, tl.where(keep_u < p, x, round_to(v, x.dtype)), mask=live)


@triton.jit
def _random_spike_kernel(x_ptr, out_ptr, lo_ptr, hi_ptr, seed_ptr, offset_ptr, total, size, per_segment,
                         group_size, p, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    live = c < total
    first, j = segment_elements(c, size, per_segment, 2)
    u0, u1, u2, u3 = tl.rand4x(tl.load(seed_ptr), tl.load(offset_ptr) + c)
    _spike_one(x_ptr, out_ptr, lo_ptr, hi_ptr, first, live & (j < size), group_size, u0, u1, p)
    _spike_one(x_ptr, out_ptr, lo_ptr, hi_ptr, first + 1, live & (j + 1 < size), group_size, u2, u3, p)


@triton.jit
def _mask_one(grad_ptr, out_ptr, e, live, keep):
    g = tl.load(grad_ptr + e, mask=live, other=0.0)
    tl.store(out_ptr + e, tl.where(keep, g, tl.zeros_like(g)), mask=live)


@triton.jit
def _random_spike_backward_kernel(grad_ptr, out_ptr, seed_ptr, offset_ptr, total, size, per_segment, p,
                                  BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    live = c < total
    first, j = segment_elements(c, size, per_segment, 2)
    u0, _, u2, _ = tl.rand4x(tl.load(seed_ptr), tl.load(offset_ptr) + c)
    _mask_one(grad_ptr, out_ptr, first, live & (j < size), u0 < p)
    _mask_one(grad_ptr, out_ptr, first + 1, live & (j + 1 < size), u2 < p)


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


def _geometry(n, segments):
    size = n // segments
    per_segment = triton.cdiv(size, 2)
    return size, per_segment, segments * per_segment


def random_spike(x, p, seed, offset, groups, segments):
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        lo, hi = group_minmax(x, groups)
        size, per_segment, total = _geometry(n, segments)
        _random_spike_kernel[(triton.cdiv(total, BLOCK),)](x, out, lo, hi, seed, offset, total, size, per_segment,
                                                           n // groups, p, BLOCK=BLOCK, enable_fp_fusion=False)
    return out


def random_spike_backward(grad, p, seed, offset, segments):
    grad = grad.contiguous()
    out = torch.empty_like(grad)
    n = grad.numel()
    if n:
        size, per_segment, total = _geometry(n, segments)
        _random_spike_backward_kernel[(triton.cdiv(total, BLOCK),)](grad, out, seed, offset, total, size, per_segment,
                                                                    p, BLOCK=BLOCK)
    return out
