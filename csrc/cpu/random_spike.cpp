// CPU kernels of random_spike and random_spike_backward (Random Spiking, random-spiking.txt 4.2).
// Forward: two passes, the copy floor (a min/max reduction, then one read and one write): finite
// min/max per group, then per element keep x if U(keep word) < p, else lo + U(value word) *
// (hi - lo) clamped to hi, in float64 for float64 x (float32 cannot hold its range), else float32.
// Two elements per counter: (w0, w1) and (w2, w3). Backward recomputes the mask from (seed,
// offset): nothing per element is saved.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../bindings/ops.h"
#include "compute_type.h"
#include "philox_cpu.h"

namespace noisekernels::cpu {
namespace {

constexpr int64_t kReduceBlock = 1 << 16;
constexpr int kLanes = 16;

// Finite min and max of each of `groups` contiguous groups of `group_size` elements, in the
// compute type acc (float64 for float64 x, else float32; +inf / -inf for a group without
// finite values). Blocks of a group reduce in parallel.
template <typename scalar_t, typename acc>
void group_minmax(const scalar_t* x, int64_t groups, int64_t group_size, acc* lo, acc* hi) {
  constexpr acc kInf = std::numeric_limits<acc>::infinity();
  const int64_t per_group = std::max<int64_t>(1, (group_size + kReduceBlock - 1) / kReduceBlock);
  std::vector<acc> part_lo(groups * per_group), part_hi(groups * per_group);
  at::parallel_for(0, groups * per_group, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t g = b / per_group, j = b % per_group;
      const int64_t begin = g * group_size + j * kReduceBlock;
      const int64_t end = g * group_size + std::min(group_size, (j + 1) * kReduceBlock);
      // 16 lane accumulators: non-finite values become +-inf first, so plain compares are exact
      // in any order and compile to vminps/vmaxps (an omp simd reduction over std::min did not).
      acc mn_lane[kLanes], mx_lane[kLanes];
      for (int l = 0; l < kLanes; ++l) {
        mn_lane[l] = kInf;
        mx_lane[l] = -kInf;
      }
      int64_t i = begin;
      for (; i + kLanes <= end; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const acc v = static_cast<acc>(x[i + l]);
          const bool finite = std::abs(v) < kInf;  // false for NaN and +-inf
          const acc a = finite ? v : kInf, c = finite ? v : -kInf;
          mn_lane[l] = a < mn_lane[l] ? a : mn_lane[l];
          mx_lane[l] = c > mx_lane[l] ? c : mx_lane[l];
        }
      }
      for (; i < end; ++i) {
        const acc v = static_cast<acc>(x[i]);
        if (std::abs(v) < kInf) {
          mn_lane[0] = std::min(mn_lane[0], v);
          mx_lane[0] = std::max(mx_lane[0], v);
        }
      }
      part_lo[b] = *std::min_element(mn_lane, mn_lane + kLanes);
      part_hi[b] = *std::max_element(mx_lane, mx_lane + kLanes);
    }
  });
  for (int64_t g = 0; g < groups; ++g) {
    lo[g] = *std::min_element(part_lo.begin() + g * per_group, part_lo.begin() + (g + 1) * per_group);
    hi[g] = *std::max_element(part_hi.begin() + g * per_group, part_hi.begin() + (g + 1) * per_group);
  }
}

template <typename scalar_t, typename acc>
void spike(const scalar_t* x, scalar_t* out, int64_t n, int64_t segments, int64_t group_size,
           const acc* lo, const acc* hi, float p, uint64_t seed, uint64_t offset) {
  const PhiloxKeys keys(seed);
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
    alignas(64) float u0[kTile], u1[kTile];
    for_each_run(t0 * kTile, std::min(n, t1 * kTile), n, n / segments, 2, offset,
                 [&](int64_t t, int64_t m, uint64_t counter, int64_t skip) {
      spike_tile(keys, counter, run_counters(m, skip, 2), u0, u1);
      for (int64_t i0 = 0; i0 < m;) {  // runs of one group inside the tile
        const int64_t g = (t + i0) / group_size;
        const int64_t i1 = std::min(m, (g + 1) * group_size - t);
        // Locals, not captured references, so the loop vectorises (see spike_backward).
        const acc a = lo[g], b = hi[g], d = b - a;
        const float keep_below = p;
        const scalar_t* __restrict xs = x + t;
        scalar_t* __restrict os = out + t;
        const float* __restrict keep = u0 + skip;
        const float* __restrict value = u1 + skip;
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) {
          acc v = a + static_cast<acc>(value[i]) * d;  // -ffp-contract=off: the same rounding as every backend
          v = v > b ? b : v;
          os[i] = keep[i] < keep_below ? xs[i] : static_cast<scalar_t>(v);
        }
        i0 = i1;
      }
    });
  });
}

template <typename scalar_t>
void spike_backward(const scalar_t* grad, scalar_t* out, int64_t n, int64_t segments, float p,
                    uint64_t seed, uint64_t offset) {
  const PhiloxKeys keys(seed);
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
    alignas(64) float u0[kTile];
    for_each_run(t0 * kTile, std::min(n, t1 * kTile), n, n / segments, 2, offset,
                 [&](int64_t t, int64_t m, uint64_t counter, int64_t skip) {
      spike_tile(keys, counter, run_counters(m, skip, 2), u0, nullptr);
      // Locals, not the lambda's captured references: otherwise every store may alias them and
      // the loop stays scalar and branchy.
      const scalar_t* __restrict gs = grad + t;
      scalar_t* __restrict os = out + t;
      const float* __restrict keep = u0 + skip;
      const float keep_below = p;
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) os[i] = keep[i] < keep_below ? gs[i] : scalar_t(0);
    });
  });
}

at::Tensor random_spike(const at::Tensor& x, double p, const at::Tensor& seed,
                        const at::Tensor& offset, int64_t groups, int64_t segments) {
  check_random_spike_args(x, p, seed, offset, groups, segments);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return out;
  const auto [s, o] = read_cpu_stream(seed, offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "random_spike", [&] {
    using acc = acc_t<scalar_t>;
    std::vector<acc> lo(groups), hi(groups);
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    group_minmax(xp, groups, n / groups, lo.data(), hi.data());
    spike(xp, out.data_ptr<scalar_t>(), n, segments, n / groups, lo.data(), hi.data(), static_cast<float>(p), s, o);
  });
  return out;
}

at::Tensor random_spike_backward(const at::Tensor& grad, double p, const at::Tensor& seed,
                                 const at::Tensor& offset, int64_t segments) {
  check_random_spike_args(grad, p, seed, offset, 1, segments);
  const at::Tensor gc = grad.contiguous();
  at::Tensor out = at::empty_like(gc);
  const int64_t n = gc.numel();
  if (n == 0) return out;
  const auto [s, o] = read_cpu_stream(seed, offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "random_spike_backward", [&] {
    spike_backward(gc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, segments, static_cast<float>(p), s, o);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(noisekernels, CPU, m) {
  m.impl("random_spike", &random_spike);
  m.impl("random_spike_backward", &random_spike_backward);
}

}  // namespace noisekernels::cpu
