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
