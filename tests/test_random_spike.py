"""random_spike against its reference on every backend (outputs, packed masks, gradients, bit for
bit), its statistics, replica mode, NaN/Inf policy, strides, errors, the module and torch.compile."""

import math

import numpy as np
import pytest
import torch

from conftest import KERNEL_BACKENDS
import noisekernels as nk
from noisekernels import philox
from noisekernels.ops.random_spike import random_spike, random_spike_backward, unpack_mask

SHAPES = [(1,), (7,), (3, 5), (4, 3, 5, 7), (6, 2, 1, 1), (2, 1537), (9, 4, 11), (3, 4100)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MODES = [("batch", 1), ("sample", 1), ("batch", 2), ("sample", 2)]  # replicas=2 needs an even batch
OFFSET = 2**32 - 1000  # counters cross into the high word


def _input(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3 + 1).to(dtype)


def _mask(p, seed, offset, n, segments=1):
    """Kept units, from the contract's text: element j of segment k is kept when U(w0) (j even) or
    U(w2) (j odd) of counter offset + k * ceil(S / 2) + j // 2 is below p."""
    size = n // segments
    per_segment = -(-size // 2)
    words = torch.stack(philox.words(torch.tensor(seed), torch.tensor(offset), segments * per_segment), dim=1)
    j = torch.arange(size)
    keep_words = torch.cat([words[k * per_segment + j // 2, 2 * (j % 2)] for k in range(segments)])
    return philox.uniform_from_word(keep_words) < torch.tensor(p, dtype=torch.float32)


def _unpacked(mask, n):
    """The packed mask's bits as bools, by numpy's independent unpacking: element i at bit i % 8
    (least significant first) of byte i // 8."""
    assert mask.dtype == torch.uint8 and mask.shape == (-(-n // 8),)
    return torch.from_numpy(np.unpackbits(mask.cpu().numpy(), bitorder="little")[:n].astype(bool))


def _cases():
    for shape in SHAPES:
        for range_, replicas in MODES:
            if replicas > 1 and shape[0] % replicas:
                continue
            yield shape, range_, replicas


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,range_,replicas", list(_cases()))
def test_forward_and_backward_equal_reference(backend, device, dtype, shape, range_, replicas):
    x = _input(shape, dtype)
    kw = dict(range=range_, replicas=replicas, return_mask=True)
    expected, expected_mask = random_spike(x, 0.6, 77, OFFSET, backend="reference", **kw)
    got, mask = random_spike(x.to(device), 0.6, 77, OFFSET, backend=backend, **kw)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got.cpu(), expected) and torch.equal(mask.cpu(), expected_mask)
    keep = _mask(0.6, 77, OFFSET, x.numel(), replicas)  # recomputed from the stream
    assert torch.equal(_unpacked(mask, x.numel()), keep)
    g = _input(shape, dtype, seed=1)
    expected_grad = torch.where(keep.view(shape), g, torch.zeros((), dtype=dtype))
    assert torch.equal(random_spike_backward(g.to(device), mask, backend=backend).cpu(), expected_grad)
    assert torch.equal(random_spike_backward(g, expected_mask, backend="reference"), expected_grad)
    xg = x.to(device).requires_grad_()
    random_spike(xg, 0.6, 77, OFFSET, backend=backend, range=range_, replicas=replicas).backward(g.to(device))
    assert torch.equal(xg.grad.cpu(), expected_grad)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("shape,replicas", [((), 1), ((9,), 9), ((5, 1, 1), 5), ((3, 7), 3), ((2, 8), 2),
                                            ((5, 3), 1), ((17,), 1), ((4, 9), 4)])
def test_mask_bits_on_odd_sizes(backend, device, shape, replicas):
    """The packed mask holds the recomputed keep test bit for bit where n is no multiple of 8 or 16,
    segments are odd (S = 7, 3, 9) or single elements (S = 1), and for a 0-dim x; the gradient
    through it is the masked grad."""
    x = _input(shape, torch.float32)
    n = x.numel()
    y, mask = random_spike(x.to(device), 0.5, 13, OFFSET, replicas=replicas, backend=backend, return_mask=True)
    keep = _mask(0.5, 13, OFFSET, n, replicas)
    assert torch.equal(_unpacked(mask, n), keep)
    assert torch.equal(unpack_mask(mask.cpu(), shape), keep.view(shape))
    assert torch.equal(y.cpu()[keep.view(shape)], x[keep.view(shape)])
    g = _input(shape, torch.float32, seed=2)
    assert torch.equal(random_spike_backward(g.to(device), mask, backend=backend).cpu(),
                       torch.where(keep.view(shape), g, torch.zeros(())))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.25, 1.0])
def test_edge_probabilities_and_empty(backend, device, p):
    x = _input((5, 33), torch.float32).to(device)
    y = random_spike(x, p, 3, 0, backend=backend).cpu()
    assert torch.equal(y, random_spike(x.cpu(), p, 3, 0, backend="reference"))
    if p == 1.0:
        assert torch.equal(y, x.cpu())
    if p == 0.0:
        assert (y != x.cpu()).all() and y.min() >= x.min().item() and y.max() <= x.max().item()
    for shape in ((0, 4), (0,), (3, 0)):
        empty = torch.empty(shape, device=device)
        for range_ in ("batch", "sample"):  # issue 9: an empty batch crashed the CPU sample range
            assert random_spike(empty, p, 3, 0, range=range_, backend=backend).shape == shape
        assert random_spike(empty, p, 3, 0, replicas=3 if shape[0] else 1, backend=backend).shape == shape
        out, mask = random_spike(empty, p, 3, 0, backend=backend, return_mask=True)
        assert mask.dtype == torch.uint8 and mask.shape == (0,)
        assert random_spike_backward(empty, mask, backend=backend).shape == shape


def test_mask_and_gradient_follow_the_stream():
    """Kept units are exactly where U(w0) < p; their gradient is grad, spiked units get exactly 0."""
    x = _input((8, 3, 10, 10), torch.float32).requires_grad_()
    y = random_spike(x, 0.8, 11, OFFSET)
    keep = _mask(0.8, 11, OFFSET, x.numel()).view(x.shape)
    assert torch.equal(y[keep], x[keep]) and (y[~keep] != x[~keep]).all()
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(keep, g, torch.zeros(())))
    # Autograd through the reference agrees: min/max get no gradient.
    xr = x.detach().clone().requires_grad_()
    random_spike(xr, 0.8, 11, OFFSET, backend="reference").backward(g)
    assert torch.equal(xr.grad, x.grad)


def test_double_backward_is_the_mask():
    """The gradient is linear in grad_output with the mask as its coefficient (and constant in x)."""
    x = _input((4, 9), torch.float64).requires_grad_()
    y, mask = random_spike(x, 0.5, 2, 0, return_mask=True)
    go = torch.ones_like(y).requires_grad_()
    (gx,) = torch.autograd.grad(y, x, go, create_graph=True)
    v = torch.randn_like(gx)
    (gg,) = torch.autograd.grad(gx, go, v)
    assert torch.equal(gg, random_spike_backward(v, mask))
    assert torch.equal(gg, torch.where(_mask(0.5, 2, 0, x.numel()).view(x.shape), v, torch.zeros((), dtype=v.dtype)))


def test_backward_saves_only_the_packed_mask():
    """One bit per element (eager code saves a bool mask: 8 times more), and it is the keep mask."""
    x = torch.randn(63, 5, 13, 13, requires_grad=True)  # n = 53235: no multiple of 8
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        random_spike(x, 0.8, 1, 5)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.uint8, (-(-x.numel() // 8),))]
    assert torch.equal(_unpacked(saved[0], x.numel()), _mask(0.8, 1, 5, x.numel()))


def test_backward_mask_errors():
    g = torch.randn(3, 7)
    with pytest.raises(TypeError, match="mask must be a uint8 tensor"):
        random_spike_backward(g, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must have shape \(3,\) .* 21 elements\), got \(2,\)"):
        random_spike_backward(g, torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match=r"mask must have shape \(3,\)"):
        torch.ops.noisekernels.random_spike_backward(g, torch.zeros(1, 3, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="mask must be uint8"):
        torch.ops.noisekernels.random_spike_backward(g, torch.zeros(3, dtype=torch.int32))


@pytest.mark.parametrize("make", [
    lambda x: x.transpose(0, 2),
    lambda x: x.to(memory_format=torch.channels_last),
    lambda x: x[:, ::2, 1:, :],
    lambda x: x[:, :1].expand(-1, 6, -1, -1),
], ids=["transposed", "channels_last", "sliced", "expanded"])
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_strided_inputs_equal_their_contiguous_copy(make, backend, device):
    x = make(_input((4, 6, 5, 3), torch.float32).to(device))
    assert not x.is_contiguous()
    got = random_spike(x, 0.5, 9, 0, range="sample", backend=backend)
    assert torch.equal(got, random_spike(x.contiguous(), 0.5, 9, 0, range="sample", backend=backend))


def test_replicas_reproduce_separate_calls():
    """n replicas in one call equal n separate calls at consecutive offsets: min/max per replica."""
    n, rows = 4, (5, 3, 3, 3)  # 135 elements per replica: not a multiple of 2
    parts = [_input(rows, torch.float32, seed=r) * (r + 1) + 10 * r for r in range(n)]
    per = philox.counters(parts[0].numel(), draws=2)
    together = random_spike(torch.cat(parts), 0.7, 21, OFFSET, replicas=n)
    for r, part in enumerate(parts):
        alone = random_spike(part, 0.7, 21, OFFSET + r * per)
        assert torch.equal(together[r * 5:(r + 1) * 5], alone)
    # Not per replica, the whole batch's range would be used: a different result.
    assert not torch.equal(together, random_spike(torch.cat(parts), 0.7, 21, OFFSET))


def test_sample_range_uses_each_rows_min_max():
    x = torch.stack([torch.linspace(-1, 1, 500), torch.linspace(100, 200, 500)])
    y = random_spike(x, 0.0, 4, 0, range="sample")
    assert y[0].min() >= -1 and y[0].max() <= 1 and y[1].min() >= 100 and y[1].max() <= 200


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, interpreted
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_nan_inf_policy(backend, device):
    x = _input((2, 1000), torch.float32)
    x[0, 3], x[0, 4], x[0, 5] = math.nan, math.inf, -math.inf
    x[1] = math.nan  # no finite value at all in this sample
    expected = random_spike(x, 0.5, 8, 0, range="sample", backend="reference")
    y = random_spike(x.to(device), 0.5, 8, 0, range="sample", backend=backend).cpu()
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.nan_to_num(), expected.nan_to_num())
    keep = _mask(0.5, 8, 0, x.numel()).view(x.shape)
    finite = x[0].isfinite()
    lo, hi = x[0][finite].min(), x[0][finite].max()
    assert ((y[0][~keep[0]] >= lo) & (y[0][~keep[0]] <= hi)).all()  # finite noise despite NaN/inf
    for j in (3, 4, 5):
        assert keep[0, j] == (y[0, j].isnan() or y[0, j].isinf())  # kept as is unless spiked
    assert y[1].isnan().all()


def test_spike_statistics_1e7():
    n, p = 10_000_000, 0.8
    x = torch.linspace(-2.0, 3.0, n)
    y = random_spike(x, p, 123, 0)
    spiked = y != x
    count = spiked.sum().item()
    mean, sd = n * (1 - p), (n * p * (1 - p)) ** 0.5
    assert abs(count - mean) < 5 * sd
    values = y[spiked].double()
    assert values.min() >= -2.0 and values.max() <= 3.0
    u = ((values - -2.0) / 5.0).sort().values  # uniform on [0, 1] if spikes are uniform on [min, max]
    i = torch.arange(1, u.numel() + 1, dtype=torch.float64)
    ks = torch.maximum(i / u.numel() - u, u - (i - 1) / u.numel()).max().item()
    assert ks < 1.95 / u.numel() ** 0.5


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(4, 3)
    for p in (1.5, -0.1, math.nan):
        with pytest.raises(ValueError, match=r"keep must be in \[0, 1\]"):
            random_spike(x, p, 0, 0)
    with pytest.raises(TypeError, match="keep must be a float"):
        random_spike(x, "0.5", 0, 0)
    with pytest.raises(TypeError, match="return_mask must be a bool"):
        random_spike(x, 0.5, 0, 0, return_mask="no")
    with pytest.raises(TypeError, match="x.dtype must be one of"):
        random_spike(torch.ones(3, dtype=torch.int64), 0.5, 0, 0)
    with pytest.raises(ValueError, match="range must be one of"):
        random_spike(x, 0.5, 0, 0, range="channel")
    with pytest.raises(ValueError, match=r"replicas=3 must divide x.shape\[0\]=4"):
        random_spike(x, 0.5, 0, 0, replicas=3)
    with pytest.raises(ValueError, match="needs x with a batch dimension"):
        random_spike(torch.tensor(1.0), 0.5, 0, 0, range="sample")
    with pytest.raises(ValueError, match=r"keep must be in \[0, 1\]"):
        nk.nn.RandomSpike(keep=2.0)
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\], got 2"):
        torch.ops.noisekernels.random_spike(x, 2.0, torch.tensor(0), torch.tensor(0), 1, 1)
    with pytest.raises(RuntimeError, match="groups must be >= 1 and divide x.numel"):
        torch.ops.noisekernels.random_spike(x, 0.5, torch.tensor(0), torch.tensor(0), 5, 1)
    with pytest.raises(RuntimeError, match="segments must be >= 1 and divide the number of elements 12, got 5"):
        torch.ops.noisekernels.random_spike(x, 0.5, torch.tensor(0), torch.tensor(0), 1, 5)
    with pytest.raises(ValueError, match="pass either seed and offset or stream"):
        random_spike(x, 0.5, 0, 0, stream=nk.Stream(seed=1))


def test_opcheck():
    seed, offset = torch.tensor(3), torch.tensor(2**32 - 7)
    for x, groups in ((torch.randn(4, 3, 5, requires_grad=True), 1), (torch.randn(6, 7, requires_grad=True), 3),
                      (torch.randn(2, 3, 4).transpose(0, 2).requires_grad_(), 4)):
        torch.library.opcheck(torch.ops.noisekernels.random_spike, (x, 0.7, seed, offset, groups, 2))
        _, mask = torch.ops.noisekernels.random_spike(x.detach(), 0.7, seed, offset, groups, 2)
        torch.library.opcheck(torch.ops.noisekernels.random_spike_backward, (x.detach(), mask))


def test_module_train_eval_and_mc():
    layer = nk.nn.RandomSpike(keep=0.5, seed=7)
    x = torch.randn(4, 8, 6, 6)
    y1, y2 = layer(x), layer(x)
    reserved = philox.counters(x.numel(), draws=2)
    assert not torch.equal(y1, y2) and layer.stream.offset.item() == 2 * reserved
    layer.eval()
    assert layer(x) is x and layer.stream.offset.item() == 2 * reserved
    layer.mc = True
    assert not torch.equal(layer(x), x)
    assert set(layer.state_dict()) == {"stream.seed", "stream.offset"}
    assert "keep=0.5" in repr(layer)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("values", [(1e300, 2e300), (0.3, 0.3)])
def test_float64_spikes_in_float64(backend, device, values):
    """Issue 9: float64 min/max and spiked values were computed in float32, so [1e300, 2e300]
    spiked to NaN and [0.3, 0.3] above its max. Every spiked value must lie in [min, max]."""
    x = torch.tensor(values, dtype=torch.float64).repeat(500).to(device)
    y = random_spike(x, 0.0, 5, 0, backend=backend).cpu()
    lo, hi = min(values), max(values)
    assert y.isfinite().all() and (y >= lo).all() and (y <= hi).all()
    assert (y != x.cpu()).any() or lo == hi
    # The value is lo + u * (hi - lo) in float64 with the contract's u (value word).
    keep_u, value_u = philox.call_spike_uniforms(torch.tensor(5), torch.tensor(0), x.numel())
    expected = (lo + value_u.double() * (hi - lo)).clamp(max=hi)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("dtype,big", [(torch.float32, 3e38), (torch.float64, 1e308)])
def test_range_wider_than_the_dtype_spikes_uniformly(backend, device, dtype, big):
    """max - min overflows: spiked values still spread over [min, max] (they were all max, or NaN
    for u = 0), as (min - u * min) + u * max."""
    x = torch.tensor([-big, big], dtype=dtype).repeat(2000).to(device)
    y = random_spike(x, 0.0, 6, 0, backend=backend).cpu()
    assert y.isfinite().all() and (y.abs() <= big).all()
    assert (y < 0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    _, value_u = philox.call_spike_uniforms(torch.tensor(6), torch.tensor(0), x.numel())
    u = value_u.to(dtype)
    assert torch.equal(y, ((-big - u * -big) + u * big).to(dtype).clamp(max=big))


def test_stream_and_default_stream_reserve_the_call():
    x = torch.randn(3, 7)  # 21 elements: 11 counters at two per counter
    s = nk.Stream(seed=4)
    y = random_spike(x, 0.5, stream=s)
    assert s.offset.item() == 11 and torch.equal(y, random_spike(x, 0.5, s.seed, 0))
    random_spike(x, 0.5, stream=s, replicas=3)  # 7 per replica: 4 counters each
    assert s.offset.item() == 11 + 12
    assert random_spike(x, 0.5).shape == x.shape  # the default stream


def test_module_per_replica_inside_replicas_block():
    layer = nk.nn.RandomSpike(keep=0.6, seed=3)
    x = torch.cat([torch.randn(2, 50), 100 + torch.randn(2, 50)])
    with nk.replicas(2):
        y = layer(x)
    assert torch.equal(y, random_spike(x, 0.6, 3, 0, replicas=2))
    assert not torch.equal(y, random_spike(x, 0.6, 3, 0))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.spike = nk.nn.RandomSpike(keep=0.8, seed=5)
        self.head = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.head(self.spike(self.conv(x)).flatten(1))


def test_compile_fullgraph_fresh_noise_each_step():
    torch.manual_seed(0)
    eager = Net()
    compiled_net = Net()
    compiled_net.load_state_dict(eager.state_dict())
    step = torch.compile(compiled_net, fullgraph=True)
    x = torch.randn(3, 1, 8, 8)
    outs = []
    for _ in range(3):
        out = step(x)
        out.sum().backward()
        outs.append(out.detach())
        torch.testing.assert_close(out, eager(x))  # conv/linear round differently under inductor
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    assert compiled_net.spike.stream.offset.item() == eager.spike.stream.offset.item()


def test_compiled_layer_is_bit_exact():
    eager, compiled = nk.nn.RandomSpike(0.8, seed=1), nk.nn.RandomSpike(0.8, seed=1)
    step = torch.compile(compiled, fullgraph=True)
    h = torch.randn(3, 4, 6, 6)
    for _ in range(2):
        assert torch.equal(step(h), eager(h))


CPU_KERNELS = pytest.mark.skipif(nk.build_info()["reference_only"], reason="needs the compiled CPU kernels")


@CPU_KERNELS
@pytest.mark.parametrize("fill", ["normal", "equal", "wide", "nonfinite"])
@pytest.mark.parametrize("rng,replicas", [("batch", 1), ("sample", 1), ("batch", 3)])
def test_cpu_float32_paths_equal_reference(fill, rng, replicas):
    """Rows of 4100 (runs inside one group: the fused path), ranges wider than float32's largest value
    (d = inf: the tile path), a group of one value (d = 0), NaN/inf units; values and mask bits."""
    x = _input((6, 4100), torch.float32, seed=3)
    if fill == "equal":
        x[:] = -0.0
    elif fill == "wide":
        x[:, 0], x[:, 1] = -3e38, 3e38
    elif fill == "nonfinite":
        x.view(-1)[[5, 700, 9000]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for offset in (2**32 - 33, 2**64 - 300):
        got, mask = random_spike(x, 0.6, 8, offset, range=rng, replicas=replicas, return_mask=True)
        expected, expected_mask = random_spike(x, 0.6, 8, offset, range=rng, replicas=replicas, return_mask=True,
                                               backend="reference")
        same = (got.view(torch.int32) == expected.view(torch.int32)) | (got.isnan() & expected.isnan())
        assert bool(same.all()) and torch.equal(mask, expected_mask)


@CPU_KERNELS
@pytest.mark.parametrize("row", [784, 785, 130, 100, 2050])
def test_cpu_float32_sample_groups_equal_reference(row):
    """range="sample": each row's whole steps from a counter and mask byte take the registers' path
    (rows of 784 and 2050), the rest the tile (rows of 785 on odd segments, of 130 off mask bytes); rows
    under two steps (100) one tile pass."""
    x = _input((7, row), torch.float32, seed=4)
    for replicas in (1, 7):
        kw = dict(range="sample", replicas=replicas, return_mask=True)
        got, mask = random_spike(x, 0.7, 12, OFFSET, **kw)
        expected, expected_mask = random_spike(x, 0.7, 12, OFFSET, backend="reference", **kw)
        assert torch.equal(got, expected) and torch.equal(mask, expected_mask)
