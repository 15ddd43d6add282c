"""noise_add / noise_mul / noise_mul_sum (RSE, PNI, Gaussian augmentation) against the reference on every backend:
bit for bit for uniform and Laplace, a few ulp for Gaussian; gradients (float64 gradcheck),
statistics, replicas, errors, modules and torch.compile."""

import math

import numpy as np
import pytest
import torch

from conftest import KERNEL_BACKENDS
import noisekernels as nk
from noisekernels import philox
from noisekernels._extension import call_op
from noisekernels.ops.noise_add import DISTS, gaussian_augment, noise_add, noise_mul

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OFFSET = 2**32 - 700
X_SHAPE = (4, 3, 5, 7)
# scale layouts: float, one value, per channel, per element of a sample, per element, per row
SCALES = {
    "float": lambda: 0.75,
    "one": lambda: torch.tensor(0.5),
    "channel": lambda: torch.rand(3) + 0.1,
    "sample-element": lambda: torch.rand(3, 5, 7),
    "element": lambda: torch.rand(*X_SHAPE),
    "row": lambda: torch.rand(4, 1, 1, 1),
}


def _x(dtype, shape=X_SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2).to(dtype)


def _assert_matches(got, expected, dist):
    if dist == "gaussian":  # transcendentals differ by a few ulp between backends
        tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(expected.dtype, 4e-6)
        torch.testing.assert_close(got.cpu().double(), expected.double(), rtol=tol, atol=tol)
    else:
        assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", ["gaussian", "uniform", "laplace"])
@pytest.mark.parametrize("layout", list(SCALES))
def test_noise_add_equals_reference(backend, device, dtype, dist, layout):
    torch.manual_seed(1)
    x, scale = _x(dtype), SCALES[layout]()
    expected = noise_add(x, scale, 9, OFFSET, dist=dist, backend="reference")
    scale = scale.to(device) if isinstance(scale, torch.Tensor) else scale
    got = noise_add(x.to(device), scale, 9, OFFSET, dist=dist, backend=backend)
    assert got.dtype == dtype and got.shape == x.shape
    _assert_matches(got, expected, dist)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", ["gaussian", "uniform", "laplace"])
# Copies of 54 elements; of 2200 (copies and tiles cross mid-run); of 2202 (segments not on whole counters).
@pytest.mark.parametrize("shape", [(3, 2, 9), (2, 1100), (2, 1, 1101)])
def test_replicas_and_clip_equal_reference(backend, device, dtype, dist, shape):
    x = _x(dtype, shape)
    kw = dict(dist=dist, replicas=4, clip=(-1.5, 2.25))
    expected = noise_add(x, 0.8, 3, OFFSET, backend="reference", **kw)
    got = noise_add(x.to(device), 0.8, 3, OFFSET, backend=backend, **kw)
    assert got.shape == (4 * shape[0], *shape[1:])
    _assert_matches(got, expected, dist)
    assert got.min() >= -1.5 and got.max() <= 2.25


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", ["gaussian", "uniform", "laplace"])
def test_noise_mul_equals_reference(backend, device, dtype, dist):
    g = _x(dtype, (5, 77))
    expected = noise_mul(g, 4, OFFSET, dist=dist, backend="reference")
    _assert_matches(noise_mul(g.to(device), 4, OFFSET, dist=dist, backend=backend), expected, dist)


