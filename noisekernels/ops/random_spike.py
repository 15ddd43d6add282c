"""random_spike: Random Spiking (random-spiking.txt section 4.2) as one fused op.

Each unit is kept with probability p; otherwise it is replaced by a value drawn uniformly from
[min, max] of its group: per element, keep x if U(keep word) < p, else min + U(value word) * (max - min),
clamped to max so rounding never leaves the range; where max - min overflows, (min - u * min) +
u * max instead (the words: (w0, w1) or (w2, w3) of a counter,
two elements per counter, ARCHITECTURE.md section 2). min/max and the spiked value are computed in
float64 for float64 x, else float32. Groups are equal contiguous slices of the logical
order: the whole batch (range="batch"), one per replica when a batch holds n replicas, or one per
sample (range="sample"). No gradient flows through a spiked unit, and none to min/max (the noise
is not differentiated).

The forward also returns the keep mask packed 8 units per byte (uint8, ceil(n / 8) bytes: unit i of
the flat order at bit i % 8 of byte i // 8, on every backend), and the backward is a masked copy of
grad under it: 0.125 bytes saved per element (eager code saves a bool mask, 1 byte) instead of a
second pass of the generator to recompute the mask.

NaN and +-inf: min/max are taken over the finite values of a group, so one NaN or inf does not
poison the noise; a NaN or inf unit stays as it is unless spiked; a group without any finite value
spikes to NaN.
"""

import math

import torch

from .. import philox
from .._extension import call_op, register_autograd, register_op, triton_kernel
from ._args import check_floating_tensor, check_probability, compute_dtype
from ._streams import call_stream

RANGES = ("batch", "sample")


def pack_mask(keep):
    """A bool tensor as the packed mask: element i of its flat order at bit i % 8 of byte i // 8."""
    flat = keep.reshape(-1)
    n = flat.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=keep.device)
    padded[:n] = flat
    shifts = torch.arange(8, dtype=torch.uint8, device=keep.device)
    return (padded.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)


def unpack_mask(mask, shape):
    """The bool tensor of `shape` that pack_mask packed into mask."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    bits = (mask.view(-1, 1) >> shifts) & 1
    return bits.view(-1)[:math.prod(shape)].view(shape).bool()


def random_spike_reference(x, p, seed, offset, groups, segments):
    if x.numel() == 0:
        return torch.empty_like(x), torch.empty(0, dtype=torch.uint8, device=x.device)
    u0, u1 = philox.call_spike_uniforms(seed, offset, x.numel(), segments)
    acc = compute_dtype(x.dtype)
    stats = x.detach().reshape(groups, -1).to(acc)
    finite = stats.isfinite()
    lo = torch.where(finite, stats, math.inf).amin(1, keepdim=True)
    hi = torch.where(finite, stats, -math.inf).amax(1, keepdim=True)
    u = u1.view(groups, -1).to(acc)
    d = hi - lo
    # A range wider than the dtype's largest value (d = inf) interpolates without forming d.
    v = torch.where(d.isfinite(), lo + u * d, (lo - u * lo) + u * hi)
    v = torch.where(v > hi, hi, v)
    keep = u0.view(groups, -1) < torch.tensor(p, dtype=torch.float32, device=x.device)
    return torch.where(keep, x.reshape(groups, -1), v.to(x.dtype)).reshape(x.shape), pack_mask(keep)


def random_spike_backward_reference(grad, mask):
    keep = unpack_mask(mask, grad.shape)
    return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


register_op("random_spike", "random_spike(Tensor x, float p, Tensor seed, Tensor offset, int groups, int segments) "
            "-> (Tensor, Tensor)",
            reference=random_spike_reference, triton=triton_kernel("random_spike", "random_spike"), noise=True)
register_op("random_spike_backward", "random_spike_backward(Tensor grad, Tensor mask) -> Tensor",
            reference=random_spike_backward_reference, triton=triton_kernel("random_spike", "random_spike_backward"))


def _mask_like(x):
    return x.new_empty((x.numel() + 7) // 8, dtype=torch.uint8)


@torch.library.register_fake("noisekernels::random_spike")
def _(x, p, seed, offset, groups, segments):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _mask_like(x)


@torch.library.register_fake("noisekernels::random_spike_backward")
def _(grad, mask):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _save_output_mask(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _save_input_mask(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _masked(ctx, grad):
    (mask,) = ctx.saved_tensors
    return call_op("random_spike_backward", ctx.backend, grad.device, grad, mask)


def _spike_backward(ctx, grad, _mask_grad):  # the mask (uint8) has no gradient
    return _masked(ctx, grad), None, None, None, None, None


def _spike_backward_backward(ctx, grad):
    return _masked(ctx, grad), None  # the backward is linear in grad: its gradient is itself


register_autograd("random_spike", _spike_backward, setup_context=_save_output_mask)
register_autograd("random_spike_backward", _spike_backward_backward, setup_context=_save_input_mask)


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


def random_spike(x, keep, seed=None, offset=None, *, stream=None, range="batch", replicas=1, backend=None,
                 return_mask=False):
    """Random Spiking of x: each unit is kept with probability `keep` (the opposite of dropout's p),
    else replaced by a value uniform in its group's finite [min, max].

    range: "batch" (min/max over the whole batch, or per replica when replicas > 1) or "sample".
    replicas: how many replicas x.shape[0] holds (replica-major); each replica is a segment of the
    stream contract, so a batched call equals `replicas` separate calls. Noise source: explicit
    seed and offset (reserve philox.counters(x.numel(), replicas, draws=2) counters), else a
    reservation from `stream`, else from the default stream of x's device.
    return_mask: also return the packed keep mask (unpack_mask(mask, x.shape) is True where x was
    kept), the mask random_spike_backward takes.
    Differentiable when backend is None (the dispatcher's kernel for x's device).
    """
    check_floating_tensor(x)
    p = check_probability(keep, "keep")
    if not isinstance(return_mask, bool):
        raise TypeError(f"return_mask must be a bool, got {type(return_mask).__name__}")
    groups = spike_groups(x, range, replicas)
    seed, offset = call_stream(seed, offset, stream, x.device, philox.counters(x.numel(), replicas, philox.TWO_DRAWS))
    out, mask = call_op("random_spike", backend, x.device, x, p, seed, offset, groups, replicas)
    return (out, mask) if return_mask else out


def random_spike_backward(grad, mask, *, backend=None):
    """The gradient of random_spike: grad where the unit was kept (its bit in the forward's packed
    mask is set), exactly 0 where it was spiked."""
    check_floating_tensor(grad, "grad")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.uint8:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a uint8 tensor (random_spike's packed mask), got {got}")
    if mask.shape != (-(-grad.numel() // 8),):
        raise ValueError(f"mask must have shape ({-(-grad.numel() // 8)},) (one bit per element of grad, "
                         f"{grad.numel()} elements), got {tuple(mask.shape)}")
    if mask.device != grad.device:
        raise ValueError(f"mask must be on grad's device {grad.device}, got {mask.device}")
    return call_op("random_spike_backward", backend, grad.device, grad, mask)
