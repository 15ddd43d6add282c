"""Gradients of the noise ops against independent references: learnable-scale gradients of 16-bit
inputs accumulate in float32, a clip passes the gradient exactly where torch.clamp does, and an
explicit backend (reference, Triton) is differentiable with the same backward, run on that backend."""

import pytest
import torch

from conftest import KERNEL_BACKENDS
from noisekernels import philox
from noisekernels.functional import noise_add, noise_add_foreach, random_spike
from noisekernels.ops._args import stream_tensors
from noisekernels.ops.noise_add import DISTS, noise_mul
from noisekernels.ops.random_spike import random_spike_backward

BACKENDS = KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")]
SEED, OFFSET = 11, 2**32 - 37


def _eps(n, dist, seed=SEED, offset=OFFSET):
    """The contract's noise of a one-segment call at (seed, offset), in float64, from the
    pure-PyTorch Philox."""
    return philox.call_noise(DISTS[dist], *stream_tensors(seed, offset), n).double()


# --- learnable-scale gradients of float16 / bfloat16 inputs ---------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dist", ["gaussian", "uniform", "laplace"])
def test_half_precision_scale_gradient_accumulates_in_float32(backend, device, dtype, dist):
    """grad * eps summed in float32: a float16 gradient of 30000 times |eps| > 2.2 overflows if each
    product is rounded to float16 (inf - inf = NaN), and bfloat16 products keep 3 digits."""
    shape = (8, 3, 16)
    x = torch.zeros(shape, dtype=dtype, device=device)
    scale = torch.full((3,), 0.5, device=device, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    grad = (30000 * torch.randn(shape, generator=g).sign()).to(dtype)
    noise_add(x, scale, SEED, OFFSET, dist=dist, backend=backend).backward(grad.to(device))
    expected = (grad.double() * _eps(x.numel(), dist).view(shape)).sum((0, 2))
    assert scale.grad.dtype == torch.float32
    torch.testing.assert_close(scale.grad.cpu().double(), expected, rtol=2e-6, atol=1e-2)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_foreach_scale_gradient_accumulates_in_float32(backend, device, dtype):
    xs = [torch.zeros(40, dtype=dtype, device=device), torch.zeros(6, 7, dtype=dtype, device=device)]
    scales = torch.tensor([0.5, 2.0], device=device, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    grads = [(30000 * torch.randn(x.shape, generator=g).sign()).to(dtype) for x in xs]
    outs = noise_add_foreach(xs, scales, SEED, OFFSET, dist="laplace", backend=backend)
    torch.autograd.backward(outs, [gr.to(device) for gr in grads])
    eps = _eps(82, "laplace")
    expected = torch.stack([(grads[0].double() * eps[:40]).sum(), (grads[1].double().reshape(-1) * eps[40:]).sum()])
    torch.testing.assert_close(scales.grad.cpu().double(), expected, rtol=2e-6, atol=1e-2)


# --- clip: torch.clamp's gradient rule --------------------------------------------------------------

def _clamp_reference(x, scale, dist, replicas, clip):
    """noise_add written with torch.clamp on the contract's noise, differentiated by torch autograd."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    eps = _eps(x.numel() * replicas, dist).to(acc).view(replicas * x.shape[0], *x.shape[1:])
    v = x.to(acc).repeat(replicas, *([1] * (x.dim() - 1))) + scale.to(acc).view(1, -1, 1) * eps
    return torch.clamp(v, *clip).to(x.dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale_value", [0.0, 0.3], ids=["scale0", "scale0.3"])
@pytest.mark.parametrize("replicas", [1, 3])
def test_clip_gradient_matches_torch_clamp(backend, device, dtype, scale_value, replicas):
    """Images have exact 0 and 1 pixels: at a bound torch.clamp passes the gradient, beyond it not."""
    pixels = torch.tensor([-0.5, 0.0, 0.25, 1.0, 1.5, 0.0, 1.0, 0.75])
    g = torch.Generator().manual_seed(2)
    x = pixels[torch.randint(0, 8, (4, 3, 10), generator=g)].to(dtype)
    x_ref = x.clone().requires_grad_()
    scale_ref = torch.full((3,), scale_value, requires_grad=True)
    x_got = x.to(device).requires_grad_()
    scale_got = scale_ref.detach().to(device).requires_grad_()
    weight = torch.randint(-3, 4, (replicas * 4, 3, 10), generator=g).to(dtype)  # sums exact in any dtype

    y_ref = _clamp_reference(x_ref, scale_ref, "uniform", replicas, (0.0, 1.0))
    y_got = noise_add(x_got, scale_got, SEED, OFFSET, dist="uniform", replicas=replicas, clip=(0.0, 1.0),
                      backend=backend)
    assert torch.equal(y_got.cpu(), y_ref.detach())
    (y_ref * weight).sum().backward()
    (y_got * weight.to(device)).sum().backward()
    assert torch.equal(x_got.grad.cpu(), x_ref.grad)
    torch.testing.assert_close(scale_got.grad.cpu(), scale_ref.grad, rtol=1e-5, atol=1e-5)


# --- explicit backends are differentiable, with the same backward on that backend ----------------
# The dispatcher's (native) gradients are gradchecked in the ops' own tests; here every op called on
# an explicit Python backend must give the same outputs and gradients.

PYTHON_BACKENDS = [pytest.param("triton", "cuda" if torch.cuda.is_available() else "cpu", id="triton"),
                   pytest.param("reference", "cpu", id="reference")]


def _grads(fn, *inputs):
    """fn's outputs and the gradients of a weighted sum of them."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, list) else [out]
    weights = [torch.linspace(-2, 2, o.numel(), dtype=o.dtype, device=o.device).view(o.shape) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    return [o.detach() for o in outs], torch.autograd.grad(loss, inputs)


def _assert_same_as_native(fn, backend, *inputs, exact=True):
    outs, grads = _grads(lambda *a: fn(*a, backend=backend), *inputs)
    outs_native, grads_native = _grads(lambda *a: fn(*a, backend=None), *(t.cpu() for t in inputs))
    for got, want in zip((*outs, *grads), (*outs_native, *grads_native)):
        if exact:
            assert torch.equal(got.cpu(), want)
        else:
            torch.testing.assert_close(got.cpu(), want)
    return grads


@pytest.mark.parametrize("backend,device", PYTHON_BACKENDS)
def test_explicit_backend_random_spike_is_differentiable(backend, device):
    x = torch.randn(6, 20, device=device)
    (gx,) = _assert_same_as_native(lambda x, backend: random_spike(x, 0.6, SEED, OFFSET, backend=backend), backend, x)
    assert (gx == 0).any() and (gx != 0).any()
    _, mask = random_spike(x.cpu(), 0.6, SEED, OFFSET, return_mask=True)
    _assert_same_as_native(lambda g, backend: random_spike_backward(g, mask.to(g.device), backend=backend), backend, x)


@pytest.mark.parametrize("backend,device", PYTHON_BACKENDS)
@pytest.mark.parametrize("clip", [None, (-0.5, 0.5)])
def test_explicit_backend_noise_add_is_differentiable(backend, device, clip):
    x = torch.randn(4, 3, 5, device=device)
    scale = torch.rand(3, device=device) + 0.1
    f = lambda x, s, backend: noise_add(x, s, SEED, OFFSET, dist="uniform", replicas=2, clip=clip, backend=backend)  # noqa: E731
    _assert_same_as_native(f, backend, x, scale, exact=False)  # scale gradients: sums in another order
    _assert_same_as_native(lambda x, backend: f(x, scale, backend), backend, x)
    _assert_same_as_native(lambda g, backend: noise_mul(g, SEED, OFFSET, dist="laplace", backend=backend), backend, x)


@pytest.mark.parametrize("backend,device", PYTHON_BACKENDS)
def test_explicit_backend_foreach_is_differentiable(backend, device):
    xs = [torch.randn(3, 4, device=device), torch.randn(5, device=device)]
    scales = torch.tensor([0.3, 0.7], device=device)
    f = lambda a, c, s, backend: noise_add_foreach([a, c], s, SEED, OFFSET, dist="uniform", backend=backend)  # noqa: E731
    _assert_same_as_native(f, backend, *xs, scales, exact=False)


def test_explicit_backend_backward_runs_on_that_backend(monkeypatch):
    """The backward regenerates the mask with the forward's kernels, not the dispatcher's."""
    import noisekernels.triton.random_spike as triton_spike

    calls = []
    kernel = triton_spike.random_spike_backward
    monkeypatch.setattr(triton_spike, "random_spike_backward", lambda *a: calls.append(1) or kernel(*a))
    x = torch.randn(4, 8, requires_grad=True, device="cuda" if torch.cuda.is_available() else "cpu")
    random_spike(x, 0.5, SEED, OFFSET, backend="triton").sum().backward()
    assert calls == [1]


def test_explicit_backend_double_backward():
    """Second derivatives through the backward op on an explicit backend (float64 gradgradcheck)."""
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, s: noise_add(x, s, SEED, OFFSET, backend="reference"), (x, s))


def _opcheck_cases():
    seed, offset = torch.tensor(SEED), torch.tensor(OFFSET)
    x = torch.randn(4, 3, 5, requires_grad=True)
    half = torch.randn(4, 3, 5).half().requires_grad_()
    scale = torch.rand(3, requires_grad=True)
    return {
        "random_spike": [(x, 0.7, seed, offset, 2, 2), (x, 0.7, seed, offset, 1, 1)],
        "random_spike_backward": [(x, torch.ops.noisekernels.random_spike(x.detach(), 0.7, seed, offset, 1, 4)[1]),
                                  (half, torch.ops.noisekernels.random_spike(half.detach(), 0.7, seed, offset, 1, 1)[1])],
        "noise_add": [(x, scale, seed, offset, 1, 5, 3, 2, -0.5, 0.5, 2), (half, scale, seed, offset, 0, 5, 3, 1, 0.0, 1.0, 1),
                      (half, scale, seed, offset, 2, 5, 3, 3, None, None, 3)],
        "noise_mul": [(x, seed, offset, 0, 1), (half, seed, offset, 2, 2)],
        "noise_mul_sum": [(x, seed, offset, 0, 5, 3, 1), (half, seed, offset, 2, 1, 1, 2)],
        "noise_add_foreach": [([x, x[0]], torch.rand(2, requires_grad=True), seed, offset, [0, 60], 1),
                              ([half, half[1:]], torch.rand(2, requires_grad=True), seed, offset, [0, 60], 2)],
        "philox4x32": [(torch.randint(0, 2**32, (5, 4)), torch.tensor([SEED, 0]))],
        "philox_uniform": [(seed, offset, [3, 5], torch.float16, 3)],
        "philox_normal": [(seed, offset, [7], torch.float32, 1)],
        "replica_reduce": [(torch.randn(3, 4, 6), 0), (torch.randn(3, 4, 6), 1)],
        "offset_snapshot": [(torch.tensor(2**40 + 3),)],
        "offset_reserve": [(torch.tensor(2**40 + 3), 5)],
    }


def test_every_op_passes_opcheck():
    """torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch) on every op,
    with the autograd paths this file fixes: 16-bit inputs, clips and replicas."""
    from noisekernels import _extension

    cases = _opcheck_cases()
    assert set(cases) == set(_extension._SCHEMAS)  # a new op needs a case here
    for name, arg_lists in cases.items():
        for args in arg_lists:
            torch.library.opcheck(getattr(torch.ops.noisekernels, name), args)
