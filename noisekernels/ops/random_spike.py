"""random_spike: Random Spiking (random-spiking.txt section 4.2) as one fused op.

Each unit is kept with probability p; otherwise it is replaced by a value drawn uniformly from
[min, max] of its group: per element, keep x if U(keep word) < p, else min + U(value word) * (max - min),
clamped to max so rounding never leaves the range (the words: (w0, w1) or (w2, w3) of a counter,
two elements per counter, ARCHITECTURE.md section 2). min/max and the spiked value are computed in
float64 for float64 x, else float32. Groups are equal contiguous slices of the logical
order: the whole batch (range="batch"), one per replica when a batch holds n replicas, or one per
sample (range="sample"). No gradient flows through a spiked unit, and none to min/max (the noise
is not differentiated). Backward recomputes the mask from (seed, offset): nothing per element is
saved.

NaN and +-inf: min/max are taken over the finite values of a group, so one NaN or inf does not
poison the noise; a NaN or inf unit stays as it is unless spiked; a group without any finite value
spikes to NaN.
"""

import math

import torch

from .. import philox
from .._extension import call_op, register_op, triton_kernel
from ._args import check_floating_tensor, check_probability, compute_dtype, stream_tensors
from ._streams import call_stream

RANGES = ("batch", "sample")


def random_spike_reference(x, p, seed, offset, groups, segments):
    if x.numel() == 0:
        return torch.empty_like(x)
    u0, u1 = philox.call_spike_uniforms(seed, offset, x.numel(), segments)
    acc = compute_dtype(x.dtype)
    stats = x.detach().reshape(groups, -1).to(acc)
    finite = stats.isfinite()
    lo = torch.where(finite, stats, math.inf).amin(1, keepdim=True)
    hi = torch.where(finite, stats, -math.inf).amax(1, keepdim=True)
    v = lo + u1.view(groups, -1).to(acc) * (hi - lo)
    v = torch.where(v > hi, hi, v)
    keep = u0.view(groups, -1) < torch.tensor(p, dtype=torch.float32, device=x.device)
    return torch.where(keep, x.reshape(groups, -1), v.to(x.dtype)).reshape(x.shape)


def random_spike_backward_reference(grad, p, seed, offset, segments):
    u0, _ = philox.call_spike_uniforms(seed, offset, grad.numel(), segments)
    keep = u0.view(grad.shape) < torch.tensor(p, dtype=torch.float32, device=grad.device)
    return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


register_op("random_spike", "random_spike(Tensor x, float p, Tensor seed, Tensor offset, int groups, int segments) -> Tensor",
            reference=random_spike_reference, triton=triton_kernel("random_spike", "random_spike"))
register_op("random_spike_backward", "random_spike_backward(Tensor grad, float p, Tensor seed, Tensor offset, "
            "int segments) -> Tensor",
            reference=random_spike_backward_reference, triton=triton_kernel("random_spike", "random_spike_backward"))


@torch.library.register_fake("noisekernels::random_spike")
def _(x, p, seed, offset, groups, segments):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("noisekernels::random_spike_backward")
def _(grad, p, seed, offset, segments):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _save_stream(ctx, inputs, output):
    """Both ops take (tensor, p, seed, offset, ..., segments): keep p, the segments and the stream,
    16 bytes in all."""
    ctx.p, ctx.segments = inputs[1], inputs[-1]
    ctx.save_for_backward(inputs[2], inputs[3])


def _spike_backward(ctx, grad):
    seed, offset = ctx.saved_tensors
    return torch.ops.noisekernels.random_spike_backward(grad, ctx.p, seed, offset, ctx.segments), None, None, None, None, None


def _spike_backward_backward(ctx, grad):
    seed, offset = ctx.saved_tensors  # the backward is linear in grad: its gradient is itself
    return torch.ops.noisekernels.random_spike_backward(grad, ctx.p, seed, offset, ctx.segments), None, None, None, None


torch.library.register_autograd("noisekernels::random_spike", _spike_backward, setup_context=_save_stream)
torch.library.register_autograd("noisekernels::random_spike_backward", _spike_backward_backward,
                                setup_context=_save_stream)


def spike_groups(x, range, replicas):
    """The number of min/max groups for a range mode over x (rows are replica-major); 1 for an
    empty x, which has no statistics to take."""
    if range not in RANGES:
        raise ValueError(f"range must be one of {RANGES}, got {range!r}")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
    if range == "sample" or replicas > 1:
        if x.dim() == 0:
            raise ValueError(f"range={range!r} with replicas={replicas} needs x with a batch dimension, got a 0-dim tensor")
        if x.shape[0] % replicas:
            raise ValueError(f"replicas={replicas} must divide x.shape[0]={x.shape[0]}")
    if x.numel() == 0:
        return 1
    return x.shape[0] if range == "sample" else replicas


def random_spike(x, p, seed=None, offset=None, *, stream=None, range="batch", replicas=1, backend=None):
    """Random Spiking of x with keep probability p.

    range: "batch" (min/max over the whole batch, or per replica when replicas > 1) or "sample".
    replicas: how many replicas x.shape[0] holds (replica-major); each replica is a segment of the
    stream contract, so a batched call equals `replicas` separate calls. Noise source: explicit
    seed and offset (reserve philox.counters(x.numel(), replicas, draws=2) counters), else a
    reservation from `stream`, else from the default stream of x's device.
    Differentiable when backend is None (the dispatcher's kernel for x's device).
    """
    check_floating_tensor(x)
    p = check_probability(p)
    groups = spike_groups(x, range, replicas)
    seed, offset = call_stream(seed, offset, stream, x.device, philox.counters(x.numel(), replicas, philox.TWO_DRAWS))
    return call_op("random_spike", backend, x.device, x, p, seed, offset, groups, replicas)


def random_spike_backward(grad, p, seed, offset, *, replicas=1, backend=None):
    """The gradient of random_spike: grad where the unit was kept, exactly 0 where it was spiked."""
    check_floating_tensor(grad, "grad")
    p = check_probability(p)
    philox.check_segments(grad.numel(), replicas, "replicas")
    seed, offset = stream_tensors(seed, offset, grad.device)
    return call_op("random_spike_backward", backend, grad.device, grad, p, seed, offset, replicas)
