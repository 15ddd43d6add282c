"""Triton kernels of philox4x32, philox_uniform and philox_normal: Triton's own Philox
(tl.philox, tl.rand4x, tl.randn4x) with int64 counters, which is the stream contract by
definition. One program step per counter, four elements per counter."""

import torch
import triton
import triton.language as tl

from .common import segment_elements, store_float

BLOCK = 512  # counters per program


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
def _philox_fill_kernel(out_ptr, seed_ptr, offset_ptr, total, size, per_segment, NORMAL: tl.constexpr,
                        BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    live = c < total
    first, j = segment_elements(c, size, per_segment, 4)
    counter = tl.load(offset_ptr) + c
    if NORMAL:
        v0, v1, v2, v3 = tl.randn4x(tl.load(seed_ptr), counter)
    else:
        v0, v1, v2, v3 = tl.rand4x(tl.load(seed_ptr), counter)
    store_float(out_ptr + first, v0, live & (j < size))
    store_float(out_ptr + first + 1, v1, live & (j + 1 < size))
    store_float(out_ptr + first + 2, v2, live & (j + 2 < size))
    store_float(out_ptr + first + 3, v3, live & (j + 3 < size))


def philox4x32(counter, key):
    counter = counter.contiguous()
    out = torch.empty_like(counter)
    n = counter.numel() // 4
    if n:
        _philox4x32_kernel[(triton.cdiv(n, BLOCK),)](out, counter, key.contiguous(), n, BLOCK=BLOCK)
    return out


def _fill(seed, offset, size, dtype, segments, normal):
    out = torch.empty(size, dtype=dtype, device=seed.device)
    n = out.numel()
    if n:
        per_segment = triton.cdiv(n // segments, 4)
        total = segments * per_segment
        _philox_fill_kernel[(triton.cdiv(total, BLOCK),)](out, seed, offset, total, n // segments, per_segment,
                                                          NORMAL=normal, BLOCK=BLOCK)
    return out


def philox_uniform(seed, offset, size, dtype, segments):
    return _fill(seed, offset, size, dtype, segments, normal=False)


def philox_normal(seed, offset, size, dtype, segments):
    return _fill(seed, offset, size, dtype, segments, normal=True)