# noise_mul_sum: (grad shape, inner, channels, segments): per channel, per row, one entry (a single
# run, across segments), scattered entries (inner 1), runs longer than the CPU's 2048-element and
# Triton's 4096-element pieces, segments that split runs, a single element.
MUL_SUM_CASES = [((4, 3, 5, 7), 35, 3, 1), ((4, 3, 5, 7), 35, 3, 4), ((6, 105), 105, 6, 3), ((6, 5, 7), 1, 1, 3),
                 ((3, 5), 1, 5, 3), ((1, 2, 4101), 4101, 2, 1), ((2, 2, 1031), 1031, 1, 4), ((1,), 1, 1, 1),
                 ((2, 4, 48, 48), 2304, 4, 1), ((3, 4, 16, 20), 320, 4, 3), ((5, 4100), 1, 1, 1)]


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", ["gaussian", "uniform", "laplace"])
def test_noise_mul_sum_equals_reference(backend, device, dtype, dist):
    """sum(grad * eps) per scale entry in the compute dtype (sums in another order: close)."""
    seed, offset = torch.tensor(6), torch.tensor(OFFSET)
    code = DISTS[dist]
    for shape, inner, channels, segments in MUL_SUM_CASES:
        g = _x(dtype, shape, seed=5)
        expected = call_op("noise_mul_sum", "reference", "cpu", g, seed, offset, code, inner, channels, segments)
        got = call_op("noise_mul_sum", backend, device, g.to(device), seed.to(device), offset.to(device), code, inner,
                      channels, segments)
        assert got.dtype == expected.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-4, msg=lambda m: f"{shape}: {m}")


def test_noise_mul_sum_is_bit_identical_across_thread_counts(threads):
    """A fixed summation order: the learnable scale's gradient does not depend on the thread count."""
    x = _x(torch.float32, (96, 8, 24, 24))
    for dtype, scale in ((torch.float32, torch.rand(8) + 0.1), (torch.float64, torch.rand(96, 1, 1, 1)),
                         (torch.bfloat16, torch.tensor(0.3)), (torch.float32, torch.rand(8, 24, 24))):
        grads = []
        for n in (1, 2, 3):
            threads(n)
            s = scale.clone().requires_grad_()
            noise_add(x.to(dtype), s, 3, OFFSET, replicas=2, segments=2).backward(_x(dtype, (192, 8, 24, 24), seed=1))
            grads.append(s.grad)
        assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2]), dtype


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["one", "channel", "sample-element", "row"])
def test_learnable_scale_gradient_with_replicas_and_clip_equals_reference(backend, device, dtype, layout):
    """Runs of 72 elements a channel: one-pass reductions for one, channel and row scales, noise_mul
    and a sum for a scale per element."""
    torch.manual_seed(4)
    scale = {"one": lambda: torch.tensor(0.5), "channel": lambda: torch.rand(3) + 0.1,
             "sample-element": lambda: torch.rand(3, 8, 9), "row": lambda: torch.rand(4, 1, 1, 1)}[layout]()
    x, g = _x(dtype, (4, 3, 8, 9)), _x(dtype, (8, 3, 8, 9), seed=2)
    grads = []
    for b, dev in ((backend, device), ("reference", "cpu")):
        s = scale.to(dev).requires_grad_()
        noise_add(x.to(dev), s, 2, OFFSET, dist="laplace", replicas=2, clip=(-1.0, 2.0), backend=b).backward(g.to(dev))
        grads.append(s.grad.cpu())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-4)


def test_noise_mul_sum_gradcheck():
    g = _x(torch.float64, (4, 3, 20)).requires_grad_()
    seed, offset = torch.tensor(5), torch.tensor(OFFSET)
    for inner, channels in ((20, 3), (1, 1), (60, 4)):
        f = lambda g: torch.ops.noisekernels.noise_mul_sum(g, seed, offset, 1, inner, channels, 2)  # noqa: E731
        assert torch.autograd.gradcheck(f, (g,)) and torch.autograd.gradgradcheck(f, (g,))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_empty_and_odd_sizes(backend, device):
    for shape in [(0, 3), (1,), (1537,), (2, 1, 1)]:
        x = _x(torch.float32, shape).to(device)
        got = noise_add(x, 0.3, 1, 0, dist="uniform", backend=backend)
        assert torch.equal(got.cpu(), noise_add(x.cpu(), 0.3, 1, 0, dist="uniform", backend="reference"))


