"""Helpers shared by the Triton kernels."""

import triton
import triton.language as tl


@triton.jit
def _bfloat16_rne(value):
    """float32 -> bfloat16, round to nearest even in integer bits (torch's c10::BFloat16 rule):
    Triton's interpreter truncates or rounds half up, so the cast is not left to it."""
    bits = value.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(value != value, 0x7FC0, rounded)  # NaN stays a quiet NaN
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def round_to(value, dtype: tl.constexpr):
    """float32 `value` in `dtype`, rounded to nearest even like torch and the C++ kernels."""
    if dtype == tl.bfloat16:
        return _bfloat16_rne(value)
    else:
        return value.to(dtype)


@triton.jit
def store_float(ptr, value, mask):
    """Stores float32 `value` in ptr's dtype (round_to)."""
    tl.store(ptr, round_to(value, ptr.dtype.element_ty), mask=mask)


@triton.jit
def exact_log(x):
    """philox.h's exact_log: Cephes logf from + - * and bit operations, bit-identical to the C++."""
    bits = x.to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF).to(tl.int32) - 126
    m = ((bits & 0x807FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = m < 0.707106781186547524
    e = tl.where(small, e - 1, e)
    m = tl.where(small, m + m - 1.0, m - 1.0)
    z = m * m
    y = m * 7.0376836292e-2 + -1.1514610310e-1
    y = y * m + 1.1676998740e-1
    y = y * m + -1.2420140846e-1
    y = y * m + 1.4249322787e-1
    y = y * m + -1.6668057665e-1
    y = y * m + 2.0000714765e-1
    y = y * m + -2.4999993993e-1
    y = y * m + 3.3333331174e-1
    y = y * m * z
    fe = e.to(tl.float32)
    y = y + -2.12194440e-4 * fe
    y = y + -0.5 * z
    return (m + y) + 0.693359375 * fe


@triton.jit
def laplace(u):
    """Standard Laplace from a uniform: -sign(u - 1/2) * log(max(1e-7, 1 - 2|u - 1/2|))."""
    c = u - 0.5
    a = tl.abs(c)
    t = 1.0 - (a + a)
    t = tl.where(t < 1.0e-7, 1.0e-7, t)
    lg = exact_log(t)
    return tl.where(c < 0.0, lg, -lg)


@triton.jit
def noise_eps4(DIST: tl.constexpr, seed, counter):
    """The four eps of a counter (its elements 4j .. 4j+3) for noise_add's distribution DIST (0
    gaussian: tl.randn4x, 1 uniform(-1, 1), 2 laplace)."""
    if DIST == 0:
        e0, e1, e2, e3 = tl.randn4x(seed, counter)
    else:
        u0, u1, u2, u3 = tl.rand4x(seed, counter)
        if DIST == 1:
            e0, e1, e2, e3 = (u0 + u0) - 1.0, (u1 + u1) - 1.0, (u2 + u2) - 1.0, (u3 + u3) - 1.0
        else:
            e0, e1, e2, e3 = laplace(u0), laplace(u1), laplace(u2), laplace(u3)
    return e0, e1, e2, e3


@triton.jit
def segment_elements(c, size, per_segment, PER: tl.constexpr):
    """For counter index c of a call (counters from its offset), the flat index of its first
    element and the position of that element in its segment: segment k = c // per_segment starts
    at element k * size, and its counter jj holds elements PER * jj ..."""
    k = c // per_segment
    j = (c - k * per_segment) * PER
    return k * size + j, j
