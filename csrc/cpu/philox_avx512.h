// The Philox generator in AVX-512 registers (ARCHITECTURE.md section 2, version 2), for kernels
// that use the numbers where they are made: the tile functions of philox_cpu.cpp, and the float32
// paths of the ops (random_spike.cpp, noise_add.cpp, noise_add_foreach.cpp), which skip the
// tile's store and reload. Every path runs the same code per counter, so their values agree bit
// for bit.
#pragma once
#include "philox_cpu.h"

#if defined(__AVX512F__) && defined(__GLIBC__)
#define NK_PHILOX_AVX512 1
#endif

#ifdef NK_PHILOX_AVX512
#include <immintrin.h>

#include <limits>

#include "vector_math.h"

namespace noisekernels::cpu::avx512 {

// Independent 8-lane chains interleaved to hide the multiply latency.
constexpr int kChains = 4;
constexpr int64_t kStep = 8 * kChains;  // counters per step
static_assert(kTile % (4 * kStep) == 0, "tile must hold whole SIMD steps");

// Philox4x32-10 of counters (lo, hi, 0, 0) for 8*kChains lanes; the four words end in c0..c3.
// Each word sits in the low 32 bits of a 64-bit lane (the high bits are garbage):
// _mm512_mul_epu32 reads only the low 32 bits, so a product is its own low word and its high
// word is one shift away, with no masking between rounds. kSharedHigh: every lane has the same
// counter high word, so after round 0 c0 = hi ^ k0 is lane-invariant and round 1's product with
// ROUND_A is computed once.
template <bool kSharedHigh>
__attribute__((always_inline)) inline void philox_lanes(const PhiloxKeys& keys, __m512i* c0,
                                                        __m512i* c1, __m512i* c2, __m512i* c3) {
  const __m512i ma = _mm512_set1_epi64(kPhiloxRoundA), mb = _mm512_set1_epi64(kPhiloxRoundB);
  {  // Round 0 with c2 = c3 = 0.
    const __m512i k0 = _mm512_set1_epi64(keys.k0[0]), k1 = _mm512_set1_epi64(keys.k1[0]);
    for (int j = 0; j < kChains; ++j) {
      const __m512i pa = _mm512_mul_epu32(c0[j], ma);
      c0[j] = _mm512_xor_si512(c1[j], k0);
      c2[j] = _mm512_xor_si512(_mm512_srli_epi64(pa, 32), k1);
      c3[j] = pa;
    }
  }
  {  // Round 1 with c1 = 0.
    const __m512i k0 = _mm512_set1_epi64(keys.k0[1]), k1 = _mm512_set1_epi64(keys.k1[1]);
    const __m512i shared_pa = _mm512_mul_epu32(c0[0], ma);
    for (int j = 0; j < kChains; ++j) {
      const __m512i pa = kSharedHigh ? shared_pa : _mm512_mul_epu32(c0[j], ma);
      const __m512i pb = _mm512_mul_epu32(c2[j], mb);
      c0[j] = _mm512_xor_si512(_mm512_srli_epi64(pb, 32), k0);
      c2[j] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3[j], k1, 0x96);
      c1[j] = pb;
      c3[j] = pa;
    }
  }
  for (int r = 2; r < kPhiloxRounds; ++r) {
    const __m512i k0 = _mm512_set1_epi64(keys.k0[r]), k1 = _mm512_set1_epi64(keys.k1[r]);
    for (int j = 0; j < kChains; ++j) {
      const __m512i pa = _mm512_mul_epu32(c0[j], ma);
      const __m512i pb = _mm512_mul_epu32(c2[j], mb);
      c0[j] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[j], k0, 0x96);
      c2[j] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3[j], k1, 0x96);
      c1[j] = pb;
      c3[j] = pa;
    }
  }
}

// The words of kStep consecutive counters from `first`.
__attribute__((always_inline)) inline void words_step(const PhiloxKeys& keys, uint64_t first,
                                                      __m512i* c0, __m512i* c1, __m512i* c2,
                                                      __m512i* c3) {
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  for (int j = 0; j < kChains; ++j) {
    const __m512i ctr = _mm512_add_epi64(_mm512_set1_epi64(first + 8 * j), iota);
    c0[j] = ctr;
    c1[j] = _mm512_srli_epi64(ctr, 32);
  }
  if ((first >> 32) == ((first + kStep - 1) >> 32)) {
    philox_lanes<true>(keys, c0, c1, c2, c3);
  } else {
    philox_lanes<false>(keys, c0, c1, c2, c3);
  }
}

