"""Review of the CPU's fused float32 paths (noise_add, noise_mul_sum, random_spike): their values pinned
to an independent composition of the normal fill, a scalar emulation of noise_mul_sum's fixed
summation order, and the reference; and argument checks that must not overflow int64."""

import numpy as np
import pytest
import torch

import noisekernels as nk
from noisekernels import philox
from noisekernels.ops.noise_add import noise_add
from noisekernels.ops.random_spike import random_spike

CPU_KERNELS = pytest.mark.skipif(nk.build_info()["reference_only"], reason="needs the compiled CPU kernels")


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


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
    x = _x(shape)
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
    g = _x(shape, seed=2)
    offset = 2**32 - 70
    z = nk.random.normal((g.numel(),), 4, offset, segments=segments)
    expected = _mul_sum_in_kernel_order(g, z, inner, channels)
    for n in (1, 2):
        threads(n)
        got = torch.ops.noisekernels.noise_mul_sum(g, torch.tensor(4), torch.tensor(offset), philox.GAUSSIAN, inner,
                                                   channels, segments)
        assert torch.equal(got, expected)


@CPU_KERNELS
@pytest.mark.parametrize("fill", ["normal", "equal", "wide", "nonfinite"])
@pytest.mark.parametrize("rng,replicas", [("batch", 1), ("sample", 1), ("batch", 3)])
def test_random_spike_fused_equals_reference(fill, rng, replicas):
    """Rows of 4100 (runs inside one group: the fused path), ranges wider than float32's largest value
    (d = inf: the tile path), a group of one value (d = 0), NaN/inf units; values and mask bits."""
    x = _x((6, 4100), seed=3)
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
