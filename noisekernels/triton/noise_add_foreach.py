"""Triton kernel of noise_add_foreach: one launch over a list of tensors. A block table gives each
program its tensor and block; the tensor's data pointers come from int64 tables (as in Triton's
grouped GEMM)."""

import torch
import triton
import triton.language as tl

from .common import noise_eps, round_to

BLOCK = 1024
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16}


@triton.jit
def _noise_add_foreach_kernel(block_tensor_ptr, block_start_ptr, in_ptrs, out_ptrs, numels_ptr, starts_ptr,
                              scales_ptr, seed_ptr, offset_ptr, DIST: tl.constexpr, DTYPE: tl.constexpr,
                              BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    k = tl.load(block_tensor_ptr + pid)
    idx = tl.load(block_start_ptr + pid) + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < tl.load(numels_ptr + k)
    x_ptr = tl.load(in_ptrs + k).to(tl.pointer_type(DTYPE))
    out_ptr = tl.load(out_ptrs + k).to(tl.pointer_type(DTYPE))
    s = tl.load(scales_ptr + k)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(s.dtype)
    eps = noise_eps(DIST, tl.load(seed_ptr), tl.load(offset_ptr) + tl.load(starts_ptr + k) + idx)
    tl.store(out_ptr + idx, round_to(x + s * eps.to(s.dtype), DTYPE), mask=mask)


def noise_add_foreach(xs, scales, seed, offset, starts, dist):
    inputs = [x.contiguous() for x in xs]
    outputs = [torch.empty_like(x) for x in inputs]
    blocks = [(k, b) for k, x in enumerate(inputs) for b in range(0, x.numel(), BLOCK)]
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