def test_fixed_scale_gradient_is_identity_and_saves_nothing():
    x = _x(torch.float32).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = noise_add(x, 0.5, 1, 0)
    # Nothing (the C++ node); the Python backward of reference mode keeps the 16 bytes of the stream
    assert sum(t.numel() * t.element_size() for t in saved) == (16 if nk.build_info()["reference_only"] else 0)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_native_calls_differentiate_in_the_extensions_autograd():
    """Native (dispatcher) calls use the C++ Autograd kernel, the kernels called directly use the
    Python backward; the tests around this one compare the two."""
    x = _x(torch.float32).requires_grad_()
    if nk.build_info()["reference_only"]:
        pytest.skip("reference mode loads no C++")
    assert "NoiseAdd" in noise_add(x, 0.5, 1, 0).grad_fn.name()
    assert type(noise_add(x, 0.5, 1, 0, backend="reference").grad_fn).__name__ == "_DifferentiableBackward"
    with torch.no_grad():
        assert noise_add(x, 0.5, 1, 0).grad_fn is None


@pytest.mark.parametrize("layout", ["one", "channel", "sample-element", "element", "row"])
@pytest.mark.parametrize("dist", ["gaussian", "uniform", "laplace"])
def test_learnable_scale_gradcheck(layout, dist):
    torch.manual_seed(2)
    x = _x(torch.float64).requires_grad_()
    scale = SCALES[layout]().double().requires_grad_()
    f = lambda x, s: noise_add(x, s, 5, OFFSET, dist=dist)  # noqa: E731  (seed and offset fixed)
    assert torch.autograd.gradcheck(f, (x, scale))


@pytest.mark.parametrize("layout", ["one", "channel", "element"])
def test_learnable_scale_gradient_equals_reference_autograd(layout):
    torch.manual_seed(3)
    x = _x(torch.float32)
    s1 = SCALES[layout]().requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    g = torch.randn(X_SHAPE)
    noise_add(x, s1, 5, OFFSET).backward(g)
    noise_add(x, s2, 5, OFFSET, backend="reference").backward(g)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-5)


def test_replicas_gradient_sums_over_unclipped_replicas():
    x = _x(torch.float64, (3, 4)).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    g = torch.randn(15, 4, dtype=torch.float64)
    noise_add(x, 0.7, 2, 0, replicas=5, clip=(-1.0, 1.0)).backward(g)
    noise_add(xr, 0.7, 2, 0, replicas=5, clip=(-1.0, 1.0), backend="reference").backward(g)
    torch.testing.assert_close(x.grad, xr.grad)
    assert torch.autograd.gradcheck(lambda x: noise_add(x, 0.7, 2, 0, replicas=5), (x,))


def test_double_backward_of_learnable_scale():
    x = _x(torch.float64, (2, 6)).requires_grad_()
    s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, s: noise_add(x, s, 1, 0), (x, s))


def _ks(samples, cdf):
    u = cdf(samples.double().sort().values)
    i = torch.arange(1, u.numel() + 1, dtype=torch.float64)
    return torch.maximum(i / u.numel() - u, u - (i - 1) / u.numel()).max().item()


@pytest.mark.parametrize("dist,var,cdf", [
    ("gaussian", 1.0, lambda z: 0.5 * (1 + torch.special.erf(z / 2**0.5))),
    ("uniform", 1 / 3, lambda z: (z + 1) / 2),
    ("laplace", 2.0, lambda z: torch.where(z < 0, 0.5 * torch.exp(z), 1 - 0.5 * torch.exp(-z))),
])
def test_noise_statistics(dist, var, cdf):
    n = 4_000_000
    z = noise_add(torch.zeros(n), 1.0, 77, 0, dist=dist).double()
    assert abs(z.mean().item()) < 5 * (var / n) ** 0.5
    assert abs(z.var().item() - var) < 0.01 * var
    assert _ks(z, cdf) < 1.95 / n**0.5


