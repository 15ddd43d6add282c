"""Every CUDA kernel of csrc/cuda, built by g++ against the CPU emulation of the CUDA execution model
(tests/emulated_cuda.py), run on CPU tensors against its reference op: odd sizes, sizes around
block and grid boundaries, grid-stride loops (the small_grid build), one and many min/max groups,
all dtypes, counters across 2**32 and 2**64, the foreach metadata, replica_reduce with ties and NaN
rows, a Stream reservation. Each case runs in both builds with threads and blocks in order, reversed and shuffled.
Uniforms, masks and Laplace noise are bit-exact; normals within a few ulp."""

import math

import pytest
import torch

from emulated_cuda import Emulated
from noisekernels.ops.noise_add import noise_add_reference, noise_mul_reference, noise_mul_sum_reference
from noisekernels.ops.noise_add_foreach import noise_add_foreach_reference
from noisekernels.ops.random import philox4x32_reference, philox_normal_reference, philox_uniform_reference
from noisekernels.ops.random_spike import random_spike_backward_reference, random_spike_reference, unpack_mask
from noisekernels.ops.replica_reduce import replica_reduce_reference

# Each launcher (a method of Emulated, taking the reference's arguments) and the op it must match.
REFERENCES = {
    "philox4x32": philox4x32_reference,
    "philox_uniform": philox_uniform_reference,
    "philox_normal": philox_normal_reference,
    "random_spike": random_spike_reference,
    "random_spike_backward": random_spike_backward_reference,
    "noise_add": noise_add_reference,
    "noise_mul": noise_mul_reference,
    "noise_mul_sum": noise_mul_sum_reference,
    "noise_add_foreach": noise_add_foreach_reference,
    "replica_reduce": replica_reduce_reference,
}

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Around one block (256 threads), the small_grid build's 3-block grid (768) and past it.
SIZES = [1, 31, 255, 256, 257, 767, 769, 4099]
# Counters from 0, across the 32-bit word boundary, and wrapping past 2**64.
OFFSETS = [0, 2**32 - 1000, 2**64 - 700]
GAUSSIAN, UNIFORM, LAPLACE = 0, 1, 2
SCHEDULES = [("in_order", 0), ("reversed", 0), ("shuffled", 2024)]


@pytest.fixture(scope="module")
def emu():
    return {variant: Emulated(variant) for variant in ("gpu", "small_grid")}


def run(emu, name, *args):
    """The reference result of one launcher's op, and the emulated results of every build and
    schedule on the same arguments as (label, result) pairs."""
    expected = REFERENCES[name](*args)
    results = []
    for variant, lib in emu.items():
        for mode, seed in SCHEDULES:
            lib.set_schedule(mode, seed)
            results.append((f"{name} {variant} {mode}", getattr(lib, name)(*args)))
    return results, expected


def check(compare, emu, name, *args):
    results, expected = run(emu, name, *args)
    for label, got in results:
        compare(got, expected, label)


def stream(seed, offset):
    return torch.tensor(seed, dtype=torch.int64), torch.tensor(offset - 2**64 if offset >= 2**63 else offset)


def assert_bit_equal(got, expected, label):
    assert got.dtype == expected.dtype and got.shape == expected.shape, label
    assert torch.equal(got.isnan(), expected.isnan()), label
    assert torch.equal(got.nan_to_num(), expected.nan_to_num()), label


def assert_spike_equal(got, expected, label):
    """random_spike's (output, packed keep mask)."""
    assert_bit_equal(got[0], expected[0], label)
    assert got[1].dtype == torch.uint8 and torch.equal(got[1], expected[1]), label


def assert_normals_close(got, expected, label):
    # libm's logf/cosf against torch's vectorised ones: a few ulp (8 ulp of the largest normal, ~5.5).
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(expected.dtype, 4e-6)
    assert got.dtype == expected.dtype, label
    torch.testing.assert_close(got.double(), expected.double(), rtol=tol, atol=tol, msg=lambda m: f"{label}: {m}")


def noise_compare(dist):
    return assert_normals_close if dist == GAUSSIAN else assert_bit_equal


def _x(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3 + 1).to(dtype)


def test_philox4x32(emu):
    g = torch.Generator().manual_seed(1)
    for n in SIZES:
        counter = torch.randint(0, 2**32, (n, 4), generator=g, dtype=torch.int64)
        key = torch.tensor([0xDEADBEEF, 0x01234567])
        check(assert_bit_equal, emu, "philox4x32", counter, key)


