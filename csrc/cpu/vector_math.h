// 16-lane AVX-512 log and sincos for the Box-Muller normals (ARCHITECTURE.md section 2).
// Narrower than libm (libmvec) on purpose, and about twice as fast: minus_two_log16 takes
// positive normal floats, sincos16 angles in [0, 2pi], so neither needs special-case or
// huge-argument paths, and sin and cos share one range reduction. Over every uniform of the
// contract, -2 ln u, sin and cos are within 1.0, 1.5 and 1.5 ulp of the exact values
// (checked exhaustively against double precision; tests/test_philox.py checks the normals).
#pragma once
#include <immintrin.h>

namespace noisekernels::cpu {

// -2 ln x for normal x > 0 (the Box-Muller r^2), from Cephes logf: x = 2^e m with m in
// [sqrt(1/2), sqrt(2)), f = m - 1, ln x = e ln2 + f - f^2/2 + f^3 P(f). In g = -2f = 2 - 2m
// (exact): -2 ln x = -2 e ln2 + g + g^2 (1/4 + g Q(g)) with Q(g) = P(-g/2) / 4, whose
// coefficients are Cephes' times powers of two, so no rounding is added by the rewrite.
__attribute__((always_inline)) inline __m512 minus_two_log16(__m512 x) {
  const __m512i sqrt_half = _mm512_set1_epi32(0x3f3504f3);  // bits of sqrt(1/2)
  const __m512i ix = _mm512_sub_epi32(_mm512_castps_si512(x), sqrt_half);
  const __m512 e = _mm512_cvtepi32_ps(_mm512_srai_epi32(ix, 23));
  const __m512 m = _mm512_castsi512_ps(
      _mm512_add_epi32(_mm512_and_si512(ix, _mm512_set1_epi32(0x007fffff)), sqrt_half));
  const __m512 two = _mm512_set1_ps(2.0f);
  const __m512 g = _mm512_fnmadd_ps(two, m, two);
  // Q(g) by Estrin (shorter dependency chains than Horner, measurably faster here).
  const __m512 g2 = _mm512_mul_ps(g, g), g4 = _mm512_mul_ps(g2, g2);
  auto lin = [&](float c1, float c0) {
    return _mm512_fmadd_ps(_mm512_set1_ps(c1), g, _mm512_set1_ps(c0));
  };
  const __m512 a01 = lin(0x1.555554p-4f, 0.25f), a23 = lin(0x1.999d58p-7f, 0x1.fffff8p-6f);
  const __m512 a45 = lin(0x1.23d37ep-9f, 0x1.555ca0p-8f), a67 = lin(0x1.de4a34p-12f, 0x1.fcba9ep-11f);
  const __m512 a89 = lin(0x1.204376p-14f, 0x1.d7a370p-13f);
  const __m512 a03 = _mm512_fmadd_ps(a23, g2, a01), a47 = _mm512_fmadd_ps(a67, g2, a45);
  const __m512 a07 = _mm512_fmadd_ps(a47, g4, a03);
  const __m512 q = _mm512_fmadd_ps(_mm512_mul_ps(g4, g4), a89, a07);
  const __m512 log1p_part = _mm512_fmadd_ps(g2, q, g);
  // -2 ln2 as one float: e >= -24 here, so its error adds under 0.1 ulp.
  return _mm512_fmadd_ps(e, _mm512_set1_ps(-0x1.62e430p+0f), log1p_part);
}

// sin t and cos t for t in [0, 2pi] (and somewhat beyond): t = k pi/2 + y with |y| <= pi/4,
// y by a three-part Cody-Waite reduction (the first step is exact, so y keeps its relative
// accuracy even next to a multiple of pi/2), Cephes sinf/cosf polynomials on y, then the
// quadrant k mod 4 swaps and negates them.
__attribute__((always_inline)) inline void sincos16(__m512 t, __m512* sin_t, __m512* cos_t) {
  // k = round(t 2/pi) in one rounding: adding 1.5 * 2^23 leaves k in the low mantissa bits.
  const __m512 magic = _mm512_set1_ps(0x1.8p+23f);
  const __m512 shifted = _mm512_fmadd_ps(t, _mm512_set1_ps(0x1.45f306p-1f), magic);  // 2/pi
  const __m512 k = _mm512_sub_ps(shifted, magic);
  __m512 y = _mm512_fnmadd_ps(k, _mm512_set1_ps(0x1.921fb6p+0f), t);  // pi/2 in three floats
  y = _mm512_fnmadd_ps(k, _mm512_set1_ps(-0x1.777a5cp-25f), y);
  y = _mm512_fnmadd_ps(k, _mm512_set1_ps(-0x1.ee59dap-50f), y);
  const __m512 z = _mm512_mul_ps(y, y);
  // sin y = y + y z (s1 + z (s2 + z s3)).
  __m512 ps = _mm512_fmadd_ps(_mm512_set1_ps(-1.9515295891e-4f), z, _mm512_set1_ps(8.3321608736e-3f));
  ps = _mm512_fmadd_ps(ps, z, _mm512_set1_ps(-1.6666654611e-1f));
  const __m512 s = _mm512_fmadd_ps(_mm512_mul_ps(y, z), ps, y);
  // cos y = 1 + z (-1/2 + z (c1 + z (c2 + z c3))).
  __m512 pc = _mm512_fmadd_ps(_mm512_set1_ps(2.443315711809948e-5f), z,
                              _mm512_set1_ps(-1.388731625493765e-3f));
  pc = _mm512_fmadd_ps(pc, z, _mm512_set1_ps(4.166664568298827e-2f));
  pc = _mm512_fmadd_ps(pc, z, _mm512_set1_ps(-0.5f));
  const __m512 c = _mm512_fmadd_ps(pc, z, _mm512_set1_ps(1.0f));
  // Quadrant q = k mod 4 (the low bits of `shifted`): odd q swaps sin and cos; sin is negated
  // for q = 2, 3 and cos for q = 1, 2, i.e. by bit 1 of q and of q + 1, moved to the sign bit.
  const __m512i q = _mm512_castps_si512(shifted);
  const __mmask16 odd = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1));
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i sin_flip = _mm512_slli_epi32(q, 30);
  const __m512i cos_flip = _mm512_slli_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(1)), 30);
  // 0x78: a ^ (b & c).
  *sin_t = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(
      _mm512_castps_si512(_mm512_mask_blend_ps(odd, s, c)), sin_flip, sign, 0x78));
  *cos_t = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(
      _mm512_castps_si512(_mm512_mask_blend_ps(odd, c, s)), cos_flip, sign, 0x78));
}

}  // namespace noisekernels::cpu