def test_replicas_are_independent():
    x = torch.zeros(1000, 10)
    r = noise_add(x, 1.0, 8, 0, replicas=20).view(20, -1)
    corr = torch.corrcoef(r)
    off = corr[~torch.eye(20, dtype=torch.bool)]
    assert off.abs().max() < 5 / math.sqrt(r.shape[1])
    means = r.mean(1)  # the spread of a mean over k replicas shrinks like 1/sqrt(k)
    assert abs(means.std().item() - 1 / math.sqrt(r.shape[1])) < 0.35 / math.sqrt(r.shape[1])


def test_gaussian_augment():
    x = torch.rand(6, 1, 4, 4)
    y = torch.arange(6)
    xs, ys = gaussian_augment(x, y, 10, 0.3, 5, 0)
    assert xs.shape == (60, 1, 4, 4) and torch.equal(ys, y.repeat(10))
    assert xs.min() >= 0 and xs.max() <= 1
    assert torch.equal(xs, noise_add(x, 0.3, 5, 0, replicas=10, clip=(0, 1)))
    assert not torch.equal(xs[:6], xs[6:12])
    # Each copy is one segment: the call equals 10 calls on one stream (S = 96 elements here, and
    # 6 * 3 * 3 = 54 below, not a multiple of 4).
    for shape in ((6, 1, 4, 4), (6, 3, 3)):
        x = torch.rand(shape)
        s, loop_stream = nk.Stream(seed=2), nk.Stream(seed=2)
        xs, _ = gaussian_augment(x, None, 10, 0.3, stream=s)
        loop = [gaussian_augment(x, None, 1, 0.3, stream=loop_stream)[0] for _ in range(10)]
        assert torch.equal(xs, torch.cat(loop)) and s.offset.item() == loop_stream.offset.item()
    with pytest.raises(ValueError, match=r"y must have x's batch size, got shape \(3,\)"):
        gaussian_augment(x, y[:3], 2, 0.3, 5, 0)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="scale must be a finite float >= 0"):
        noise_add(x, -0.1, 0, 0)
    with pytest.raises(ValueError, match="sigma must be a finite float >= 0"):
        nk.nn.GaussianNoise(-1.0)
    with pytest.raises(ValueError, match="sigma must be a finite float >= 0"):
        gaussian_augment(x, None, 2, math.nan, 0, 0)
    with pytest.raises(ValueError, match="dist must be one of"):
        noise_add(x, 0.1, 0, 0, dist="cauchy")
    with pytest.raises(ValueError, match=r"scale must be a float or a tensor of shape"):
        noise_add(x, torch.ones(5), 0, 0)
    with pytest.raises(ValueError, match="clip must be"):
        noise_add(x, 0.1, 0, 0, clip=(1.0, -1.0))
    with pytest.raises(ValueError, match="replicas must be an int >= 1"):
        noise_add(x, 0.1, 0, 0, replicas=0)
    with pytest.raises(TypeError, match="x.dtype must be one of"):
        noise_add(torch.ones(3, dtype=torch.int32), 0.1, 0, 0)
    with pytest.raises(TypeError, match="scale must be a floating tensor"):
        noise_add(x, torch.ones((), dtype=torch.int64), 0, 0)
    with pytest.raises(RuntimeError, match="dist must be 0"):
        torch.ops.noisekernels.noise_add(x, torch.ones(1), torch.tensor(0), torch.tensor(0), 7, 1, 1, 1, None, None, 1)
    with pytest.raises(RuntimeError, match="segments must be >= 1 and divide the number of elements 12, got 5"):
        torch.ops.noisekernels.noise_add(x, torch.ones(1), torch.tensor(0), torch.tensor(0), 0, 1, 1, 1, None, None, 5)
    # a scale layout of 5 channels or runs of 5 does not tile 12 elements; inner * channels = 2**64 wraps int64
    for inner, channels in ((1, 5), (5, 1), (2**62, 4)):
        with pytest.raises(RuntimeError, match="x.numel\\(\\) a multiple of inner \\* channels"):
            torch.ops.noisekernels.noise_add(x, torch.ones(channels if channels < 8 else 1), torch.tensor(0),
                                             torch.tensor(0), 0, inner, channels, 1, None, None, 1)
    with pytest.raises(ValueError, match="segments=3 must divide the output's rows, got 8 output rows"):
        noise_add(x, 0.1, 0, 0, replicas=2, segments=3)
    with pytest.raises(ValueError, match="pass either seed and offset or stream"):
        noise_add(x, 0.1, 0, 0, stream=nk.Stream(seed=1))


