"""Triton kernel of replica_reduce: one program per sample, the classes in one block, a loop over
replicas, accumulated in float64 (a float32 sum drifts at large n)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _replica_reduce_kernel(logits_ptr, out_ptr, n, b, c, VOTE: tl.constexpr, BLOCK_C: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_C)
    mask = k < c
    acc = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for r in range(n):
        x = tl.load(logits_ptr + (r * b + i) * c + k, mask=mask, other=-float("inf")).to(out_ptr.dtype.element_ty)
        if VOTE:
            voted = tl.max(((x == x) & mask).to(tl.int32), axis=0)  # a replica of all-NaN logits votes for none
            x = tl.where(x != x, -float("inf"), x)  # NaN never wins
        top = tl.max(x, axis=0)
        if VOTE:
            best = tl.min(tl.where(x == top, k, BLOCK_C), axis=0)  # ties to the smaller index
            acc += ((k == best) & (voted > 0)).to(tl.float64)
        else:
            e = tl.exp(x - top)
            acc += (e / tl.sum(e, axis=0)).to(tl.float64)
    if not VOTE:
        acc = acc / n
    tl.store(out_ptr + i * c + k, acc.to(out_ptr.dtype.element_ty), mask=mask)


def replica_reduce(logits, mode):
    logits = logits.contiguous()
    n, b, c = logits.shape
    out = torch.empty((b, c), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32, device=logits.device)
    if b and c:
        _replica_reduce_kernel[(b,)](logits, out, n, b, c, VOTE=mode == 1, BLOCK_C=triton.next_power_of_2(c))
    return out
