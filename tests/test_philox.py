"""The stream contract (version 2): Philox4x32-10 known answers and uniform/normal fills on every
backend, checked against the pure-PyTorch reference and Triton's own tl.randint4x / tl.rand4x /
tl.randn4x, with replica segments."""

import math

import pytest
import torch
import triton
import triton.language as tl

import noisekernels as nk
from conftest import HAS_CUDA, KERNEL_BACKENDS
from noisekernels import philox, random

# Random123's kat_vectors for philox4x32_10: (counter, key, expected words).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
ORACLE_DEVICE = "cuda" if HAS_CUDA else "cpu"
SEEDS = [0, 1, 0x0123456789ABCDEF, 2**63 + 5, 2**64 - 1]
# Offsets whose counters cross 2**32 (carry into the high word), 2**63 and 2**64 (wrap to 0).
OFFSETS = [0, 12345, 2**32 - 700, 2**63 - 100, 2**64 - 300]
SIZES = [0, 1, 7, 47, 48, 49, 1537, 4099, (3, 5, 7), (2, 0, 3)]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@triton.jit
def _oracle_kernel(words_ptr, uniform_ptr, normal_ptr, seed, offset_ptr, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < n
    counter = tl.load(offset_ptr) + idx
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    for j, w in enumerate((w0, w1, w2, w3)):
        tl.store(words_ptr + 4 * idx + j, w.to(tl.uint32, bitcast=True).to(tl.int64), mask=mask)
    u0, u1, u2, u3 = tl.rand4x(seed, counter)
    for j, u in enumerate((u0, u1, u2, u3)):
        tl.store(uniform_ptr + 4 * idx + j, u, mask=mask)
    z0, z1, z2, z3 = tl.randn4x(seed, counter)
    for j, z in enumerate((z0, z1, z2, z3)):
        tl.store(normal_ptr + 4 * idx + j, z, mask=mask)


def oracle(seed, offset, n):
    """Triton's own generator for n counters from offset: (words (n, 4), tl.rand4x and tl.randn4x
    flattened, i.e. the contract's one-segment fills of 4n elements)."""
    words = torch.empty(n, 4, dtype=torch.int64, device=ORACLE_DEVICE)
    u = torch.empty(4 * n, device=ORACLE_DEVICE)
    z = torch.empty(4 * n, device=ORACLE_DEVICE)
    off = torch.tensor(offset - 2**64 if offset >= 2**63 else offset, device=ORACLE_DEVICE)
    if n:
        seed_arg = seed - 2**64 if seed >= 2**63 else seed  # passed as a 64-bit integer
        _oracle_kernel[(triton.cdiv(n, 256),)](words, u, z, seed_arg, off, n, BLOCK=256)
    return words.cpu(), u.cpu(), z.cpu()


def oracle_fill(seed, offset, numel, segments, normal=False):
    """The contract's fill built segment by segment from Triton's generator: segment k is a flat
    fill from counter offset + k * ceil(S / 4)."""
    size = numel // segments
    per_segment = -(-size // 4)
    parts = [oracle(seed, (offset + k * per_segment) % 2**64, per_segment)[2 if normal else 1][:size]
             for k in range(segments)]
    return torch.cat(parts) if parts else torch.empty(0)


def t64(value, device="cpu"):
    return torch.tensor(value - 2**64 if value >= 2**63 else value, dtype=torch.int64, device=device)


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_known_answers_reference(counter, key, expected):
    got = random.philox4x32(torch.tensor([counter]), torch.tensor(key), backend="reference")
    assert got[0].tolist() == list(expected)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_known_answers_kernels(backend, device, counter, key, expected):
    got = random.philox4x32(torch.tensor([counter] * 3, device=device), torch.tensor(key, device=device),
                            backend=backend)
    assert got.cpu().tolist() == [list(expected)] * 3


def test_reference_words_equal_triton_randint4x():
    for seed in SEEDS:
        for offset in OFFSETS:
            w = philox.words(t64(seed), t64(offset), 1000)
            expected, _, _ = oracle(seed, offset, 1000)
            assert torch.equal(torch.stack(w, dim=-1), expected), (seed, offset)


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernel", id="kernel")])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_uniform_equals_triton_rand4x(backend, seed, offset):
    expected = oracle(seed, offset, 751)[1][:3001]
    be = "reference" if backend == "reference" else None
    got = random.uniform(3001, seed, offset, backend=be)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_uniform_kernels_equal_reference(backend, device, size, offset):
    seed = 0x9E3779B97F4A7C15
    expected = random.uniform(size, seed, offset, backend="reference")
    got = random.uniform(size, seed, offset, device=device, backend=backend)
    assert got.device.type == device and got.shape == expected.shape
    assert torch.equal(got.cpu(), expected)


# (numel, segments): S a multiple of 4, S not a multiple of 4 (odd, 2 mod 4), S = 1, empty.
SEGMENTED = [(48, 4), (21, 3), (3 * 4098, 3), (7, 7), (4099 * 2, 2), (0, 5)]


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("numel,segments", SEGMENTED)
def test_segmented_fill_equals_triton_per_segment(backend, device, numel, segments):
    """Each segment starts on a fresh counter: the call equals flat Triton fills at
    offset + k * ceil(S / 4)."""
    got = random.uniform(numel, 11, 2**32 - 9, segments=segments, device=device, backend=backend).cpu()
    assert torch.equal(got, oracle_fill(11, 2**32 - 9, numel, segments))
    z = random.normal(numel, 11, 2**32 - 9, segments=segments, device=device, backend=backend).cpu()
    torch.testing.assert_close(z, oracle_fill(11, 2**32 - 9, numel, segments, normal=True), rtol=2e-6, atol=4e-6)


@pytest.mark.parametrize("fill", [random.uniform, random.normal])
@pytest.mark.parametrize("numel,segments", SEGMENTED)
def test_segmented_fill_equals_separate_calls_on_one_stream(fill, numel, segments):
    """A batched call over s segments draws exactly what s calls on one stream draw."""
    batched = fill(numel, stream=nk.Stream(seed=3), segments=segments)
    loop_stream = nk.Stream(seed=3)
    loop = [fill(numel // segments, stream=loop_stream) for _ in range(segments)]
    assert torch.equal(batched, torch.cat(loop) if loop else torch.empty(0))


def test_counters_is_the_reservation_of_a_call():
    assert philox.counters(0) == 0 and philox.counters(1) == 1 and philox.counters(4) == 1
    assert philox.counters(5) == 2 and philox.counters(21, 3) == 6 and philox.counters(21, 3, draws=2) == 12
    assert philox.counters(7, 7) == 7 and philox.counters(7, 7, draws=2) == 7 and philox.counters(0, 5) == 0
    s = nk.Stream(seed=1)
    random.uniform((), stream=s)  # a 0-dim tensor: one element, one counter
    random.normal((3, 7), stream=s, segments=3)
    assert s.offset.item() == 1 + 3 * 2
    with pytest.raises(ValueError, match="segments=2 must divide the number of elements 7"):
        philox.counters(7, 2)
    with pytest.raises(ValueError, match="draws must be 1"):
        philox.counters(8, 1, draws=3)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_uniform_dtypes_bit_exact(backend, device, dtype):
    expected = random.uniform(5003, 77, 2**32 - 2000, backend="reference").to(dtype)
    got = random.uniform(5003, 77, 2**32 - 2000, dtype=dtype, device=device, backend=backend)
    assert got.dtype == dtype
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("offset", OFFSETS)
def test_normal_within_few_ulp_of_triton_randn4x(backend, device, offset):
    expected = oracle(7, offset, 5003)[2][:20011]
    got = random.normal(20011, 7, offset, device=device, backend=backend).cpu()
    # Transcendentals differ by a few ulp between libm, libmvec, CUDA and numpy; the largest normal
    # here is about 5.5, so 8 ulp of it is under 4e-6.
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=4e-6)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_normal_dtypes(backend, device, dtype):
    expected = random.normal((31, 33), 5, 99, backend="reference").to(torch.float64)
    got = random.normal((31, 33), 5, 99, dtype=dtype, device=device, backend=backend)
    assert got.dtype == dtype
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype, 4e-6)
    torch.testing.assert_close(got.cpu().double(), expected, rtol=tol, atol=tol)


def _box_muller_float64(uniforms):
    """The contract's normals of uniforms (four per counter) in float64: u = max(U, 1e-7) and
    theta = 2pi U rounded in float32 as the contract has them, then r cos theta, r sin theta exactly."""
    first, second = uniforms.view(-1, 2).unbind(1)
    u = first.clamp_min(philox.MIN_UNIFORM_FOR_LOG).double()
    theta = (second * torch.tensor(philox.TWO_PI, dtype=torch.float32)).double()
    r = torch.sqrt(-2.0 * torch.log(u))
    return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1).flatten()


def _ulps(got, exact):
    """|got - exact| in units of the last place of exact rounded to float32."""
    _, exponent = torch.frexp(exact.float())
    return (got.double() - exact).abs() / torch.ldexp(torch.ones_like(exact), exponent - 24)


# Bound on the CPU normals' error. Measured: 2.92 ulp over the 4M normals below, 3.07 over 16M;
# the AVX-512 path's -2 ln u, sin and cos are within 1.0, 1.5 and 1.5 ulp over every uniform of
# the contract (csrc/cpu/vector_math.h), the portable path (libm) reaches 2.35 ulp and the
# reference's float32 torch ops 2.71.
NORMAL_ULPS = 4.0


def test_cpu_normals_within_4_ulp_of_float64_box_muller():
    n = 1 << 20  # 4M normals
    got = random.normal(4 * n, 7, 2**32 - 99, backend="cpu")
    exact = _box_muller_float64(random.uniform(4 * n, 7, 2**32 - 99, backend="reference"))
    assert _ulps(got, exact).max().item() <= NORMAL_ULPS


def _float32_ulp(x):
    return 2.0 ** (math.frexp(x)[1] - 24)


# Box-Muller's hard inputs, as predicates of a pair's (first uniform, theta).
HARD_CASES = {
    "u = 0, clamped to 1e-7": lambda u, theta: u == 0,
    "0 < u < 1e-7, clamped": lambda u, theta: 0 < u < philox.MIN_UNIFORM_FOR_LOG,
    "u = 1 - 2**-24, the largest uniform": lambda u, theta: u == 1 - 2**-24,
    "theta = 0": lambda u, theta: theta == 0,
    "theta just below 2pi": lambda u, theta: 0 < 2 * math.pi - theta < _float32_ulp(theta),
    # The floats nearest pi/2, pi and 3pi/2, where cos or sin cancels to tiny values.
    "theta within 0.4 ulp of pi/2": lambda u, theta: abs(theta - math.pi / 2) < 0.4 * _float32_ulp(theta),
    "theta within 0.4 ulp of pi": lambda u, theta: abs(theta - math.pi) < 0.4 * _float32_ulp(theta),
    "theta within 0.03 ulp of 3pi/2": lambda u, theta: abs(theta - 1.5 * math.pi) < 0.03 * _float32_ulp(theta),
}
# Counters of seed 7 holding them, found by scanning 2**32 counters: (counter, lane of the
# pair's first element, case); the test checks each still is its case.
HARD_NORMAL_COUNTERS = [
    (1329654589, 0, "u = 0, clamped to 1e-7"),
    (6107189, 2, "0 < u < 1e-7, clamped"),
    (8263248, 0, "u = 1 - 2**-24, the largest uniform"),
    (1092467968, 2, "theta = 0"),
    (67407885, 2, "theta just below 2pi"),
    (30382855, 0, "theta within 0.4 ulp of pi/2"),
    (9569251, 2, "theta within 0.4 ulp of pi"),
    (2187065, 0, "theta within 0.03 ulp of 3pi/2"),
]


@pytest.mark.parametrize("counter,lane,case", HARD_NORMAL_COUNTERS)
def test_cpu_normals_within_4_ulp_on_hard_inputs(counter, lane, case):
    uniforms = random.uniform(4, 7, counter, backend="reference")
    theta = (uniforms[lane + 1] * torch.tensor(philox.TWO_PI, dtype=torch.float32)).item()
    assert HARD_CASES[case](uniforms[lane].item(), theta), f"counter {counter} is no longer the case {case!r}"
    got = random.normal(4, 7, counter, backend="cpu")
    assert _ulps(got, _box_muller_float64(uniforms)).max().item() <= NORMAL_ULPS


@pytest.mark.parametrize("fill", [random.uniform, random.normal])
def test_cpu_result_independent_of_thread_count(fill, threads):
    n = 1_000_003  # several tiles per thread and an odd tail
    threads(1)
    one = fill(n, 42, 2**32 - 99)
    threads(2)
    two = fill(n, 42, 2**32 - 99)
    assert torch.equal(one, two)


@pytest.mark.parametrize("fill", [random.uniform, random.normal])
def test_fill_is_the_concatenation_of_its_parts(fill):
    """Counters are positions: a fill of a + b (a a multiple of 4) equals fills of a and b at
    consecutive reservations."""
    whole = fill(10_001, 3, 2**32 - 5000)
    parts = torch.cat([fill(3332, 3, 2**32 - 5000), fill(6669, 3, 2**32 - 5000 + philox.counters(3332))])
    assert torch.equal(whole, parts)


def test_different_offsets_and_seeds_differ():
    base = random.uniform(4096, 1, 0)
    assert not torch.equal(base, random.uniform(4096, 1, 1))
    assert not torch.equal(base, random.uniform(4096, 2, 0))
    # A shifted offset is the same sequence shifted by a counter's four elements.
    assert torch.equal(base[4:], random.uniform(4092, 1, 1))


def _ks_statistic(sorted_samples, cdf):
    n = sorted_samples.numel()
    f = cdf(sorted_samples.double())
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return torch.maximum(i / n - f, f - (i - 1) / n).max().item()


def test_uniform_statistics_1e7():
    n = 10_000_000
    u = random.uniform(n, 2024, 0).double()
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(u.var().item() - 1 / 12) < 5 * (1 / 180 / n) ** 0.5  # var of (u - 1/2)^2 is 1/180
    # Kolmogorov-Smirnov: 1.95 / sqrt(n) is the 0.1% critical value.
    assert _ks_statistic(u.sort().values, lambda x: x) < 1.95 / n**0.5


def test_normal_statistics_1e7():
    n = 10_000_000
    z = random.normal(n, 2025, 0).double()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
    phi = lambda x: 0.5 * (1 + torch.special.erf(x / 2**0.5))  # noqa: E731
    assert _ks_statistic(z.sort().values, phi) < 1.95 / n**0.5


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="size must be non-negative"):
        random.uniform((3, -1), 0, 0)
    with pytest.raises(TypeError, match="size must be an int"):
        random.uniform(2.5, 0, 0)
    with pytest.raises(TypeError, match="seed must be an int"):
        random.uniform(4, 1.5, 0)
    with pytest.raises(TypeError, match="seed must be an int.*float32 tensor"):
        random.uniform(4, torch.tensor(1.0), 0)
    with pytest.raises(ValueError, match="seed must hold exactly one element"):
        random.uniform(4, torch.tensor([1, 2]), 0)
    with pytest.raises(ValueError, match=r"offset must be in \[0, 2\*\*64\)"):
        random.uniform(4, 0, 2**64)
    with pytest.raises(ValueError, match=r"offset must be in \[0, 2\*\*64\)"):
        random.uniform(4, 0, -1)
    with pytest.raises(TypeError, match="dtype must be one of"):
        random.uniform(4, 0, 0, dtype=torch.int32)
    with pytest.raises(ValueError, match="seed and offset must be on one device"):
        random.uniform(4, torch.tensor(0, device="meta"), torch.tensor(0))
    with pytest.raises(ValueError, match="device is meta but seed/offset tensors are on cpu"):
        random.uniform(4, torch.tensor(0), 0, device="meta")
    with pytest.raises(ValueError, match="backend must be one of"):
        random.uniform(4, 0, 0, backend="numpy")
    with pytest.raises(ValueError, match="backend='cuda' runs on cuda tensors"):
        random.uniform(4, 0, 0, backend="cuda")
    with pytest.raises(TypeError, match="counter must be an int64 tensor"):
        random.philox4x32(torch.zeros(1, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"counter must have shape \(..., 4\)"):
        random.philox4x32(torch.zeros(1, 3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="segments must be an int >= 1"):
        random.uniform(4, 0, 0, segments=0)
    with pytest.raises(ValueError, match="segments=3 must divide the number of elements 4"):
        random.normal(4, 0, 0, segments=3)
    with pytest.raises(ValueError, match="pass either seed and offset or stream"):
        random.uniform(4, 0, 0, stream=nk.Stream(seed=1))
    with pytest.raises(ValueError, match="seed and offset must be given together"):
        random.uniform(4, 0)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("name,bad", [("counter", 2**32), ("counter", -1), ("key", 2**32 + 5), ("key", -7)])
def test_philox4x32_rejects_words_outside_32_bits(backend, device, name, bad):
    """Issue 9: words outside 32 bits made backends disagree; now every backend gets a clear error."""
    counter = torch.zeros(2, 4, dtype=torch.int64, device=device)
    key = torch.zeros(2, dtype=torch.int64, device=device)
    (counter.view(-1) if name == "counter" else key)[1] = bad
    with pytest.raises(ValueError, match=rf"{name} words must be in \[0, 2\*\*32\)"):
        random.philox4x32(counter, key, backend=backend)


def test_philox4x32_op_rejects_words_outside_32_bits():
    with pytest.raises(RuntimeError, match=r"counter words must be in \[0, 2\*\*32\)"):
        torch.ops.noisekernels.philox4x32(torch.full((1, 4), 2**32), torch.zeros(2, dtype=torch.int64))


def test_op_level_checks_name_the_argument():
    """Calling torch.ops directly (as compiled graphs do) still gets checked arguments."""
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor"):
        torch.ops.noisekernels.philox_uniform(torch.tensor(1.0), torch.tensor(0), [4], torch.float32, 1)
    with pytest.raises(RuntimeError, match="offset must hold exactly one element"):
        torch.ops.noisekernels.philox_uniform(torch.tensor(1), torch.zeros(2, dtype=torch.int64), [4], torch.float32, 1)
    with pytest.raises(RuntimeError, match="dtype must be float32, float64, float16 or bfloat16"):
        torch.ops.noisekernels.philox_uniform(torch.tensor(1), torch.tensor(0), [4], torch.int64, 1)
    with pytest.raises(RuntimeError, match="segments must be >= 1 and divide the number of elements 4, got 3"):
        torch.ops.noisekernels.philox_normal(torch.tensor(1), torch.tensor(0), [4], torch.float32, 3)


@pytest.mark.parametrize("op", ["philox_uniform", "philox_normal"])
def test_opcheck(op):
    seed, offset = torch.tensor(5), torch.tensor(2**32 - 3)
    torch.library.opcheck(getattr(torch.ops.noisekernels, op), (seed, offset, [3, 5], torch.float32, 3))


def test_default_stream_reads_torch_rng_once_and_reserves_per_call():
    """Functional calls without seed/offset draw from the library's default stream of the device:
    torch's global RNG is read once (at creation), and every call advances the stream by exactly
    its reservation, so two calls never reuse noise."""
    from noisekernels.ops import _streams
    saved = _streams._root_seed, dict(_streams._default_streams)
    _streams._root_seed = None
    _streams._default_streams.clear()
    try:
        torch.manual_seed(0)
        a = random.uniform(10)
        state = torch.get_rng_state()
        b = random.normal((2, 5), segments=2)
        c = random.uniform(10)
        assert torch.equal(torch.get_rng_state(), state)
        stream = _streams.default_stream("cpu")
        assert stream is _streams.default_stream(None)
        assert stream.offset.item() == philox.counters(10) + philox.counters(10, 2) + philox.counters(10)
        assert torch.equal(c, random.uniform(10, stream.seed, philox.counters(10) + philox.counters(10, 2)))
        assert not torch.equal(a, c) and b.shape == (2, 5)
    finally:
        _streams._root_seed, _streams._default_streams = saved[0], saved[1]
