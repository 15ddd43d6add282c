"""noise_add, noise_mul and noise_mul_sum: additive noise with a fixed or learnable scale, and its replicas.

noise_add(x, scale, ...) = x + scale[(i / inner) % channels] * eps_i with eps_i ~ N(0, 1) (RSE's
Gaussian layers), U(-1, 1) or Laplace(0, 1), one word per element (ARCHITECTURE.md section 2). The scale is a float (fixed:
nothing is saved for backward), or a tensor: one value, one per channel (dim 1), or one per element
of x.shape[1:] (PNI's layer-, channel- and element-wise alpha * ref). With replicas=n it writes n
noisy copies of x, replica-major, optionally clipped to [lo, hi]: Gaussian data augmentation and
input-noise replicas for MC/EOT in one pass.

Backward: grad_x is grad (summed over replicas, zero where a clip was active); grad_scale is
sum(grad * eps) per scale entry, eps regenerated from the stream, never saved: by noise_mul_sum,
one pass that reduces as it goes, where one scale covers everything or each entry covers runs of
at least 64 consecutive elements (_FUSED_MIN_INNER); by noise_mul and a sum for shorter runs (a
scale per element, per-channel scales of maps of 7x7 or less, weight noise with fan-in under 64),
where it measured faster.
Arithmetic is float64 for float64 x, else float32. Uniform and Laplace noise are bit-identical on
every backend (Laplace uses exact_log); Gaussian agrees to a few ulp.
"""

import math

import torch

from .. import philox
from .._extension import call_op, register_autograd, register_op, triton_kernel
from ._args import check_floating_tensor, compute_dtype, stream_tensors
from ._streams import call_stream

DISTS = {"gaussian": philox.GAUSSIAN, "uniform": philox.UNIFORM, "laplace": philox.LAPLACE}


