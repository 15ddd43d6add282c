"""Triton kernel of noise_add_foreach: one launch over a list of tensors. A block table gives each
program its tensor and its first counter; the tensor's data pointers come from int64 tables (as in
Triton's grouped GEMM). Each tensor is one flat segment: counter c holds its elements 4c .. 4c+3."""

import torch
import triton
import triton.language as tl

from .common import noise_eps4, round_to

BLOCK = 256  # counters per program
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16}


@triton.jit
def _add_one(x_ptr, out_ptr, i, live, s, eps, DTYPE: tl.constexpr):
    x = tl.load(x_ptr + i, mask=live, other=0.0).to(s.dtype)
    tl.store(out_ptr + i, round_to(x + s * eps.to(s.dtype), DTYPE), mask=live)


@triton.jit
def _noise_add_foreach_kernel(block_tensor_ptr, block_start_ptr, in_ptrs, out_ptrs, numels_ptr, starts_ptr,
                              scales_ptr, seed_ptr, offset_ptr, DIST: tl.constexpr, DTYPE: tl.constexpr,
                              BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    k = tl.load(block_tensor_ptr + pid)
    c = tl.load(block_start_ptr + pid) + tl.arange(0, BLOCK).to(tl.int64)
    numel = tl.load(numels_ptr + k)
    x_ptr = tl.load(in_ptrs + k).to(tl.pointer_type(DTYPE))
    out_ptr = tl.load(out_ptrs + k).to(tl.pointer_type(DTYPE))
    s = tl.load(scales_ptr + k)
    e0, e1, e2, e3 = noise_eps4(DIST, tl.load(seed_ptr), tl.load(offset_ptr) + tl.load(starts_ptr + k) + c)
    i = 4 * c
    _add_one(x_ptr, out_ptr, i, i < numel, s, e0, DTYPE)
    _add_one(x_ptr, out_ptr, i + 1, i + 1 < numel, s, e1, DTYPE)
    _add_one(x_ptr, out_ptr, i + 2, i + 2 < numel, s, e2, DTYPE)
    _add_one(x_ptr, out_ptr, i + 3, i + 3 < numel, s, e3, DTYPE)


def noise_add_foreach(xs, scales, seed, offset, starts, dist):
    inputs = [x.contiguous() for x in xs]
    outputs = [torch.empty_like(x) for x in inputs]
    blocks = [(k, b) for k, x in enumerate(inputs) for b in range(0, triton.cdiv(x.numel(), 4), BLOCK)]
    if not blocks:
        return outputs
    device = seed.device

    def table(values):
        return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)

    _noise_add_foreach_kernel[(len(blocks),)](
        table([k for k, _ in blocks]), table([b for _, b in blocks]),
        table([x.data_ptr() for x in inputs]), table([o.data_ptr() for o in outputs]),
        table([x.numel() for x in inputs]), table(list(starts)), scales.contiguous(), seed, offset,
        DIST=dist, DTYPE=_TL_DTYPES[inputs[0].dtype], BLOCK=BLOCK, enable_fp_fusion=False)
    return outputs
