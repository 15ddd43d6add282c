"""Triton kernels of philox4x32, philox_uniform and philox_normal: Triton's own Philox
(tl.philox, tl.rand, tl.randn) with int64 counters, which is the stream contract by definition."""

import torch
import triton
import triton.language as tl

from .common import store_float

BLOCK = 1024


@triton.jit
def _philox4x32_kernel(out_ptr, counter_ptr, key_ptr, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < n
    seed = tl.load(key_ptr) | (tl.load(key_ptr + 1) << 32)
    c = [tl.load(counter_ptr + 4 * idx + j, mask=mask, other=0).to(tl.uint32) for j in tl.static_range(4)]
    w0, w1, w2, w3 = tl.philox(seed, c[0], c[1], c[2], c[3])
    tl.store(out_ptr + 4 * idx, w0.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * idx + 1, w1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * idx + 2, w2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * idx + 3, w3.to(tl.int64), mask=mask)


@triton.jit
def _philox_fill_kernel(out_ptr, seed_ptr, offset_ptr, n, NORMAL: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    counter = tl.load(offset_ptr) + idx
    if NORMAL:
        v = tl.randn(tl.load(seed_ptr), counter)
    else:
        v = tl.rand(tl.load(seed_ptr), counter)
    store_float(out_ptr + idx, v, idx < n)


def philox4x32(counter, key):
    counter = counter.contiguous()
    out = torch.empty_like(counter)
    n = counter.numel() // 4
    if n:
        _philox4x32_kernel[(triton.cdiv(n, BLOCK),)](out, counter, key.contiguous(), n, BLOCK=BLOCK)
    return out


def _fill(seed, offset, size, dtype, normal):
    out = torch.empty(size, dtype=dtype, device=seed.device)
    n = out.numel()
    if n:
        _philox_fill_kernel[(triton.cdiv(n, BLOCK),)](out, seed, offset, n, NORMAL=normal, BLOCK=BLOCK)
    return out


def philox_uniform(seed, offset, size, dtype):
    return _fill(seed, offset, size, dtype, normal=False)


def philox_normal(seed, offset, size, dtype):
    return _fill(seed, offset, size, dtype, normal=True)
