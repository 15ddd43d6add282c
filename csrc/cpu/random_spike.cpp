// CPU kernels of random_spike and random_spike_backward (Random Spiking, random-spiking.txt 4.2).
// Forward: two passes, the copy floor (a min/max reduction, then one read and one write): finite
// min/max per group, then per element keep x if U(w0) < p, else lo + U(w1) * (hi - lo) clamped to
// hi. Backward recomputes the mask from (seed, offset): nothing per element is saved.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../bindings/ops.h"
#include "philox_cpu.h"

namespace noisekernels::cpu {
namespace {

constexpr int64_t kReduceBlock = 1 << 16;
constexpr int kLanes = 16;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Finite min and max of each of `groups` contiguous groups of `group_size` elements, in float32
// (+inf / -inf for a group without finite values). Blocks of a group reduce in parallel.
template <typename scalar_t>
void group_minmax(const scalar_t* x, int64_t groups, int64_t group_size, float* lo, float* hi) {
  const int64_t per_group = std::max<int64_t>(1, (group_size + kReduceBlock - 1) / kReduceBlock);
  std::vector<float> part_lo(groups * per_group), part_hi(groups * per_group);
  at::parallel_for(0, groups * per_group, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t g = b / per_group, j = b % per_group;
      const int64_t begin = g * group_size + j * kReduceBlock;
      const int64_t end = g * group_size + std::min(group_size, (j + 1) * kReduceBlock);
      // 16 lane accumulators: non-finite values become +-inf first, so plain compares are exact
      // in any order and compile to vminps/vmaxps (an omp simd reduction over std::min did not).
      float mn_lane[kLanes], mx_lane[kLanes];
      for (int l = 0; l < kLanes; ++l) {
        mn_lane[l] = kInf;
        mx_lane[l] = -kInf;
      }
      int64_t i = begin;
      for (; i + kLanes <= end; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const float v = static_cast<float>(x[i + l]);
          const bool finite = std::abs(v) < kInf;  // false for NaN and +-inf
          const float a = finite ? v : kInf, c = finite ? v : -kInf;
          mn_lane[l] = a < mn_lane[l] ? a : mn_lane[l];
          mx_lane[l] = c > mx_lane[l] ? c : mx_lane[l];
        }
      }
      for (; i < end; ++i) {
        const float v = static_cast<float>(x[i]);
        if (std::abs(v) < kInf) {
          mn_lane[0] = std::min(mn_lane[0], v);
          mx_lane[0] = std::max(mx_lane[0], v);
        }
      }
      const float mn = *std::min_element(mn_lane, mn_lane + kLanes);
      const float mx = *std::max_element(mx_lane, mx_lane + kLanes);
      part_lo[b] = mn;
      part_hi[b] = mx;
    }
  });
  for (int64_t g = 0; g < groups; ++g) {
    lo[g] = *std::min_element(part_lo.begin() + g * per_group, part_lo.begin() + (g + 1) * per_group);
    hi[g] = *std::max_element(part_hi.begin() + g * per_group, part_hi.begin() + (g + 1) * per_group);
  }
}

template <typename scalar_t>
void spike(const scalar_t* x, scalar_t* out, int64_t n, int64_t group_size, const float* lo,
           const float* hi, float p, uint64_t seed, uint64_t offset) {
  const PhiloxKeys keys(seed);
  at::parallel_for(0, n, 8 * kTile, [&](int64_t begin, int64_t end) {
    alignas(64) float u0[kTile], u1[kTile];
    for (int64_t t = begin; t < end; t += kTile) {
      const int64_t m = std::min(kTile, end - t);
      uniform_tile(keys, offset + t, m, u0, u1);
      for (int64_t i0 = 0; i0 < m;) {  // runs of one group inside the tile
        const int64_t g = (t + i0) / group_size;
        const int64_t i1 = std::min(m, (g + 1) * group_size - t);
        // Locals, not captured references, so the loop vectorises (see spike_backward).
        const float a = lo[g], b = hi[g], d = b - a, keep_below = p;
        const scalar_t* __restrict xs = x + t;
        scalar_t* __restrict os = out + t;
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) {
          float v = a + u1[i] * d;  // -ffp-contract=off: the same rounding as every backend
          v = v > b ? b : v;
          os[i] = u0[i] < keep_below ? xs[i] : static_cast<scalar_t>(v);
        }
        i0 = i1;
      }
    }
  });
}

template <typename scalar_t>
void spike_backward(const scalar_t* grad, scalar_t* out, int64_t n, float p, uint64_t seed,
                    uint64_t offset) {
  const PhiloxKeys keys(seed);
  at::parallel_for(0, n, 8 * kTile, [&](int64_t begin, int64_t end) {
    alignas(64) float u0[kTile];
    for (int64_t t = begin; t < end; t += kTile) {
      const int64_t m = std::min(kTile, end - t);
      uniform_tile(keys, offset + t, m, u0, nullptr);
      // Locals, not the lambda's captured references: otherwise every store may alias them and
      // the loop stays scalar and branchy.
      const scalar_t* __restrict gs = grad + t;
      scalar_t* __restrict os = out + t;
      const float keep_below = p;
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) os[i] = u0[i] < keep_below ? gs[i] : scalar_t(0);
    }
  });
}

at::Tensor random_spike(const at::Tensor& x, double p, const at::Tensor& seed,
                        const at::Tensor& offset, int64_t groups) {
  check_random_spike_args(x, p, seed, offset, groups);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return out;
  const auto [s, o] = read_cpu_stream(seed, offset);
  std::vector<float> lo(groups), hi(groups);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "random_spike", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    group_minmax(xp, groups, n / groups, lo.data(), hi.data());
    spike(xp, out.data_ptr<scalar_t>(), n, n / groups, lo.data(), hi.data(), static_cast<float>(p), s, o);
  });
  return out;
}

at::Tensor random_spike_backward(const at::Tensor& grad, double p, const at::Tensor& seed,
                                 const at::Tensor& offset) {
  check_random_spike_args(grad, p, seed, offset, 1);
  const at::Tensor gc = grad.contiguous();
  at::Tensor out = at::empty_like(gc);
  const int64_t n = gc.numel();
  if (n == 0) return out;
  const auto [s, o] = read_cpu_stream(seed, offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "random_spike_backward", [&] {
    spike_backward(gc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, static_cast<float>(p), s, o);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(noisekernels, CPU, m) {
  m.impl("random_spike", &random_spike);
  m.impl("random_spike_backward", &random_spike_backward);
}

}  // namespace noisekernels::cpu
