"""noise_add_foreach equals the loop of single-tensor noise_add calls bit for bit on every backend,
groups by dtype, and is differentiable in the tensors and the scales."""

import pytest
import torch

import noisekernels as nk
from conftest import KERNEL_BACKENDS
from noisekernels import philox
from noisekernels.functional import noise_add, noise_add_foreach


def _tensors(device):
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 3, 3, 3), (0,), (64,), (1537,), (128, 64, 3, 3), (10, 512), (7,)]
    return [torch.randn(s, generator=g).to(device) for s in shapes]


def _loop(xs, scales, seed, offset, dist):
    out, start = [], 0
    for x, s in zip(xs, scales):
        out.append(noise_add(x, s, seed, offset + start, dist=dist))
        start += philox.counters(x.numel())
    return out


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("dist", ["uniform", "laplace"])
def test_equals_the_loop_bit_for_bit(backend, device, dist):
    xs = _tensors(device)
    scales = [0.1 * (k + 1) for k in range(len(xs))]
    got = noise_add_foreach(xs, scales, 3, 2**32 - 5000, dist=dist, backend=backend)
    expected = _loop([x.cpu() for x in xs], scales, 3, 2**32 - 5000, dist)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, expected))


def test_mixed_dtypes_keep_their_counter_ranges():
    xs = [torch.randn(5, 3), torch.randn(4).double(), torch.randn(6, 2).half(), torch.randn(3).bfloat16(), torch.randn(9)]
    got = noise_add_foreach(xs, 0.5, 8, 0, dist="uniform")
    expected = _loop(xs, [0.5] * len(xs), 8, 0, "uniform")
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, expected))


def test_gaussian_equals_loop():
    xs = _tensors("cpu")
    got = noise_add_foreach(xs, 0.2, 1, 0)
    assert all(torch.equal(a, b) for a, b in zip(got, _loop(xs, [0.2] * len(xs), 1, 0, "gaussian")))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")])
def test_stream_reserves_the_loops_counters(backend, device):
    xs = _tensors(device)
    s, loop_stream = nk.Stream(seed=6).to(device), nk.Stream(seed=6).to(device)
    got = noise_add_foreach(xs, 0.3, stream=s, dist="uniform", backend=backend)
    expected = [noise_add(x, 0.3, stream=loop_stream, dist="uniform", backend=backend) for x in xs]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert s.offset.item() == loop_stream.offset.item() == sum(philox.counters(x.numel()) for x in xs)


def test_gradients():
    xs = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(5, dtype=torch.float64, requires_grad=True)]
    scales = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: noise_add_foreach([a, b], s, 4, 9), (*xs, scales))
    outs = noise_add_foreach(xs, scales, 4, 9)
    loss = sum((o * o).sum() for o in outs)
    loss.backward()
    ref = [x.detach().clone().requires_grad_() for x in xs]
    ref_scales = scales.detach().clone().requires_grad_()
    sum((noise_add(x, ref_scales[k], 4, 9 + (0 if k == 0 else 3)) ** 2).sum() for k, x in enumerate(ref)).backward()
    torch.testing.assert_close(scales.grad, ref_scales.grad)
    assert all(torch.allclose(x.grad, r.grad) for x, r in zip(xs, ref))


def test_opcheck():
    xs = [torch.randn(3, 4), torch.randn(5)]
    torch.library.opcheck(torch.ops.noisekernels.noise_add_foreach,
                          (xs, torch.tensor([0.1, 0.2]), torch.tensor(1), torch.tensor(0), [0, 3], 1))


def test_bad_arguments():
    xs = [torch.randn(3), torch.randn(2)]
    with pytest.raises(ValueError, match=r"scales must have one value per tensor \(2\), got 3"):
        noise_add_foreach(xs, [0.1, 0.2, 0.3], 0, 0)
    with pytest.raises(ValueError, match="scales must be a finite float >= 0"):
        noise_add_foreach(xs, [0.1, -0.2], 0, 0)
    with pytest.raises(ValueError, match=r"scales must be a floating tensor of shape \(2,\)"):
        noise_add_foreach(xs, torch.ones(3), 0, 0)
    with pytest.raises(TypeError, match=r"xs\[1\].dtype must be one of"):
        noise_add_foreach([torch.randn(3), torch.ones(2, dtype=torch.int64)], 0.1, 0, 0)
    assert noise_add_foreach([], 0.1, 0, 0) == []