def test_opcheck():
    seed, offset = torch.tensor(3), torch.tensor(2**32 - 7)
    x = torch.randn(4, 3, 5, requires_grad=True)
    for scale, inner, channels in ((torch.rand(1, requires_grad=True), 1, 1), (torch.rand(3, requires_grad=True), 5, 3)):
        for replicas, lo, hi in ((1, None, None), (3, -1.0, 1.0)):
            torch.library.opcheck(torch.ops.noisekernels.noise_add,
                                  (x, scale, seed, offset, 2, inner, channels, replicas, lo, hi, replicas))
    torch.library.opcheck(torch.ops.noisekernels.noise_mul, (x.detach(), seed, offset, 0, 2))
    torch.library.opcheck(torch.ops.noisekernels.noise_mul_sum, (x, seed, offset, 0, 5, 3, 2))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("dist", ["gaussian", "uniform", "laplace"])
def test_segments_equal_separate_calls(backend, device, dist):
    """x holding 3 replicas of 2 x 3 x 3 = 18 elements (not a multiple of 4): one call with
    segments=3 equals three calls on one stream, outputs and the learnable scale's gradient."""
    x = _x(torch.float64, (6, 3, 3)).to(device)
    alpha = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64, device=device, requires_grad=True)
    s, loop_stream = nk.Stream(seed=4).to(device), nk.Stream(seed=4).to(device)
    y = noise_add(x, alpha, stream=s, dist=dist, segments=3, backend=backend)
    loop = torch.cat([noise_add(x[2 * r:2 * r + 2], alpha, stream=loop_stream, dist=dist, backend=backend)
                      for r in range(3)])
    _assert_matches(y.detach(), loop.detach().cpu(), dist)
    assert s.offset.item() == loop_stream.offset.item() == 3 * philox.counters(18)
    if backend == "triton":  # called directly, not through the dispatcher: no autograd
        return
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, alpha, g)
    (grad_loop,) = torch.autograd.grad(loop, alpha, g)
    torch.testing.assert_close(grad, grad_loop)
    if backend == "cpu":
        assert torch.autograd.gradcheck(lambda a: noise_add(x, a, 1, 0, dist=dist, segments=3), (alpha,))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")])
def test_empty_inputs(backend, device):
    """Issue 9: every op handles empty input the same way on every backend."""
    for shape in ((0, 3), (0,), (2, 0)):
        x = torch.empty(shape, device=device)
        for kw in (dict(), dict(replicas=3), dict(clip=(0.0, 1.0)), dict(segments=2 if shape[0] else 1)):
            assert noise_add(x, 0.5, 1, 0, backend=backend, **kw).shape == (shape[0] * kw.get("replicas", 1), *shape[1:])
        assert noise_mul(x, 1, 0, backend=backend).shape == shape
        assert nk.functional.noise_add_foreach([x, x], 0.5, 1, 0, backend=backend)[1].shape == shape
        xs, ys = gaussian_augment(x, None, 3, 0.1, 1, 0, backend=backend) if x.dim() > 1 else (None, None)
        assert xs is None or xs.shape == (3 * shape[0], *shape[1:])


def test_modules_train_eval_mc():
    x = torch.randn(8, 3, 4, 4)
    for layer in (nk.nn.GaussianNoise(0.1, mc=False, seed=1), nk.nn.UniformNoise(0.2, mc=False, seed=1),
                  nk.nn.LaplaceNoise(0.3, mc=False, seed=1)):
        assert not torch.equal(layer(x), x)
        layer.eval()
        assert layer(x) is x
        layer.mc = True
        assert not torch.equal(layer(x), x) and set(layer.state_dict()) == {"stream.seed", "stream.offset"}
    assert nk.nn.GaussianNoise(0.0)(x) is x


