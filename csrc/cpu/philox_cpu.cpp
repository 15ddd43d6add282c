#include "philox_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__AVX512F__) && defined(__GLIBC__)
#define NK_PHILOX_AVX512 1
#include <immintrin.h>
// glibc's libmvec: 16-lane logf/cosf (<= 4 ulp), linked with -lmvec.
extern "C" __m512 _ZGVeN16v_logf(__m512);
extern "C" __m512 _ZGVeN16v_cosf(__m512);
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

// Independent 8-lane chains interleaved to hide the multiply latency (measured best on Zen 5).
constexpr int kChains = 6;
constexpr int64_t kStep = 8 * kChains;
static_assert(kTile % kStep == 0 && kTile % 16 == 0, "tile must hold whole SIMD steps");

// Philox4x32-10 of counters (lo, hi, 0, 0) for 8*kChains lanes; returns w0 in c0 and w1 in c1
// (no op uses w2 and w3, so the last round skips their product). Each element sits in a 64-bit
// lane: _mm512_mul_epu32 reads only the low 32 bits, so a product is its own low word and its
// high word is one shift away, with no masking between rounds. kSharedHigh: every lane has the
// same counter high word, so after round 0 c0 = hi ^ k0 is lane-invariant and round 1's product
// with ROUND_A is computed once.
template <bool kSharedHigh>
__attribute__((always_inline)) inline void philox_lanes(const PhiloxKeys& keys, __m512i* c0,
                                                        __m512i* c1) {
  const __m512i ma = _mm512_set1_epi64(kPhiloxRoundA), mb = _mm512_set1_epi64(kPhiloxRoundB);
  __m512i c2[kChains], c3[kChains];
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
  for (int r = 2; r < kPhiloxRounds - 1; ++r) {
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
  {  // Last round: w0 and w1 only.
    const __m512i k0 = _mm512_set1_epi64(keys.k0[kPhiloxRounds - 1]);
    for (int j = 0; j < kChains; ++j) {
      const __m512i pb = _mm512_mul_epu32(c2[j], mb);
      c0[j] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[j], k0, 0x96);
      c1[j] = pb;
    }
  }
}

// U(w) of the low 32 bits of each 64-bit lane.
__attribute__((always_inline)) inline __m256 uniform_lanes(__m512i w) {
  __m256i s = _mm512_cvtepi64_epi32(w);
  s = _mm256_xor_si256(s, _mm256_srai_epi32(s, 31));  // s < 0 ? ~s : s
  return _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(kUniformScale));
}

// One step of kStep consecutive counters from `first`.
__attribute__((always_inline)) inline void uniform_step(const PhiloxKeys& keys, uint64_t first,
                                                        float* u0, float* u1) {
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i c0[kChains], c1[kChains];
  for (int j = 0; j < kChains; ++j) {
    const __m512i ctr = _mm512_add_epi64(_mm512_set1_epi64(first + 8 * j), iota);
    c0[j] = ctr;
    c1[j] = _mm512_srli_epi64(ctr, 32);
  }
  if ((first >> 32) == ((first + kStep - 1) >> 32)) {
    philox_lanes<true>(keys, c0, c1);
  } else {
    philox_lanes<false>(keys, c0, c1);
  }
  for (int j = 0; j < kChains; ++j) {
    _mm256_storeu_ps(u0 + 8 * j, uniform_lanes(c0[j]));
    if (u1 != nullptr) _mm256_storeu_ps(u1 + 8 * j, uniform_lanes(c1[j]));
  }
}

}  // namespace

void uniform_tile(const PhiloxKeys& keys, uint64_t first, int64_t n, float* u0, float* u1) {
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    uniform_step(keys, first + i, u0 + i, u1 == nullptr ? nullptr : u1 + i);
  }
  if (i < n) {  // Tail: a whole step into scratch, keep the first n - i.
    alignas(64) float t0[kStep], t1[kStep];
    uniform_step(keys, first + i, t0, t1);
    std::memcpy(u0 + i, t0, (n - i) * sizeof(float));
    if (u1 != nullptr) std::memcpy(u1 + i, t1, (n - i) * sizeof(float));
  }
}

void normal_tile(const PhiloxKeys& keys, uint64_t first, int64_t n, float* z) {
  alignas(64) float u0[kTile], u1[kTile];
  for (int64_t base = 0; base < n; base += kTile) {
    const int64_t m = std::min<int64_t>(kTile, n - base);
    uniform_tile(keys, first + base, m, u0, u1);
    const __m512 tiny = _mm512_set1_ps(kMinUniformForLog), two_pi = _mm512_set1_ps(kTwoPi);
    const __m512 minus_two = _mm512_set1_ps(-2.0f);
    for (int64_t i = 0; i < m; i += 16) {
      const __mmask16 valid = m - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (m - i)) - 1u);
      // Lanes past m are zero-filled: log(1e-7) and cos(0) are finite, and they are not stored.
      const __m512 a = _mm512_max_ps(_mm512_maskz_loadu_ps(valid, u0 + i), tiny);
      const __m512 b = _mm512_mul_ps(two_pi, _mm512_maskz_loadu_ps(valid, u1 + i));
      const __m512 r = _mm512_sqrt_ps(_mm512_mul_ps(minus_two, _ZGVeN16v_logf(a)));
      _mm512_mask_storeu_ps(z + base + i, valid, _mm512_mul_ps(r, _ZGVeN16v_cosf(b)));
    }
  }
}

#else  // Portable path: scalar Philox, vectorised by the compiler where it can.

bool has_avx512_path() { return false; }

void uniform_tile(const PhiloxKeys& keys, uint64_t first, int64_t n, float* u0, float* u1) {
  const uint64_t seed = (static_cast<uint64_t>(keys.k1[0]) << 32) | keys.k0[0];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const Philox4 w = philox_at(seed, first, static_cast<uint64_t>(i));
    u0[i] = uniform_from_word(w.w0);
    if (u1 != nullptr) u1[i] = uniform_from_word(w.w1);
  }
}

void normal_tile(const PhiloxKeys& keys, uint64_t first, int64_t n, float* z) {
  const uint64_t seed = (static_cast<uint64_t>(keys.k1[0]) << 32) | keys.k0[0];
  for (int64_t i = 0; i < n; ++i) {
    const Philox4 w = philox_at(seed, first, static_cast<uint64_t>(i));
    z[i] = normal_from_words(w.w0, w.w1);
  }
}

#endif

void noise_tile(int dist, const PhiloxKeys& keys, uint64_t first, int64_t n, float* eps) {
  if (dist == kGaussian) {
    normal_tile(keys, first, n, eps);
    return;
  }
  uniform_tile(keys, first, n, eps, nullptr);
  if (dist == kUniform) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) eps[i] = (eps[i] + eps[i]) - 1.0f;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) eps[i] = laplace_from_uniform(eps[i]);
  }
}

}  // namespace noisekernels::cpu
