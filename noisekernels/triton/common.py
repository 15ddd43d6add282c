"""Helpers shared by the Triton kernels."""

import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal


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
def noise_eps(DIST: tl.constexpr, seed, counter):
    """eps of noise_add's distribution DIST (0 gaussian, 1 uniform(-1, 1), 2 laplace) per counter."""
    u0, u1, _, _ = tl.rand4x(seed, counter)
    if DIST == 0:
        eps, _ = pair_uniform_to_normal(u0, u1)
    elif DIST == 1:
        eps = (u0 + u0) - 1.0
    else:
        c = u0 - 0.5
        a = tl.abs(c)
        t = 1.0 - (a + a)
        t = tl.where(t < 1.0e-7, 1.0e-7, t)
        lg = exact_log(t)
        eps = tl.where(c < 0.0, lg, -lg)
    return eps
