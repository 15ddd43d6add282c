// Philox4x32-10 and the stream contract's conversions (ARCHITECTURE.md section 2).
// Shared by the CPU and CUDA kernels; no torch headers so nvcc compiles it anywhere.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NK_HD __host__ __device__ __forceinline__
#else
#define NK_HD inline __attribute__((always_inline))
#endif

namespace noisekernels {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;
// Largest float32 scale with INT32_MAX * scale < 1 (Triton's uint_to_uniform_float).
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniformForLog = 1.0e-7f;

struct Philox4 {
  uint32_t w0, w1, w2, w3;
};

// Philox4x32-10 on counter (c0, c1, c2, c3) and key (k0, k1), the Random123 rounds.
NK_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                            uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint64_t pb = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{c0, c1, c2, c3};
}

// The words of 64-bit counter `counter` under a 64-bit seed: counter (low, high, 0, 0).
NK_HD Philox4 philox_counter(uint64_t seed, uint64_t counter) {
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u,
                       0u, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The counter of element i of a call (version 2 of the contract): segments of `size` elements,
// each starting on a fresh counter, `per` elements per counter (4: one draw per element, 2:
// Random Spiking); element j of segment k is element j % per of counter
// offset + k * ceil(size / per) + j / per.
NK_HD uint64_t element_counter(uint64_t offset, int64_t i, int64_t size, int per) {
  const int64_t k = i / size, j = i - k * size;
  return offset + static_cast<uint64_t>(k * ((size + per - 1) / per) + j / per);
}

// U(w): w as int32 s, s = ~s when negative, float32(s) * 4.6566127342e-10 (in [0, 1)).
NK_HD float uniform_from_word(uint32_t w) {
  int32_t s = static_cast<int32_t>(w);
  s = s < 0 ? ~s : s;
  return static_cast<float>(s) * kUniformScale;
}

// Box-Muller on the uniforms of words (a, b): out[0] = r cos(t), out[1] = r sin(t) (Triton's
// pair_uniform_to_normal, used by tl.randn4x).
NK_HD void normal_pair(uint32_t a, uint32_t b, float* out) {
  float u = uniform_from_word(a);
  u = u < kMinUniformForLog ? kMinUniformForLog : u;
  const float theta = kTwoPi * uniform_from_word(b);
#if defined(__CUDA_ARCH__)
  const float r = sqrtf(-2.0f * logf(u));
  float sn, cs;
  sincosf(theta, &sn, &cs);
  out[0] = r * cs;
  out[1] = r * sn;
#else
  const float r = __builtin_sqrtf(-2.0f * __builtin_logf(u));
  out[0] = r * __builtin_cosf(theta);
  out[1] = r * __builtin_sinf(theta);
#endif
}

// Natural log from + - * and bit operations only (Cephes logf, ~1 ulp on normal positive x), so
// with no FMA contraction it rounds identically on every backend: the Laplace noise built on it
// is bit-identical on CPU, CUDA, Triton and the reference. Not for x <= 0, inf or NaN.
NK_HD float exact_log(float x) {
  uint32_t bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  int e = static_cast<int>((bits >> 23) & 0xFFu) - 126;  // x = m * 2^e, m in [0.5, 1)
  bits = (bits & 0x807FFFFFu) | 0x3F000000u;
  float m;
  __builtin_memcpy(&m, &bits, sizeof(m));
  if (m < 0.707106781186547524f) {
    e -= 1;
    m = m + m - 1.0f;
  } else {
    m = m - 1.0f;
  }
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m + -1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m + -1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m + -1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m + -2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y = y + -2.12194440e-4f * fe;
  y = y + -0.5f * z;
  return (m + y) + 0.693359375f * fe;
}

// Standard Laplace from U(w0): u = U - 1/2, -sign(u) * log(max(1e-7, 1 - 2|u|)).
NK_HD float laplace_from_uniform(float uniform) {
  const float u = uniform - 0.5f;
  const float a = u < 0.0f ? -u : u;
  float t = 1.0f - (a + a);
  t = t < kMinUniformForLog ? kMinUniformForLog : t;
  const float l = exact_log(t);
  return u < 0.0f ? l : -l;
}

// The noise distributions of noise_add (values of its `dist` argument).
enum NoiseDist : int { kGaussian = 0, kUniform = 1, kLaplace = 2 };

// The four eps of a counter's elements (one draw each): N(0, 1) (two Box-Muller pairs),
// U(-1, 1) or Laplace(0, 1).
NK_HD void noise4_from_words(int dist, const Philox4& w, float* eps) {
  if (dist == kGaussian) {
    normal_pair(w.w0, w.w1, eps);
    normal_pair(w.w2, w.w3, eps + 2);
    return;
  }
  const uint32_t ws[4] = {w.w0, w.w1, w.w2, w.w3};
  for (int l = 0; l < 4; ++l) {
    const float u = uniform_from_word(ws[l]);
    eps[l] = dist == kUniform ? (u + u) - 1.0f : laplace_from_uniform(u);
  }
}

}  // namespace noisekernels