def test_learnable_and_weight_noise_train():
    torch.manual_seed(0)
    layer = nk.nn.LearnableNoise((3,), init=0.25, seed=2)
    y = layer(torch.randn(8, 3, 4, 4))
    y.square().sum().backward()
    assert layer.alpha.grad.shape == (3,) and (layer.alpha.grad != 0).all()
    conv = torch.nn.Conv2d(3, 4, 3)
    noise = nk.nn.add_weight_noise(conv, mc=False, seed=3)
    conv(torch.randn(2, 3, 6, 6)).sum().backward()
    assert noise.alpha.grad is not None and conv.parametrizations.weight.original.grad is not None
    w = conv.weight  # noisy in training, clean in eval
    conv.eval()
    assert torch.equal(conv.weight, conv.parametrizations.weight.original) and not torch.equal(w, conv.weight)


class RSENet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.n0 = nk.nn.GaussianNoise(0.2, mc=True, seed=1)
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.n1 = nk.nn.LearnableNoise((4,), seed=2, mc=True)
        self.head = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.head(self.n1(self.conv(self.n0(x))).flatten(1))


def test_compile_fullgraph_fresh_noise_each_step():
    torch.manual_seed(0)
    eager, other = RSENet(), RSENet()
    other.load_state_dict(eager.state_dict())
    step = torch.compile(other, fullgraph=True)
    x = torch.randn(3, 1, 8, 8)
    outs = []
    for _ in range(3):
        out = step(x)
        out.sum().backward()
        torch.testing.assert_close(out, eager(x))
        outs.append(out.detach())
    assert not torch.equal(outs[0], outs[1])
    assert other.n1.alpha.grad is not None