def _scale_index(numel_x, inner, channels, replicas, device):
    return ((torch.arange(numel_x, device=device) // inner) % channels).repeat(replicas)


def noise_add_reference(x, scale, seed, offset, dist, inner, channels, replicas, lo, hi, segments):
    size = (x.shape[0] * replicas, *x.shape[1:]) if replicas != 1 else x.shape
    n = x.numel() * replicas
    acc = compute_dtype(x.dtype)
    eps = philox.call_noise(dist, seed, offset, n, segments).to(acc)
    v = x.reshape(-1).to(acc).repeat(replicas) + scale[_scale_index(x.numel(), inner, channels, replicas, x.device)] * eps
    if lo is not None:
        v = v.clamp(lo, hi)
    return v.to(x.dtype).reshape(size)


def noise_mul_reference(grad, seed, offset, dist, segments):
    eps = philox.call_noise(dist, seed, offset, grad.numel(), segments).to(compute_dtype(grad.dtype))
    return (grad.reshape(-1).to(eps.dtype) * eps).to(grad.dtype).reshape(grad.shape)


def noise_mul_sum_reference(grad, seed, offset, dist, inner, channels, segments):
    acc = compute_dtype(grad.dtype)
    eps = philox.call_noise(dist, seed, offset, grad.numel(), segments).to(acc)
    return (grad.reshape(-1).to(acc) * eps).reshape(-1, channels, inner).sum((0, 2))


register_op("noise_add", "noise_add(Tensor x, Tensor scale, Tensor seed, Tensor offset, int dist, int inner, "
            "int channels, int replicas, float? lo, float? hi, int segments) -> Tensor",
            reference=noise_add_reference, triton=triton_kernel("noise_add", "noise_add"), noise=True)
register_op("noise_mul", "noise_mul(Tensor grad, Tensor seed, Tensor offset, int dist, int segments) -> Tensor",
            reference=noise_mul_reference, triton=triton_kernel("noise_add", "noise_mul"), noise=True)
register_op("noise_mul_sum", "noise_mul_sum(Tensor grad, Tensor seed, Tensor offset, int dist, int inner, int channels, "
            "int segments) -> Tensor", reference=noise_mul_sum_reference, triton=triton_kernel("noise_add", "noise_mul_sum"),
            noise=True)


@torch.library.register_fake("noisekernels::noise_add")
def _(x, scale, seed, offset, dist, inner, channels, replicas, lo, hi, segments):
    return x.new_empty((x.shape[0] * replicas, *x.shape[1:]) if replicas != 1 else x.shape)


@torch.library.register_fake("noisekernels::noise_mul")
def _(grad, seed, offset, dist, segments):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@torch.library.register_fake("noisekernels::noise_mul_sum")
def _(grad, seed, offset, dist, inner, channels, segments):
    return grad.new_empty((channels,), dtype=compute_dtype(grad.dtype))


# A scale entry whose runs of consecutive elements are shorter is reduced by noise_mul and a sum: the
# fused reduction closes a partial sum per run, which costs more than the pass it saves below about 64
# elements a run (CPU, 1M elements: 1.2 ms fused against 1.8 ms at 64, 1.8 against 1.7 at 32).
_FUSED_MIN_INNER = 64


def _setup_noise_add(ctx, inputs, output):
    x, scale, seed, offset, dist, inner, channels, replicas, lo, hi, segments = inputs
    ctx.args = (dist, inner, channels, replicas, lo, hi, segments)
    ctx.x_shape = x.shape
    # A clipped call keeps x and the scale to recompute the unclipped values: an output at a bound does
    # not tell whether the clip was active. Unclipped calls save just the 16 bytes of the stream.
    clipped = lo is not None
    ctx.save_for_backward(seed, offset, x if clipped else None, scale if clipped else None)


def _noise_add_backward(ctx, grad):
    seed, offset, x, scale = ctx.saved_tensors
    dist, inner, channels, replicas, lo, hi, segments = ctx.args
    acc = compute_dtype(grad.dtype)
    grad_x = grad_scale = None
    if x is not None:  # torch.clamp's rule: the gradient passes where lo <= unclipped value <= hi
        v = call_op("noise_add", ctx.backend, x.device, x.detach().to(acc), scale.detach(), seed, offset, dist, inner,
                    channels, replicas, None, None, segments)
        grad = torch.where((v >= lo) & (v <= hi), grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    if ctx.needs_input_grad[0]:
        grad_x = grad if replicas == 1 else grad.reshape(replicas, *ctx.x_shape).sum(0)
    if ctx.needs_input_grad[1]:
        # grad * eps and its sum in the compute dtype: rounding each product to float16 overflows (NaN
        # sums), to bfloat16 loses digits. One scale for everything is one run of all elements.
        if channels == 1 or inner >= _FUSED_MIN_INNER:
            grad_scale = call_op("noise_mul_sum", ctx.backend, grad.device, grad, seed, offset, dist, inner, channels,
                                 segments)
        else:
            ge = call_op("noise_mul", ctx.backend, grad.device, grad.to(acc).contiguous(), seed, offset, dist, segments)
            grad_scale = ge.reshape(-1, channels, inner).sum((0, 2))
    return grad_x, grad_scale, None, None, None, None, None, None, None, None, None


def _setup_noise_mul(ctx, inputs, output):
    ctx.dist, ctx.segments = inputs[3], inputs[4]
    ctx.save_for_backward(inputs[1], inputs[2])


def _noise_mul_backward(ctx, grad):
    seed, offset = ctx.saved_tensors  # linear in grad: the same multiplication by eps
    return call_op("noise_mul", ctx.backend, grad.device, grad.contiguous(), seed, offset, ctx.dist,
                   ctx.segments), None, None, None, None


def _setup_noise_mul_sum(ctx, inputs, output):
    grad, seed, offset, dist, inner, channels, segments = inputs
    ctx.args = (dist, inner, channels, segments)
    ctx.grad_meta = (grad.shape, grad.dtype)
    ctx.save_for_backward(seed, offset)


def _noise_mul_sum_backward(ctx, grad_out):
    seed, offset = ctx.saved_tensors  # linear in grad: d out[c] / d grad_i = eps_i where i is in c
    dist, inner, channels, segments = ctx.args
    shape, dtype = ctx.grad_meta
    zeros = torch.zeros(shape, dtype=dtype, device=grad_out.device)
    return call_op("noise_add", ctx.backend, grad_out.device, zeros, grad_out.contiguous(), seed, offset, dist, inner,
                   channels, 1, None, None, segments), None, None, None, None, None, None


register_autograd("noise_add", _noise_add_backward, setup_context=_setup_noise_add)
register_autograd("noise_mul", _noise_mul_backward, setup_context=_setup_noise_mul)
register_autograd("noise_mul_sum", _noise_mul_sum_backward, setup_context=_setup_noise_mul_sum)


def check_dist(dist):
    if not isinstance(dist, str) or dist not in DISTS:  # an unhashable value would fail the lookup unexplained
        raise ValueError(f"dist must be one of {tuple(DISTS)}, got {dist!r}")
    return DISTS[dist]


def check_scale_value(value, name):
    """A fixed noise scale: a float >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float >= 0, got {type(value).__name__}")
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite float >= 0, got {value}")
    return float(value)


def _scale_layout(x, scale):
    """(scale as a flat tensor in x's compute dtype, inner, channels) for a float or tensor scale."""
    acc = compute_dtype(x.dtype)
    if not isinstance(scale, torch.Tensor):
        value = check_scale_value(scale, "scale")
        return torch.full((1,), value, dtype=acc, device=x.device), 1, 1
    if not scale.is_floating_point():
        raise TypeError(f"scale must be a floating tensor, got {scale.dtype}")
    if scale.device != x.device:
        raise ValueError(f"scale is on {scale.device} but x is on {x.device}")
    flat = scale.to(acc).reshape(-1)
    if scale.numel() == 1:
        return flat, 1, 1
    if tuple(scale.shape) == tuple(x.shape):
        return flat, 1, scale.numel()  # one per element (weights)
    if x.dim() >= 2 and tuple(scale.shape) == tuple(x.shape[1:]):
        return flat, 1, scale.numel()  # one per element of a sample, shared over the batch
    if x.dim() >= 2 and scale.dim() == 1 and scale.shape[0] == x.shape[1]:
        return flat, math.prod(x.shape[2:]), scale.shape[0]  # one per channel (dim 1)
    if x.dim() >= 1 and tuple(scale.shape) == (x.shape[0],) + (1,) * (x.dim() - 1):
        return flat, math.prod(x.shape[1:]), scale.shape[0]  # one per dim-0 row (output channel)
    raise ValueError(f"scale must be a float or a tensor of shape (), (x.shape[1],), x.shape[1:], x.shape or "
                     f"(x.shape[0], 1, ...) for x of shape {tuple(x.shape)}; got shape {tuple(scale.shape)}")


def noise_add(x, scale, seed=None, offset=None, *, stream=None, dist="gaussian", replicas=1, segments=None, clip=None,
              backend=None):
    """x + scale * eps, eps ~ N(0, 1) ("gaussian"), U(-1, 1) ("uniform") or Laplace(0, 1) ("laplace").

    scale: float >= 0, or a tensor (differentiable: PNI) of shape () (one value), (C,) with
    C = x.shape[1] (per channel), x.shape[1:] (per element, shared over the batch), x.shape (per
    element) or (x.shape[0], 1, ...) (per output channel of a weight). replicas: n noisy copies of x,
    replica-major, (n*B, ...). segments: how many replicas the output holds, each on fresh counters
    so a batched call equals separate calls (default: replicas). clip: (lo, hi) to clip every value
    to. Noise source: explicit seed and offset (reserve philox.counters(x.numel() * replicas,
    segments) counters), else a reservation from `stream`, else from the default stream of x's
    device.
    """
    check_floating_tensor(x)
    code = check_dist(dist)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
    segments = _check_row_segments(x, replicas, replicas if segments is None else segments)
    lo = hi = None
    if clip is not None:
        lo, hi = (float(v) for v in clip)
        if not lo <= hi:
            raise ValueError(f"clip must be (lo, hi) with lo <= hi, got {clip!r}")
    flat, inner, channels = _scale_layout(x, scale)
    seed, offset = call_stream(seed, offset, stream, x.device, philox.counters(x.numel() * replicas, segments))
    return call_op("noise_add", backend, x.device, x, flat, seed, offset, code, inner, channels, replicas, lo, hi,
                   segments)


def noise_add_stream(x, scale_of, stream, code, replicas, segments):
    """noise_add's call for a layer that holds its checked fixed scale (scale_of(x): a one-element
    tensor in x's compute dtype, asked for once x is checked and the stream drawn from), dist code
    and replica counts: checks x and the stream's device, reserves from `stream`, runs on x's
    native backend."""
    check_floating_tensor(x)
    if x.device != stream.seed.device:
        raise ValueError(f"the layer's stream is on {stream.seed.device} but x is on {x.device}; move the "
                         "model to x's device")
    if replicas != 1 or segments != 1:
        _check_row_segments(x, replicas, segments)
    seed, offset = stream.reserve(philox.counters(x.numel() * replicas, segments))  # may refuse: DataParallel
    return call_op("noise_add", None, x.device, x, scale_of(x), seed, offset, code, 1, 1, replicas, None, None,
                   segments)


def _check_row_segments(x, replicas, segments):
    """replicas need x's rows, and segments must split the output's rows (replica-major) evenly."""
    if replicas > 1 and x.dim() == 0:
        raise ValueError("replicas > 1 needs x with a batch dimension, got a 0-dim tensor")
    if isinstance(segments, bool) or not isinstance(segments, int) or segments < 1:
        raise ValueError(f"segments must be an int >= 1, got {segments!r}")
    if segments > 1 and (x.dim() == 0 or (x.shape[0] * replicas) % segments):
        rows = "a 0-dim x" if x.dim() == 0 else f"{x.shape[0] * replicas} output rows"
        raise ValueError(f"segments={segments} must divide the output's rows, got {rows}")
    return segments


def noise_mul(grad, seed, offset, *, dist="gaussian", segments=1, backend=None):
    """grad * eps with the eps noise_add drew from the same (seed, offset, segments)."""
    check_floating_tensor(grad, "grad")
    code = check_dist(dist)
    philox.check_segments(grad.numel(), segments)
    seed, offset = stream_tensors(seed, offset, grad.device)
    return call_op("noise_mul", backend, grad.device, grad, seed, offset, code, segments)


def gaussian_augment(x, y, n, sigma, seed=None, offset=None, *, stream=None, clip=(0.0, 1.0), backend=None):
    """Gaussian data augmentation (efficient-defenses-brelu-gda.txt): n noisy copies of the batch,
    x + N(0, sigma^2) clipped to `clip`, replica-major (n*B, ...), with labels y repeated to match.
    Each copy is one segment, so the result equals n separate calls. Noise source as noise_add's
    (explicit seed and offset reserve philox.counters(n * x.numel(), n) counters)."""
    sigma = check_scale_value(sigma, "sigma")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if y is not None and (y.dim() == 0 or x.dim() == 0 or y.shape[0] != x.shape[0]):
        raise ValueError(f"y must have x's batch size, got shape {tuple(y.shape)} for x of shape {tuple(x.shape)}")
    xs = noise_add(x, sigma, seed, offset, stream=stream, replicas=n, clip=clip, backend=backend)
    return xs, (None if y is None else y.repeat(n, *([1] * (y.dim() - 1))))
