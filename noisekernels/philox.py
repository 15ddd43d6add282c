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


def normal_from_words(w0, w1):
    """Box-Muller, cosine branch: sqrt(-2 ln max(1e-7, U(w0))) * cos(2 pi U(w1)), in float32."""
    u0 = uniform_from_word(w0).clamp_min(MIN_UNIFORM_FOR_LOG)
    theta = uniform_from_word(w1) * torch.tensor(TWO_PI, dtype=torch.float32, device=w0.device)
    return torch.sqrt(-2.0 * torch.log(u0)) * torch.cos(theta)
