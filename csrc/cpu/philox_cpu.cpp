#include "philox_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "philox_avx512.h"

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

using namespace avx512;

namespace {

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
  by_steps<4>(first, n, z, [&](uint64_t f, float* out) {
    normals_step(keys, f, [&](int j, __m512 z0, __m512 z1) {
      _mm512_storeu_ps(out + 32 * j, z0);
      _mm512_storeu_ps(out + 32 * j + 16, z1);
    });
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
