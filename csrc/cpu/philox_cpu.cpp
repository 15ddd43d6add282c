#include "philox_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__AVX512F__) && defined(__GLIBC__)
#define NK_PHILOX_AVX512 1
#include <immintrin.h>

#include "vector_math.h"
#endif

namespace noisekernels::cpu {

PhiloxKeys::PhiloxKeys(uint64_t seed) {
  uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    k0[r] = a;
    k1[r] = b;
    a += kPhiloxKeyA;
    b += kPhiloxKeyB;
  }
}

#ifdef NK_PHILOX_AVX512

bool has_avx512_path() { return true; }

namespace {

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

// Runs step(first, out) for n counters in steps of kStep counters writing `width` floats per
// counter; a partial last step goes through scratch, so every element takes the same path.
template <int kWidth, typename Step>
__attribute__((always_inline)) inline void by_steps(uint64_t first, int64_t n, float* out, Step step) {
  int64_t c = 0;
  for (; c + kStep <= n; c += kStep) step(first + c, out + kWidth * c);
  if (c < n) {
    alignas(64) float scratch[kWidth * kStep];
    step(first + c, scratch);
    std::memcpy(out + kWidth * c, scratch, kWidth * (n - c) * sizeof(float));
  }
}

}  // namespace

void uniform4_tile(const PhiloxKeys& keys, uint64_t first, int64_t n, float* u) {
  const __m512i lo_idx = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i hi_idx = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  by_steps<4>(first, n, u, [&](uint64_t f, float* out) {
    __m512i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
    words_step(keys, f, c0, c1, c2, c3);
    for (int j = 0; j < kChains; ++j) {
      const __m512i w01 = pair_words(c0[j], c1[j]), w23 = pair_words(c2[j], c3[j]);
      // (w0, w1, w2, w3) of counters 0..3, then of 4..7.
      _mm512_storeu_ps(out + 32 * j, uniform16(_mm512_permutex2var_epi64(w01, lo_idx, w23)));
      _mm512_storeu_ps(out + 32 * j + 16, uniform16(_mm512_permutex2var_epi64(w01, hi_idx, w23)));
    }
  });
}

void spike_tile(const PhiloxKeys& keys, uint64_t first, int64_t n, float* keep, float* value) {
  int64_t c = 0;
  auto step = [&](uint64_t f, float* k_out, float* v_out) {
    __m512i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
    words_step(keys, f, c0, c1, c2, c3);
    for (int j = 0; j < kChains; ++j) {
      _mm512_storeu_ps(k_out + 16 * j, uniform16(pair_words(c0[j], c2[j])));  // (w0, w2) per counter
      if (v_out != nullptr) _mm512_storeu_ps(v_out + 16 * j, uniform16(pair_words(c1[j], c3[j])));
    }
  };
  for (; c + kStep <= n; c += kStep) step(first + c, keep + 2 * c, value == nullptr ? nullptr : value + 2 * c);
  if (c < n) {
    alignas(64) float k_scratch[2 * kStep], v_scratch[2 * kStep];
    step(first + c, k_scratch, v_scratch);
    std::memcpy(keep + 2 * c, k_scratch, 2 * (n - c) * sizeof(float));
    if (value != nullptr) std::memcpy(value + 2 * c, v_scratch, 2 * (n - c) * sizeof(float));
  }
}

void normal4_tile(const PhiloxKeys& keys, uint64_t first, int64_t n, float* z) {
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512 tiny = _mm512_set1_ps(kMinUniformForLog), two_pi = _mm512_set1_ps(kTwoPi);
  by_steps<4>(first, n, z, [&](uint64_t f, float* out) {
    __m512i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
    words_step(keys, f, c0, c1, c2, c3);
    for (int j = 0; j < kChains; ++j) {
      // 16 Box-Muller pairs: (w0, w1) and (w2, w3) of 8 counters, in element order.
      const __m512 a = _mm512_max_ps(uniform16(pair_words(c0[j], c2[j])), tiny);
      const __m512 t = _mm512_mul_ps(two_pi, uniform16(pair_words(c1[j], c3[j])));
      const __m512 r = _mm512_sqrt_ps(minus_two_log16(a));
      __m512 sin_t, cos_t;
      sincos16(t, &sin_t, &cos_t);
      const __m512 zc = _mm512_mul_ps(r, cos_t), zs = _mm512_mul_ps(r, sin_t);
      _mm512_storeu_ps(out + 32 * j, _mm512_permutex2var_ps(zc, lo_idx, zs));
      _mm512_storeu_ps(out + 32 * j + 16, _mm512_permutex2var_ps(zc, hi_idx, zs));
    }
  });
}

#else  // Portable path: scalar Philox, vectorised by the compiler where it can.

bool has_avx512_path() { return false; }

namespace {

Philox4 words_at(const PhiloxKeys& keys, uint64_t counter) {
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u,
                       keys.k0[0], keys.k1[0]);
}

}  // namespace

void uniform4_tile(const PhiloxKeys& keys, uint64_t first, int64_t n, float* u) {
  for (int64_t c = 0; c < n; ++c) {
    const Philox4 w = words_at(keys, first + c);
    u[4 * c] = uniform_from_word(w.w0);
    u[4 * c + 1] = uniform_from_word(w.w1);
    u[4 * c + 2] = uniform_from_word(w.w2);
    u[4 * c + 3] = uniform_from_word(w.w3);
  }
}

void spike_tile(const PhiloxKeys& keys, uint64_t first, int64_t n, float* keep, float* value) {
  for (int64_t c = 0; c < n; ++c) {
    const Philox4 w = words_at(keys, first + c);
    keep[2 * c] = uniform_from_word(w.w0);
    keep[2 * c + 1] = uniform_from_word(w.w2);
    if (value != nullptr) {
      value[2 * c] = uniform_from_word(w.w1);
      value[2 * c + 1] = uniform_from_word(w.w3);
    }
  }
}

void normal4_tile(const PhiloxKeys& keys, uint64_t first, int64_t n, float* z) {
  for (int64_t c = 0; c < n; ++c) {
    const Philox4 w = words_at(keys, first + c);
    normal_pair(w.w0, w.w1, z + 4 * c);
    normal_pair(w.w2, w.w3, z + 4 * c + 2);
  }
}

#endif

void noise4_tile(int dist, const PhiloxKeys& keys, uint64_t first, int64_t n, float* eps) {
  if (dist == kGaussian) {
    normal4_tile(keys, first, n, eps);
    return;
  }
  uniform4_tile(keys, first, n, eps);
  const int64_t m = 4 * n;
  if (dist == kUniform) {
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) eps[i] = (eps[i] + eps[i]) - 1.0f;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) eps[i] = laplace_from_uniform(eps[i]);
  }
}

}  // namespace noisekernels::cpu