@pytest.mark.parametrize("n,replicas", [(1, 1), (127, 1), (128, 1), (129, 1), (5003, 1), (2200, 3), (1101, 2), (4800, 2)])
def test_cpu_gaussian_add_to_zeros_is_the_normal_fill(n, replicas):
    """0 + 1 * z is z exactly, so noise_add on zeros must give the normal fill's values bit for bit,
    whichever CPU path (straight from the generator, or through the tile) each element took, with
    one scale, a scale per row, or per channel (runs of 16 or 48 elements, or of one)."""
    expected = nk.random.normal((replicas, n), 11, OFFSET, segments=replicas)
    for scale in (1.0, torch.ones(replicas, 1)):
        assert torch.equal(noise_add(torch.zeros(replicas, n), scale, 11, OFFSET, segments=replicas), expected)
    for inner in (16, 48, 1) if n % 48 == 0 else ():
        x = torch.zeros(replicas, n // inner, inner)
        got = noise_add(x, torch.ones(n // inner), 11, OFFSET, segments=replicas)
        assert torch.equal(got.reshape(replicas, n), expected)
    clipped = noise_add(torch.zeros(replicas, n), 1.0, 11, OFFSET, segments=replicas, clip=(-0.5, 0.75))
    assert torch.equal(clipped, expected.clamp(-0.5, 0.75))


# The CPU's float32 Gaussian paths straight from the generator's registers, pinned to independent compositions.
CPU_KERNELS = pytest.mark.skipif(nk.build_info()["reference_only"], reason="needs the compiled CPU kernels")


@CPU_KERNELS
# Runs of 16, 48, 784 and 2064 elements a channel (fused), 100 (tile), replicas that wrap mid-step;
# offsets where the counter's high word changes inside a generator step, and where it wraps past 2**64.
@pytest.mark.parametrize("shape,inner", [((3, 5, 16), 16), ((2, 3, 48), 48), ((2, 4, 784), 784),
                                         ((2, 2, 2064), 2064), ((3, 2, 100), 100)])
@pytest.mark.parametrize("offset", [2**32 - 37, 2**64 - 45])
@pytest.mark.parametrize("replicas", [1, 3])
def test_gaussian_add_is_x_plus_scale_times_the_normal_fill(shape, inner, offset, replicas):
    """float32 x + s * z rounds once per operation, so the kernel must equal x + s * z formed from
    the normal fill bit for bit, with a scale per channel and clipping (NaN passes a clip)."""
    x = _x(torch.float32, shape) * 1.5
    x.view(-1)[[0, 17, 40]] = torch.tensor([float("nan"), float("inf"), -0.0])
    scale = torch.rand(shape[1]) + 0.1
    got = noise_add(x, scale, 9, offset, replicas=replicas, clip=(-2.0, 2.5))
    z = nk.random.normal((replicas * x.numel(),), 9, offset, segments=replicas)
    expected = (x.repeat(replicas, 1, 1).reshape(-1) + scale.view(-1, 1).expand(shape).repeat(replicas, 1, 1).reshape(-1)
                * z).clamp(-2.0, 2.5)
    assert torch.equal(got.reshape(-1).view(torch.int32), expected.view(torch.int32))


def _mul_sum_in_kernel_order(g, z, inner, channels):
    """noise_mul_sum's documented order in float32: each run of `inner` elements in pieces of at most
    2048, a piece in 16 lanes by position, its lanes in order, an entry's pieces in index order."""
    prod = (g.reshape(-1) * z).numpy()
    n = prod.size
    inner = n if channels == 1 else inner
    runs, piece = n // inner, min(inner, 2048)
    out = np.zeros(channels, np.float32)
    for u in range(runs):
        for b in range(u * inner, (u + 1) * inner, piece):
            part = prod[b:min(b + piece, (u + 1) * inner)]
            rows = np.zeros(-(-part.size // 16) * 16, np.float32)
            rows[:part.size] = part
            lanes = np.zeros(16, np.float32)
            for row in rows.reshape(-1, 16):
                lanes = lanes + row
            s = np.float32(0)
            for v in lanes:
                s = np.float32(s + v)
            out[u % channels] = np.float32(out[u % channels] + s)
    return torch.from_numpy(out)


@CPU_KERNELS
@pytest.mark.parametrize("shape,inner,channels,segments", [((3, 4, 48), 48, 4, 1), ((2, 3, 2064), 2064, 3, 2),
                                                           ((5, 1101), 1, 1, 5), ((2, 2, 4112), 4112, 2, 1),
                                                           ((3, 2, 40), 40, 2, 3)])
def test_noise_mul_sum_sums_in_its_fixed_order(shape, inner, channels, segments, threads):
    g = _x(torch.float32, shape, seed=2)
    offset = 2**32 - 70
    z = nk.random.normal((g.numel(),), 4, offset, segments=segments)
    expected = _mul_sum_in_kernel_order(g, z, inner, channels)
    for n in (1, 2):
        threads(n)
        got = torch.ops.noisekernels.noise_mul_sum(g, torch.tensor(4), torch.tensor(offset), philox.GAUSSIAN, inner,
                                                   channels, segments)
        assert torch.equal(got, expected)


@CPU_KERNELS
def test_noise_mul_sum_rejects_inner_times_channels_past_int64():
    """2**62 * 4 wraps to 0 in int64: the check must not divide by it (SIGFPE killed the process)."""
    g = torch.randn(64)
    with pytest.raises(RuntimeError, match="inner"):
        torch.ops.noisekernels.noise_mul_sum(g, torch.tensor(1), torch.tensor(0), philox.GAUSSIAN, 2**62, 4, 1)


@CPU_KERNELS
def test_noise_add_rejects_replicas_past_int64():
    """4 * 2**62 elements wrap to 0: the call returned an empty tensor instead of an error."""
    with pytest.raises(RuntimeError, match="replicas"):
        noise_add(torch.randn(4), 0.5, 1, 0, replicas=2**62, segments=1)
