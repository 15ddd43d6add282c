"""Triton kernels of random_spike and random_spike_backward (Random Spiking).

Forward: per-program finite min/max partials of each group, reduced on the device by amin/amax,
then the spike pass. Launched with enable_fp_fusion=False so lo + u * (hi - lo) rounds exactly as
on the CPU (no FMA)."""

import torch
import triton
import triton.language as tl

from .common import round_to

BLOCK = 1024
REDUCE_BLOCK = 4096


@triton.jit
def _group_minmax_kernel(x_ptr, lo_ptr, hi_ptr, group_size, per_group, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    g = pid // per_group
    idx = (pid % per_group) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < group_size
    x = tl.load(x_ptr + g * group_size + idx, mask=mask, other=0.0).to(tl.float32)
    finite = mask & (tl.abs(x) < float("inf"))  # false for NaN and +-inf
    tl.store(lo_ptr + pid, tl.min(tl.where(finite, x, float("inf")), axis=0))
    tl.store(hi_ptr + pid, tl.max(tl.where(finite, x, -float("inf")), axis=0))


@triton.jit
def _random_spike_kernel(x_ptr, out_ptr, lo_ptr, hi_ptr, seed_ptr, offset_ptr, n, group_size, p,
                         BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    g = idx // group_size
    lo = tl.load(lo_ptr + g, mask=mask, other=0.0)
    hi = tl.load(hi_ptr + g, mask=mask, other=0.0)
    u0, u1, _, _ = tl.rand4x(tl.load(seed_ptr), tl.load(offset_ptr) + idx)
    v = lo + u1 * (hi - lo)
    v = tl.where(v > hi, hi, v)
    tl.store(out_ptr + idx, tl.where(u0 < p, x, round_to(v, x.dtype)), mask=mask)


@triton.jit
def _random_spike_backward_kernel(grad_ptr, out_ptr, seed_ptr, offset_ptr, n, p, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < n
    g = tl.load(grad_ptr + idx, mask=mask, other=0.0)
    keep = tl.rand(tl.load(seed_ptr), tl.load(offset_ptr) + idx) < p
    tl.store(out_ptr + idx, tl.where(keep, g, tl.zeros_like(g)), mask=mask)


def group_minmax(x, groups):
    """Finite (min, max) of each of `groups` contiguous groups of contiguous x, float32 tensors."""
    group_size = x.numel() // groups
    per_group = triton.cdiv(group_size, REDUCE_BLOCK)
    lo = torch.empty(groups * per_group, dtype=torch.float32, device=x.device)
    hi = torch.empty_like(lo)
    _group_minmax_kernel[(groups * per_group,)](x, lo, hi, group_size, per_group, BLOCK=REDUCE_BLOCK)
    return lo.view(groups, per_group).amin(1), hi.view(groups, per_group).amax(1)


def random_spike(x, p, seed, offset, groups):
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        lo, hi = group_minmax(x, groups)
        _random_spike_kernel[(triton.cdiv(n, BLOCK),)](x, out, lo, hi, seed, offset, n, n // groups, p,
                                                       BLOCK=BLOCK, enable_fp_fusion=False)
    return out


def random_spike_backward(grad, p, seed, offset):
    grad = grad.contiguous()
    out = torch.empty_like(grad)
    n = grad.numel()
    if n:
        _random_spike_backward_kernel[(triton.cdiv(n, BLOCK),)](grad, out, seed, offset, n, p, BLOCK=BLOCK)
    return out
