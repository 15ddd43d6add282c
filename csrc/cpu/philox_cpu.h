// Tiles of stream-contract random numbers on the CPU (version 2: all four words of a counter).
// Ops fill a small tile (kept in L1) for a run of consecutive counters, then run a plain
// elementwise loop over it; the float32 Gaussian and Random Spiking paths of AVX-512 builds take
// whole generator steps straight from registers instead (philox_avx512.h), with the same values.
#pragma once
#include <algorithm>
#include <cstdint>

#include <noisekernels/philox.h>

namespace noisekernels::cpu {

// The Philox round keys depend only on the seed, so one call computes them once.
struct PhiloxKeys {
  uint32_t k0[kPhiloxRounds];
  uint32_t k1[kPhiloxRounds];
  explicit PhiloxKeys(uint64_t seed);
};

// Elements per tile that the op kernels use: a multiple of 4 and of every SIMD step below.
constexpr int64_t kTile = 2048;

// One-draw layout (4 elements per counter): u[4c + l] = U(w_l) of counter first + c, c < n.
void uniform4_tile(const PhiloxKeys& keys, uint64_t first, int64_t n, float* u);

// Two-draw layout (Random Spiking, 2 elements per counter): keep[2c + h] = U(w_{2h}) and, when
// value is not null, value[2c + h] = U(w_{2h+1}) of counter first + c, c < n.
void spike_tile(const PhiloxKeys& keys, uint64_t first, int64_t n, float* keep, float* value);

// z[4c + l]: the Box-Muller normals of counter first + c (lanes 0, 1: cos, sin of (w0, w1);
// lanes 2, 3: of (w2, w3)). Every element goes through the same (vector) code path whatever n
// is, so results never depend on how work was split.
void normal4_tile(const PhiloxKeys& keys, uint64_t first, int64_t n, float* z);

// eps[4c + l] of dist (NoiseDist in philox.h): N(0, 1), U(-1, 1) or Laplace(0, 1).
void noise4_tile(int dist, const PhiloxKeys& keys, uint64_t first, int64_t n, float* eps);

// Whether this build uses the AVX-512 path (reported by noisekernels.build_info()).
bool has_avx512_path();

// Walks elements [begin, end) of a call whose `total` elements form segments of `size`
// elements, each starting on a fresh counter, `per` elements per counter (4 or 2). Calls
// f(i, m, counter, skip) for runs [i, i + m) inside one segment and one tile: element i is
// element `skip` of counter `counter`, and skip + m <= kTile. With size a multiple of per the
// segments are one flat run of counters (the fast path).
template <typename F>
inline void for_each_run(int64_t begin, int64_t end, int64_t total, int64_t size, int per,
                         uint64_t offset, F&& f) {
  if (size % per == 0) size = total;
  const int64_t per_segment = (size + per - 1) / per;
  for (int64_t i = begin; i < end;) {
    const int64_t k = i / size, j = i - k * size;
    const int64_t skip = j % per;
    const int64_t m = std::min({end - i, size - j, kTile - skip});
    f(i, m, offset + static_cast<uint64_t>(k * per_segment + j / per), skip);
    i += m;
  }
}

// Counters a run of m elements starting at element `skip` of its first counter touches.
inline int64_t run_counters(int64_t m, int64_t skip, int per) { return (skip + m + per - 1) / per; }

}  // namespace noisekernels::cpu
