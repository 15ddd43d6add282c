"""noise_add_foreach: noise_add over a list of tensors (all weights of a model for weight noise, or
several activations) in one launch per device and dtype, like torch._foreach.

Tensor k is x_k + scale_k * eps, one flat segment on counters from offset + start_k, start_k the
counters the tensors before it reserve (philox.counters of each), so the result equals a loop of
noise_add calls on consecutive reservations bit for bit. The call reserves the sum of those. Differentiable in xs (identity) and in a
tensor of scales (sum(grad_k * eps_k), eps regenerated)."""

import torch

from .. import philox
from .._extension import call_op, register_autograd, register_op, triton_kernel
from ._args import check_floating_tensor, compute_dtype, stream_tensors
from ._streams import call_stream
from .noise_add import check_dist, check_scale_value, noise_add_reference


def noise_add_foreach_reference(xs, scales, seed, offset, starts, dist):
    return [noise_add_reference(x, scales[k:k + 1], seed, offset + starts[k], dist, 1, 1, 1, None, None, 1)
            for k, x in enumerate(xs)]


register_op("noise_add_foreach", "noise_add_foreach(Tensor[] xs, Tensor scales, Tensor seed, Tensor offset, "
            "SymInt[] starts, int dist) -> Tensor[]",
            reference=noise_add_foreach_reference, triton=triton_kernel("noise_add_foreach", "noise_add_foreach"),
            noise=True)


@torch.library.register_fake("noisekernels::noise_add_foreach")
def _(xs, scales, seed, offset, starts, dist):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


def _setup(ctx, inputs, output):
    xs, _, seed, offset, starts, dist = inputs
    ctx.starts, ctx.dist = list(starts), dist
    ctx.save_for_backward(seed, offset)


def _backward(ctx, grads):
    seed, offset = ctx.saved_tensors
    grad_scales = None
    if ctx.needs_input_grad[1]:  # products and sums in the compute dtype (see noise_add's backward)
        grad_scales = torch.stack([
            call_op("noise_mul", ctx.backend, g.device, g.to(compute_dtype(g.dtype)).contiguous(), seed, offset + start,
                    ctx.dist, 1).sum()
            for g, start in zip(grads, ctx.starts)])
    return list(grads), grad_scales, None, None, None, None


register_autograd("noise_add_foreach", _backward, setup_context=_setup)


def noise_add_foreach(xs, scales, seed=None, offset=None, *, stream=None, dist="gaussian", backend=None):
    """[x + scale_k * eps for each x in xs] in one launch per (device, dtype) group.

    scales: one float >= 0 for all, a list of floats, or a tensor of len(xs) values (differentiable).
    Noise source: explicit seed and offset (reserve sum(philox.counters(x.numel()) for x in xs)
    counters), else a reservation from `stream`, else from the default stream of xs[0]'s device.
    """
    xs = list(xs)
    code = check_dist(dist)
    for k, x in enumerate(xs):
        check_floating_tensor(x, f"xs[{k}]")
    if isinstance(scales, torch.Tensor):
        if scales.shape != (len(xs),) or not scales.is_floating_point():
            raise ValueError(f"scales must be a floating tensor of shape ({len(xs)},), got {scales.dtype} {tuple(scales.shape)}")
        scale_tensor = scales
    else:
        values = [scales] * len(xs) if isinstance(scales, (int, float)) else list(scales)
        if len(values) != len(xs):
            raise ValueError(f"scales must have one value per tensor ({len(xs)}), got {len(values)}")
        scale_tensor = torch.tensor([check_scale_value(v, "scales") for v in values], dtype=torch.float64)
    starts, total = [], 0
    for x in xs:
        starts.append(total)
        total += philox.counters(x.numel())
    if stream is not None or seed is None or offset is None:
        device = stream.seed.device if stream is not None else (xs[0].device if xs else None)
        seed, offset = call_stream(seed, offset, stream, device, total)
    outputs = [None] * len(xs)
    groups = {}
    for k, x in enumerate(xs):
        groups.setdefault((x.device, x.dtype), []).append(k)
    for (device, dtype), ks in groups.items():
        seed_t, offset_t = stream_tensors(seed, offset, device)
        sc = scale_tensor.to(device=device, dtype=compute_dtype(dtype))[ks]
        result = call_op("noise_add_foreach", backend, device, [xs[k] for k in ks], sc, seed_t, offset_t,
                         [starts[k] for k in ks], code)
        for k, out in zip(ks, result):
            outputs[k] = out
    return outputs


