"""The stream contract in pure PyTorch: Philox4x32-10 in int64 arithmetic on any device.

This is the specification every kernel is tested against (ARCHITECTURE.md section 2). Words are
int64 tensors holding values in [0, 2**32); products of two words are split so nothing overflows.
"""

import torch

MASK32 = 0xFFFFFFFF
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10
TWO_PI = 6.283185307179586
MIN_UNIFORM_FOR_LOG = 1.0e-7


def _mulhilo(a, m):
    """High and low 32-bit words of a * m, for words a (tensor) and m (int)."""
    t = a * (m & 0xFFFF)  # < 2**48
    u = a * (m >> 16)  # < 2**48
    return (u + (t >> 16)) >> 16, (((u & 0xFFFF) << 16) + t) & MASK32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of counter words (c0..c3) under key words (k0, k1); all int64 tensors."""
    for _ in range(ROUNDS):
        hi_a, lo_a = _mulhilo(c0, ROUND_A)
        hi_b, lo_b = _mulhilo(c2, ROUND_B)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + KEY_A) & MASK32
        k1 = (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def key_words(seed):
    """(k0, k1): low and high words of a 64-bit seed held in an int64 tensor."""
    return seed & MASK32, (seed >> 32) & MASK32


def words(seed, offset, n):
    """The four words of counters offset + i, i < n: the 64-bit counter split into (lo, hi, 0, 0).
    seed and offset are one-element int64 tensors on the device to compute on."""
    counter = offset.reshape(()) + torch.arange(n, device=offset.device)  # wraps like uint64
    zero = torch.zeros_like(counter)
    k0, k1 = key_words(seed.reshape(()))
    return philox4x32_10(counter & MASK32, (counter >> 32) & MASK32, zero, zero, k0, k1)


def uniform_from_word(w):
    """U(w): w as int32 s; s = ~s when negative; float32(s) * 4.6566127342e-10."""
    s = torch.where(w >= 2**31, MASK32 - w, w)  # ~s of the negative int32, as a non-negative int
    return s.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=w.device)


_LOG_COEFFS = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
               -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)


def exact_log(x):
    """The kernels' exact_log (philox.h): Cephes logf from float32 + - * and bit operations, so it
    rounds identically on every backend. For positive normal float32 x."""
    bits = x.view(torch.int32).to(torch.int64) & MASK32
    e = ((bits >> 23) & 0xFF) - 126
    m = ((bits & 0x807FFFFF) | 0x3F000000).to(torch.int32).view(torch.float32)
    small = m < 0.707106781186547524
    e = e - small.long()
    m = torch.where(small, m + m - 1.0, m - 1.0)
    z = m * m
    y = torch.full_like(m, _LOG_COEFFS[0])
    for c in _LOG_COEFFS[1:]:
        y = y * m + c
    y = y * m * z
    fe = e.to(torch.float32)
    y = y + -2.12194440e-4 * fe
    y = y + -0.5 * z
    return (m + y) + 0.693359375 * fe


def laplace_from_uniform(u):
    """Standard Laplace from U(w0): -sign(u - 1/2) * log(max(1e-7, 1 - 2|u - 1/2|))."""
    c = u - 0.5
    a = c.abs()
    t = (1.0 - (a + a)).clamp_min(MIN_UNIFORM_FOR_LOG)
    lg = exact_log(t)
    return torch.where(c < 0, lg, -lg)


GAUSSIAN, UNIFORM, LAPLACE = 0, 1, 2
# Version 2 of the contract: all four words of a counter, replica-aligned segments.
ONE_DRAW, TWO_DRAWS = 1, 2  # words per element: uniform/normal/noise, Random Spiking
_ELEMENTS_PER_COUNTER = {ONE_DRAW: 4, TWO_DRAWS: 2}


def _check_draws(draws):
    if draws not in _ELEMENTS_PER_COUNTER:
        raise ValueError(f"draws must be 1 (one word per element) or 2 (Random Spiking), got {draws!r}")
    return _ELEMENTS_PER_COUNTER[draws]


def check_segments(numel, segments, name="segments"):
    """segments as an int >= 1 dividing numel (any segment count divides an empty call)."""
    if isinstance(segments, bool) or not isinstance(segments, (int, torch.SymInt)) or segments < 1:
        raise ValueError(f"{name} must be an int >= 1, got {segments!r}")
    if numel % segments:
        raise ValueError(f"{name}={segments} must divide the number of elements {numel}")
    return segments


def counters(numel, segments=1, draws=ONE_DRAW):
    """The counters a call over `numel` elements in `segments` equal segments reserves: each
    segment starts on a fresh counter and packs 4 elements (draws=1) or 2 (draws=2) per counter.
    The one place a reservation is computed (modules, functional ops, the engine)."""
    per = _check_draws(draws)
    check_segments(numel, segments)
    size = numel // segments
    return segments * ((size + per - 1) // per)


def call_words(seed, offset, numel, segments, draws):
    """The four words (w0, w1, w2, w3) of each element's counter and each element's lane: element
    j of segment k is lane j % per of counter offset + k * ceil(S / per) + j // per."""
    per = _check_draws(draws)
    size = max(numel // segments, 1)
    ws = words(seed, offset, counters(numel, segments, draws))
    i = torch.arange(numel, device=offset.device)
    k, j = i // size, i % size
    index = k * ((size + per - 1) // per) + j // per
    return tuple(w[index] for w in ws), j % per


def _pick(ws, index):
    return torch.stack(ws).gather(0, index.unsqueeze(0)).squeeze(0)


def call_uniforms(seed, offset, numel, segments=1):
    """U(word j mod 4) of every element (one draw per element)."""
    ws, lane = call_words(seed, offset, numel, segments, ONE_DRAW)
    return uniform_from_word(_pick(ws, lane))


def call_normals(seed, offset, numel, segments=1):
    """The Box-Muller normals of every element: lanes 0, 1 are (cos, sin) of (w0, w1), lanes 2, 3
    (cos, sin) of (w2, w3): Triton's tl.randn4x."""
    ws, lane = call_words(seed, offset, numel, segments, ONE_DRAW)
    pair = lane // 2 * 2
    u0 = uniform_from_word(_pick(ws, pair)).clamp_min(MIN_UNIFORM_FOR_LOG)
    theta = uniform_from_word(_pick(ws, pair + 1)) * torch.tensor(TWO_PI, dtype=torch.float32, device=seed.device)
    r = torch.sqrt(-2.0 * torch.log(u0))
    return torch.where(lane % 2 == 0, r * torch.cos(theta), r * torch.sin(theta))


def call_noise(dist, seed, offset, numel, segments=1):
    """eps of every element: N(0, 1), U(-1, 1) or Laplace(0, 1), float32."""
    if dist == GAUSSIAN:
        return call_normals(seed, offset, numel, segments)
    u = call_uniforms(seed, offset, numel, segments)
    return (u + u) - 1.0 if dist == UNIFORM else laplace_from_uniform(u)


def call_spike_uniforms(seed, offset, numel, segments=1):
    """(keep, value) uniforms of every element of a two-draw call: (w0, w1) for even j, (w2, w3)
    for odd j."""
    ws, lane = call_words(seed, offset, numel, segments, TWO_DRAWS)
    return uniform_from_word(_pick(ws, 2 * lane)), uniform_from_word(_pick(ws, 2 * lane + 1))
