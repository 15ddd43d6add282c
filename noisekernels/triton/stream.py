"""Triton kernel of offset_reserve (a Stream reservation): one atomic add on the offset returns its
old value, so reservations made on different CUDA streams never overlap."""

import torch
import triton
import triton.language as tl

from ..stream import _refuse_in_backward


@triton.jit
def _offset_reserve_kernel(offset_ptr, start_ptr, n):
    # Offsets wrap modulo 2**64 (the counter space), as the int64 add of the traced path does.
    tl.store(start_ptr, tl.atomic_add(offset_ptr, n))


def offset_reserve(offset, n):
    _refuse_in_backward()
    if n < 0:
        raise RuntimeError(f"offset_reserve: n must be non-negative, got {n}")
    start = torch.empty_like(offset)
    _offset_reserve_kernel[(1,)](offset, start, n)
    torch.autograd.graph.increment_version(offset)  # changed in place, as an add_ would
    return start
