// CPU kernel of replica_reduce: over the replica axis of (n, B, C) logits, the mean of the
// softmax probabilities (mode 0, "MC Avg") or the vote counts of each replica's argmax with ties
// to the smaller class index, a NaN logit counting as -inf (mode 1, "Voting"). Sums over replicas
// accumulate in double, so the mean of a million near-identical replicas keeps float32's precision
// (a float accumulator drifted by 3e-3 at n = 1e6).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../bindings/ops.h"

namespace noisekernels::cpu {
namespace {

template <typename scalar_t, typename out_t>
void reduce_kernel(const scalar_t* logits, out_t* out, int64_t n, int64_t b, int64_t c, bool vote) {
  at::parallel_for(0, b, 16, [&](int64_t b0, int64_t b1) {
    std::vector<out_t> row(c);
    std::vector<double> acc(c);
    for (int64_t i = b0; i < b1; ++i) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t r = 0; r < n; ++r) {
        const scalar_t* x = logits + (r * b + i) * c;
        // NaN counts as -inf (never wins); ties keep the smaller index.
        auto key = [&](int64_t k) {
          const out_t v = static_cast<out_t>(x[k]);
          return std::isnan(v) ? -std::numeric_limits<out_t>::infinity() : v;
        };
        int64_t best = 0;
        out_t best_v = key(0);
        bool voted = !std::isnan(static_cast<out_t>(x[0]));  // a replica of all-NaN logits votes for no class
        for (int64_t k = 1; k < c; ++k) {
          const out_t v = key(k);
          voted = voted || !std::isnan(static_cast<out_t>(x[k]));
          if (v > best_v) {
            best = k;
            best_v = v;
          }
        }
        if (vote) {
          if (voted) acc[best] += 1;
          continue;
        }
        const out_t top = static_cast<out_t>(x[best]);
        out_t sum = 0;
        for (int64_t k = 0; k < c; ++k) {
          row[k] = std::exp(static_cast<out_t>(x[k]) - top);
          sum += row[k];
        }
        for (int64_t k = 0; k < c; ++k) acc[k] += row[k] / sum;
      }
      const double scale = vote ? 1.0 : 1.0 / static_cast<double>(n);
      for (int64_t k = 0; k < c; ++k) out[i * c + k] = static_cast<out_t>(acc[k] * scale);
    }
  });
}

at::Tensor replica_reduce(const at::Tensor& logits, int64_t mode) {
  check_replica_reduce_args(logits, mode);
  const at::Tensor x = logits.contiguous();
  const auto out_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({x.size(1), x.size(2)}, x.options().dtype(out_type));
  if (out.numel() == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "replica_reduce", [&] {
    if (out_type == at::kDouble) {
      reduce_kernel<scalar_t, double>(x.const_data_ptr<scalar_t>(), out.data_ptr<double>(), x.size(0), x.size(1), x.size(2), mode == 1);
    } else {
      reduce_kernel<scalar_t, float>(x.const_data_ptr<scalar_t>(), out.data_ptr<float>(), x.size(0), x.size(1), x.size(2), mode == 1);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(noisekernels, CPU, m) { m.impl("replica_reduce", &replica_reduce); }

}  // namespace noisekernels::cpu
