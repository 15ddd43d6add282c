// CPU kernel of noise_add_foreach: x_k + scale_k * eps for a list of tensors in one parallel pass,
// tensor k one flat segment on counters from offset + starts[k] (so it equals per-tensor
// noise_add calls).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../bindings/ops.h"
#include "compute_type.h"
#include "philox_avx512.h"
#include "philox_cpu.h"

namespace noisekernels::cpu {
namespace {

template <typename scalar_t>
void foreach_kernel(const std::vector<const scalar_t*>& xs, const std::vector<scalar_t*>& outs,
                    const std::vector<int64_t>& first, const acc_t<scalar_t>* scales,
                    const std::vector<int64_t>& starts, int dist, const PhiloxKeys& keys,
                    uint64_t offset) {
  using acc = acc_t<scalar_t>;
  // Work is indexed over the concatenation of all tensors in tiles; first[k] is where tensor k
  // begins. Each tensor is one flat segment on counters from offset + starts[k].
  const int64_t total = first.back(), tiles = (total + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
    alignas(64) float tile[kTile];
    const int64_t begin = t0 * kTile, end = std::min(total, t1 * kTile);
    int64_t k = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t t = begin; t < end;) {
      while (t >= first[k + 1]) ++k;  // skips empty tensors too
      const int64_t local = t - first[k];
      const int64_t stop = std::min(end, first[k + 1]);
      for_each_run(local, stop - first[k], first[k + 1] - first[k], first[k + 1] - first[k], 4,
                   offset + static_cast<uint64_t>(starts[k]),
                   [&](int64_t i, int64_t m, uint64_t counter, int64_t skip) {
#ifdef NK_PHILOX_AVX512
        // float32 Gaussian noise: the run's whole steps straight from the generator's registers.
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (dist == kGaussian && skip == 0) {
            const int64_t steps = m / avx512::kNormalStep;
            avx512::normal_add_f32<false>(keys, counter, steps, xs[k] + i, outs[k] + i,
                                          avx512::ScaleWalk(scales + k, 0, 1, 1), 0.0f, 0.0f);
            if (!avx512::advance_run(steps * avx512::kNormalStep, i, m, counter)) return;
          }
        }
#endif
        noise4_tile(dist, keys, counter, run_counters(m, skip, 4), tile);
        const float* __restrict eps = tile + skip;
        const scalar_t* __restrict xp = xs[k] + i;
        scalar_t* __restrict op = outs[k] + i;
        const acc s = scales[k];
#pragma omp simd
        for (int64_t e = 0; e < m; ++e) {
          op[e] = static_cast<scalar_t>(static_cast<acc>(xp[e]) + s * static_cast<acc>(eps[e]));
        }
      });
      t = stop;
    }
  });
}

std::vector<at::Tensor> noise_add_foreach(at::TensorList xs, const at::Tensor& scales,
                                          const at::Tensor& seed, const at::Tensor& offset,
                                          at::IntArrayRef starts, int64_t dist) {
  check_noise_add_foreach_args(xs, scales, seed, offset, starts, dist);
  std::vector<at::Tensor> inputs, outputs;
  std::vector<int64_t> first{0};
  for (const auto& x : xs) {
    inputs.push_back(x.contiguous());
    outputs.push_back(at::empty_like(inputs.back()));
    first.push_back(first.back() + x.numel());
  }
  if (xs.empty() || first.back() == 0) return outputs;
  const auto [s, o] = read_cpu_stream(seed, offset);
  const at::Tensor sc = scales.contiguous();
  const std::vector<int64_t> start_vec(starts.begin(), starts.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "noise_add_foreach", [&] {
    std::vector<const scalar_t*> in_ptrs;
    std::vector<scalar_t*> out_ptrs;
    for (size_t k = 0; k < inputs.size(); ++k) {
      in_ptrs.push_back(inputs[k].const_data_ptr<scalar_t>());
      out_ptrs.push_back(outputs[k].data_ptr<scalar_t>());
    }
    foreach_kernel<scalar_t>(in_ptrs, out_ptrs, first, sc.const_data_ptr<acc_t<scalar_t>>(), start_vec,
                             static_cast<int>(dist), PhiloxKeys(s), o);
  });
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(noisekernels, CPU, m) { m.impl("noise_add_foreach", &noise_add_foreach); }

}  // namespace noisekernels::cpu