// 16 dwords: the low words of a's lanes in the even dwords, of b's lanes in the odd ones, i.e.
// (a_i, b_i) per counter i.
__attribute__((always_inline)) inline __m512i pair_words(__m512i a, __m512i b) {
  return _mm512_mask_blend_epi32(0xAAAA, a, _mm512_slli_epi64(b, 32));
}

// U(w) of 16 dwords.
__attribute__((always_inline)) inline __m512 uniform16(__m512i s) {
  s = _mm512_xor_si512(s, _mm512_srai_epi32(s, 31));  // s < 0 ? ~s : s
  return _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(kUniformScale));
}

// The Box-Muller normals of kStep counters from `first`, in element order: use(j, a, b) gets those
// of counters first + 8j .. first + 8j + 7, elements 32j .. 32j + 15 in a and the next 16 in b.
template <typename Use>
__attribute__((always_inline)) inline void normals_step(const PhiloxKeys& keys, uint64_t first, Use use) {
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512 tiny = _mm512_set1_ps(kMinUniformForLog), two_pi = _mm512_set1_ps(kTwoPi);
  __m512i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
  words_step(keys, first, c0, c1, c2, c3);
  for (int j = 0; j < kChains; ++j) {
    // 16 Box-Muller pairs: (w0, w1) and (w2, w3) of 8 counters, in element order.
    const __m512 a = _mm512_max_ps(uniform16(pair_words(c0[j], c2[j])), tiny);
    const __m512 t = _mm512_mul_ps(two_pi, uniform16(pair_words(c1[j], c3[j])));
    const __m512 r = _mm512_sqrt_ps(minus_two_log16(a));
    __m512 sin_t, cos_t;
    sincos16(t, &sin_t, &cos_t);
    const __m512 zc = _mm512_mul_ps(r, cos_t), zs = _mm512_mul_ps(r, sin_t);
    use(j, _mm512_permutex2var_ps(zc, lo_idx, zs), _mm512_permutex2var_ps(zc, hi_idx, zs));
  }
}

// Gaussian noise added straight from the generator's registers (float32; noise_add and
// noise_add_foreach): whole steps of kNormalStep elements from a counter's first element, one
// scale entry per 16-element vector.
constexpr int64_t kNormalStep = 4 * kStep;

// The scale entry of consecutive 16-element vectors from element j0 of x: entry
// (j / inner) % channels.
struct ScaleWalk {
  const float* scale;
  int64_t inner, channels, c, left;
  ScaleWalk(const float* entries, int64_t j0, int64_t run, int64_t count)
      : scale(entries), inner(run), channels(count),
        c(count == 1 ? 0 : (j0 / run) % count),
        left(count == 1 ? std::numeric_limits<int64_t>::max() : run - j0 % run) {}
  __m512 next() {
    if (left == 0) {
      c = c + 1 == channels ? 0 : c + 1;
      left = inner;
    }
    left -= 16;
    return _mm512_set1_ps(scale[c]);
  }
};

// use(i, z) for the 16-element vectors of steps * kNormalStep normals from counter `first`, in
// order, i the vector's first element.
template <typename Use>
inline void for_normals(const PhiloxKeys& keys, uint64_t first, int64_t steps, Use&& use) {
  for (int64_t s = 0; s < steps; ++s) {
    normals_step(keys, first + s * kStep, [&](int j, __m512 z0, __m512 z1) {
      use(s * kNormalStep + 32 * j, z0);
      use(s * kNormalStep + 32 * j + 16, z1);
    });
  }
}

// out = x + scale * z, then v < lo ? lo : v and v > hi ? hi : v when clipping (NaN passes): the
// elementwise loops of noise_add and noise_add_foreach, for steps * kNormalStep elements from
// counter `first`.
template <bool kClamp>
inline void normal_add_f32(const PhiloxKeys& keys, uint64_t first, int64_t steps, const float* x, float* out,
                           ScaleWalk scale, float lo, float hi) {
  const __m512 a = _mm512_set1_ps(lo), b = _mm512_set1_ps(hi);
  for_normals(keys, first, steps, [&](int64_t i, __m512 z) {
    __m512 v = _mm512_add_ps(_mm512_loadu_ps(x + i), _mm512_mul_ps(scale.next(), z));
    if constexpr (kClamp) {
      v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, a, _CMP_LT_OQ), v, a);
      v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, b, _CMP_GT_OQ), v, b);
    }
    _mm512_storeu_ps(out + i, v);
  });
}

// Moves a run (t, m, counter) of 4 elements per counter past its first `done` elements (whole
// counters); false if none remain.
inline bool advance_run(int64_t done, int64_t& t, int64_t& m, uint64_t& counter) {
  t += done;
  m -= done;
  counter += done / 4;
  return m > 0;
}

}  // namespace noisekernels::cpu::avx512
#endif