def test_philox4x32_known_answer(emu):
    results, _ = run(emu, "philox4x32", torch.zeros(1, 4, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    for label, got in results:
        assert got.tolist() == [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]], label


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_uniform_and_normal_fill(emu, dtype, offset):
    seed, off = stream(0x1234_5678_9ABC, offset)
    for n in SIZES:
        check(assert_bit_equal, emu, "philox_uniform", seed, off, (n,), dtype, 1)
        check(assert_normals_close, emu, "philox_normal", seed, off, (n,), dtype, 1)
    # Segments (stream contract v2): S a multiple of 4, S odd, S = 2 mod 4, S = 1.
    for n, segments in ((4 * 257, 4), (3 * 85, 3), (2 * 1030, 2), (7, 7)):
        check(assert_bit_equal, emu, "philox_uniform", seed, off, (n,), dtype, segments)
        check(assert_normals_close, emu, "philox_normal", seed, off, (n,), dtype, segments)


# (numel, groups): one group over one to many blocks (and past the small_grid's block cap), many
# groups of odd sizes, groups smaller than a warp, groups of one element; numel off multiples of 8.
SPIKE_CASES = [(1, 1), (257, 1), (4099, 1), (70001, 1), (7 * 33, 7), (300 * 5, 300), (3 * 600, 3), (2 * 4097, 2),
               (13, 13)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel,groups", SPIKE_CASES)
def test_random_spike(emu, dtype, numel, groups):
    x = _x((groups, numel // groups), dtype)
    seed, offset = stream(77, 2**32 - 1000)
    for segments in {1, groups}:  # one segment, and one per group (odd S where the group size is odd; S = 1)
        check(assert_spike_equal, emu, "random_spike", x, 0.6, seed, offset, groups, segments)
        _, mask = random_spike_reference(x, 0.6, seed, offset, groups, segments)
        check(assert_bit_equal, emu, "random_spike_backward", _x(x.shape, dtype, seed=1), mask)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_random_spike_edge_probabilities(emu, p):
    x = _x((3, 257), torch.float32)
    seed, offset = stream(5, 0)
    results, expected = run(emu, "random_spike", x, p, seed, offset, 3, 3)
    assert torch.equal(expected[0], x) == (p == 1.0)
    assert torch.equal(unpack_mask(expected[1], x.shape), torch.full(x.shape, p == 1.0))
    for label, got in results:
        assert_spike_equal(got, expected, label)


@pytest.mark.parametrize("dtype,values", [(torch.float64, (1e300, 2e300)), (torch.float64, (0.3, 0.3)),
                                          (torch.float32, (-3e38, 3e38)), (torch.float64, (-1e308, 1e308))])
def test_random_spike_ranges_float32_cannot_hold(emu, dtype, values):
    """Issue 9: float64 min/max and values in float64; a range wider than the dtype's largest value."""
    x = torch.tensor(values, dtype=dtype).repeat(300)
    seed, offset = stream(3, 0)
    check(assert_spike_equal, emu, "random_spike", x, 0.0, seed, offset, 1, 1)


def test_random_spike_nan_inf(emu):
    x = _x((3, 300), torch.float32)
    x[0, 3], x[0, 4], x[0, 5] = math.nan, math.inf, -math.inf
    x[1] = math.nan  # no finite value in this group: spiked units become NaN
    x[2, 299] = -math.inf
    seed, offset = stream(9, 123)
    check(assert_spike_equal, emu, "random_spike", x, 0.5, seed, offset, 3, 1)


# Scale layouts as noise_add passes them: (scale shape, inner, channels) for x of shape (4, 5, 7).
NOISE_SCALES = [((1,), 1, 1), ((5,), 7, 5), ((35,), 1, 35), ((4 * 35,), 1, 4 * 35), ((4,), 35, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", [GAUSSIAN, UNIFORM, LAPLACE])
def test_noise_add_and_mul(emu, dtype, dist):
    x = _x((4, 5, 7), dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    seed, offset = stream(31, 2**32 - 300)
    for shape, inner, channels in NOISE_SCALES:
        scale = torch.rand(shape, generator=torch.Generator().manual_seed(2), dtype=acc) + 0.1
        for replicas, lo, hi in [(1, None, None), (3, None, None), (2, 0.0, 1.5)]:
            if replicas > 1 and shape[0] == 4 * 35:
                continue  # one scale per element of x: noise_add refuses replicas of it too
            for segments in {1, replicas, 2 * replicas}:  # S = 140 or 70 (2 mod 4) per segment
                check(noise_compare(dist), emu, "noise_add", x, scale, seed, offset, dist, inner, channels, replicas,
                      lo, hi, segments)
    for n in SIZES:
        check(noise_compare(dist), emu, "noise_mul", _x((n,), dtype, seed=3), seed, offset, dist, 1)
    check(noise_compare(dist), emu, "noise_mul", _x((3 * 87,), dtype, seed=3), seed, offset, dist, 3)


# noise_mul_sum: (grad shape, inner, channels, segments) for per-channel and per-row entries, one
# entry (a single run across segments), runs longer than a block's piece (4096) in several parts
# with segments inside them, a single element and an empty grad.
MUL_SUM_CASES = [((4, 5, 7), 7, 5, 1), ((4, 5, 7), 7, 5, 2), ((4, 35), 35, 4, 1), ((6, 5, 7), 1, 1, 3),
                 ((3, 2, 4099), 4099, 2, 3), ((2, 8193), 8193, 1, 2), ((1, 1), 1, 1, 1), ((0, 3), 1, 3, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", [GAUSSIAN, UNIFORM, LAPLACE])
def test_noise_mul_sum(emu, dtype, dist):
    """Sums in another order than the reference's (close), but one fixed order: every build and
    schedule gives the same bits."""
    seed, offset = stream(17, 2**64 - 700)
    for shape, inner, channels, segments in MUL_SUM_CASES:
        results, expected = run(emu, "noise_mul_sum", _x(shape, dtype, seed=4), seed, offset, dist, inner, channels,
                                segments)
        for label, got in results:
            assert got.dtype == expected.dtype and got.shape == (channels,), label
            torch.testing.assert_close(got.double(), expected.double(), rtol=1e-4, atol=1e-3,
                                       msg=lambda m: f"{label} {shape}: {m}")
            assert torch.equal(got, results[0][1]), label


# Tensor lists for the foreach metadata: empty tensors first, between and last; one tensor; odd
# sizes across block boundaries; and counter starts that are not the prefix sums.
FOREACH_LISTS = [
    ([(3, 5), (0,), (257,), (), (1, 1), (0, 3)], None),
    ([(769,)], None),
    ([(33,), (2, 300), (7,)], [1000, 5, 2**33]),
    ([(0,), (0,)], None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", [GAUSSIAN, UNIFORM, LAPLACE])
@pytest.mark.parametrize("shapes,starts", FOREACH_LISTS)
def test_noise_add_foreach(emu, dtype, dist, shapes, starts):
    xs = [_x(s, dtype, seed=i) for i, s in enumerate(shapes)]
    if starts is None:  # the counters the tensors before reserve (four elements per counter)
        starts = [sum((x.numel() + 3) // 4 for x in xs[:i]) for i in range(len(xs))]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scales = torch.linspace(0.1, 2.0, len(xs), dtype=acc)
    seed, offset = stream(8, 2**32 - 400)
    results, expected = run(emu, "noise_add_foreach", xs, scales, seed, offset, starts, dist)
    for label, got in results:
        assert len(got) == len(expected), label
        for i, (g, e) in enumerate(zip(got, expected)):
            noise_compare(dist)(g, e, f"{label} tensor {i}")


def _logits(shape, dtype, kind):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g) * 3
    if kind == "ties":  # few distinct values: argmax ties everywhere
        x = torch.randint(0, 3, shape, generator=g).float()
    elif kind == "nan":  # NaN rows, a NaN among finite logits, an all -inf row
        x[0, 0] = math.nan
        x[-1, -1, shape[2] // 2] = math.nan
        x[0, -1] = -math.inf
    return x.to(dtype)


# (n, B, C): one logit, fewer classes than lanes, more classes than a warp, more samples than the
# 8 warps of a block.
REDUCE_SHAPES = [(1, 1, 1), (3, 5, 10), (4, 9, 33), (2, 17, 70), (5, 3, 100)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "ties", "nan"])
def test_replica_reduce(emu, dtype, kind):
    for shape in REDUCE_SHAPES:
        logits = _logits(shape, dtype, kind)
        check(assert_bit_equal, emu, "replica_reduce", logits, 1)  # votes are counts: exact
        results, expected = run(emu, "replica_reduce", logits, 0)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        for label, got in results:
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{label}: {m}")


@pytest.mark.parametrize("offset", OFFSETS)
def test_offset_reserve(emu, offset):
    """The launcher returns the offset and advances it as the CPU op does (modulo 2**64 past its end)."""
    _, start = stream(0, offset)
    for variant, lib in emu.items():
        for n in (0, 1, 1000, 2**40):
            got, expected = start.clone(), start.clone()
            result = lib.offset_reserve(got, n)
            assert torch.equal(result, torch.ops.noisekernels.offset_reserve(expected, n)), variant
            assert torch.equal(result, start) and torch.equal(got, expected), variant
