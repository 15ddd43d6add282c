"""replica_reduce: the MC-ensemble reductions over the replica axis of (n, B, C) logits.

"mean" (the papers' "MC Avg"): the mean over replicas of the softmax probabilities.
"vote" ("Voting"): how many replicas predict each class, each replica's prediction being its
argmax with ties to the smaller class index, a NaN logit counting as -inf (it never wins; a row
of NaNs votes for no class, so a row's counts may sum to less than n); argmax of the counts again
breaks ties to the smaller index. "mean" of
a row holding a NaN is NaN. Output (B, C), float64 for float64 logits, else float32. Not differentiable (a decision).
"""

import torch

from .._extension import call_op, register_op, triton_kernel
from ._args import check_floating_tensor

MODES = {"mean": 0, "vote": 1}


def replica_reduce_reference(logits, mode):
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(out_dtype)
    if x.numel() == 0:
        return x.new_zeros(x.shape[1:])
    if mode == 0:  # per-replica softmax in the output dtype, their mean in float64 (exact at any n)
        return torch.softmax(x, dim=-1).to(torch.float64).mean(0).to(out_dtype)
    voted = ~x.isnan().all(-1)  # a replica of all-NaN logits votes for no class
    x = torch.where(x.isnan(), -torch.inf, x)
    votes = torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1])  # argmax: first (smallest) index of a tie
    return (votes * voted[..., None]).sum(0).to(out_dtype)


register_op("replica_reduce", "replica_reduce(Tensor logits, int mode) -> Tensor",
            reference=replica_reduce_reference, triton=triton_kernel("replica_reduce", "replica_reduce"))


@torch.library.register_fake("noisekernels::replica_reduce")
def _(logits, mode):
    return logits.new_empty(logits.shape[1:], dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)


def replica_reduce(logits, reduce="mean", *, backend=None):
    """(n, B, C) logits -> (B, C): mean softmax ("mean") or vote counts ("vote")."""
    check_floating_tensor(logits, "logits")
    if reduce not in MODES:
        raise ValueError(f"reduce must be one of {tuple(MODES)}, got {reduce!r}")
    if logits.dim() != 3 or logits.shape[0] < 1:
        raise ValueError(f"logits must have shape (n, B, C) with n >= 1, got {tuple(logits.shape)}")
    return call_op("replica_reduce", backend, logits.device, logits, MODES[reduce])
