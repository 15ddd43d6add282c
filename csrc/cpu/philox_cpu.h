// Tiles of stream-contract random numbers on the CPU. Ops fill a small tile (kept in L1) for
// a run of consecutive counters, then run a plain elementwise loop over it.
#pragma once
#include <cstdint>

#include <noisekernels/philox.h>

namespace noisekernels::cpu {

// The Philox round keys depend only on the seed, so one call computes them once.
struct PhiloxKeys {
  uint32_t k0[kPhiloxRounds];
  uint32_t k1[kPhiloxRounds];
  explicit PhiloxKeys(uint64_t seed);
};

// Elements per tile that the op kernels use: a multiple of every SIMD step below.
constexpr int64_t kTile = 1536;

// u0[i] = U(w0) and, when u1 is not null, u1[i] = U(w1) of counter `first + i`, i < n.
void uniform_tile(const PhiloxKeys& keys, uint64_t first, int64_t n, float* u0, float* u1);

// z[i] = the contract's normal of counter `first + i`, i < n. Every element goes through the
// same (vector) code path whatever n is, so results never depend on how work was split.
void normal_tile(const PhiloxKeys& keys, uint64_t first, int64_t n, float* z);

// eps[i] = noise_from_words(dist, ...) of counter `first + i`, i < n: N(0, 1), U(-1, 1) or
// Laplace(0, 1) (NoiseDist in philox.h).
void noise_tile(int dist, const PhiloxKeys& keys, uint64_t first, int64_t n, float* eps);

// Whether this build uses the AVX-512 path (reported by noisekernels.build_info()).
bool has_avx512_path();

}  // namespace noisekernels::cpu
