// CPU kernels of noise_add, noise_mul and noise_mul_sum: additive Gaussian / uniform / Laplace noise
// with a fixed or learnable scale (RSE, PNI), N noisy replicas with clipping (Gaussian data
// augmentation), grad * eps, and the learnable scale's gradient sum(grad * eps) per scale entry
// (eps regenerated, never saved).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "../bindings/ops.h"
#include "compute_type.h"
#include "philox_avx512.h"
#include "philox_cpu.h"

namespace noisekernels::cpu {
namespace {

#ifdef NK_PHILOX_AVX512
using avx512::advance_run;
using avx512::kNormalStep;
using avx512::ScaleWalk;

// Whether every 16-element vector from element j0 has one scale entry (the register paths' need):
// one scale, or runs of inner elements, inner a multiple of 16, from a vector's start.
bool fuses_scale(int64_t j0, int64_t inner, int64_t channels) {
  return channels == 1 || (inner % 16 == 0 && j0 % 16 == 0);
}
#endif

template <typename scalar_t, bool kClamp>
void noise_add_kernel(const scalar_t* x, const acc_t<scalar_t>* scale, scalar_t* out,
                      int64_t numel_x, int64_t replicas, int64_t segments, int64_t inner,
                      int64_t channels, int dist, acc_t<scalar_t> lo, acc_t<scalar_t> hi,
                      uint64_t seed, uint64_t offset) {
  using acc = acc_t<scalar_t>;
  const PhiloxKeys keys(seed);
  const int64_t n = numel_x * replicas, tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
    alignas(64) float tile[kTile];
    for_each_run(t0 * kTile, std::min(n, t1 * kTile), n, n / segments, 4, offset,
                 [&](int64_t t, int64_t m, uint64_t counter, int64_t skip) {
#ifdef NK_PHILOX_AVX512
      // float32 Gaussian noise on whole counters: the whole steps inside one copy of x straight
      // from the generator's registers, the rest through the tile.
      if constexpr (std::is_same_v<scalar_t, float>) {
        const int64_t j0 = t % numel_x;
        if (dist == kGaussian && skip == 0 && fuses_scale(j0, inner, channels)) {
          const int64_t steps = std::min(m, numel_x - j0) / kNormalStep;
          avx512::normal_add_f32<kClamp>(keys, counter, steps, x + j0, out + t, ScaleWalk(scale, j0, inner, channels), lo, hi);
          if (!advance_run(steps * kNormalStep, t, m, counter)) return;
        }
      }
#endif
      noise4_tile(dist, keys, counter, run_counters(m, skip, 4), tile);
      const float* eps = tile + skip;
      // Runs in which x is contiguous and the scale index is constant (or steps by one when
      // inner == 1), so each inner loop vectorises.
      for (int64_t i0 = 0; i0 < m;) {
        const int64_t j0 = (t + i0) % numel_x;
        int64_t run = std::min(m - i0, numel_x - j0);
        int64_t c0 = 0;
        bool stepping = false;
        if (channels > 1) {
          if (inner == 1) {
            c0 = j0 % channels;
            run = std::min(run, channels - c0);
            stepping = true;
          } else {
            c0 = (j0 / inner) % channels;
            run = std::min(run, inner - j0 % inner);
          }
        }
        const scalar_t* __restrict xs = x + j0;
        scalar_t* __restrict os = out + t + i0;
        const float* __restrict es = eps + i0;
        const acc* __restrict sc = scale + c0;
        const acc s0 = sc[0], a = lo, b = hi;
#pragma omp simd
        for (int64_t k = 0; k < run; ++k) {
          acc v = static_cast<acc>(xs[k]) + (stepping ? sc[k] : s0) * static_cast<acc>(es[k]);
          if constexpr (kClamp) {
            v = v < a ? a : v;
            v = v > b ? b : v;
          }
          os[k] = static_cast<scalar_t>(v);
        }
        i0 += run;
      }
    });
  });
}

template <typename scalar_t>
void noise_mul_kernel(const scalar_t* g, scalar_t* out, int64_t n, int64_t segments, int dist,
                      uint64_t seed, uint64_t offset) {
  using acc = acc_t<scalar_t>;
  const PhiloxKeys keys(seed);
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
    alignas(64) float tile[kTile];
    for_each_run(t0 * kTile, std::min(n, t1 * kTile), n, n / segments, 4, offset,
                 [&](int64_t t, int64_t m, uint64_t counter, int64_t skip) {
      noise4_tile(dist, keys, counter, run_counters(m, skip, 4), tile);
      const float* __restrict eps = tile + skip;
      const scalar_t* __restrict gs = g + t;
      scalar_t* __restrict os = out + t;
#pragma omp simd
      for (int64_t k = 0; k < m; ++k) {
        os[k] = static_cast<scalar_t>(static_cast<acc>(gs[k]) * static_cast<acc>(eps[k]));
      }
    });
  });
}

// sum(grad * eps) per scale entry, in a fixed order whatever the thread count. Element i belongs
// to run u = i / inner (one scale entry's consecutive elements, entry u % channels). Runs split
// into pieces of at most kTile elements; each piece is summed in 16 lanes by its position in the
// piece, then the lanes in order; each entry sums its pieces in index order.
constexpr int kLanes = 16;

template <typename scalar_t>
struct PieceSums {
  using acc = acc_t<scalar_t>;
  int64_t inner, parts, piece;
  int64_t begin(int64_t q) const { return (q / parts) * inner + (q % parts) * piece; }
  int64_t end(int64_t q) const { return std::min(begin(q) + piece, (q / parts + 1) * inner); }

  // Adds g[k] * eps[k], k < m, to the lanes; element 0 is element `pos` of its piece.
  static void add(const scalar_t* __restrict g, const float* __restrict eps, int64_t m, int64_t pos,
                  acc* __restrict lanes) {
    acc v[kLanes];  // a local copy stays in registers
    std::copy(lanes, lanes + kLanes, v);
    int64_t k = 0;
    for (; k < m && (pos + k) % kLanes; ++k) v[(pos + k) % kLanes] += static_cast<acc>(g[k]) * static_cast<acc>(eps[k]);
    for (; k + kLanes <= m; k += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) v[l] += static_cast<acc>(g[k + l]) * static_cast<acc>(eps[k + l]);
    }
    for (int l = 0; k < m; ++k, ++l) v[l] += static_cast<acc>(g[k]) * static_cast<acc>(eps[k]);
    std::copy(v, v + kLanes, lanes);
  }
};

template <typename scalar_t>
void noise_mul_sum_kernel(const scalar_t* g, acc_t<scalar_t>* out, int64_t n, int64_t segments,
                          int64_t inner, int64_t channels, int dist, uint64_t seed, uint64_t offset) {
  using acc = acc_t<scalar_t>;
  const PhiloxKeys keys(seed);
  if (channels == 1) inner = n;  // one entry: all elements are one run
  const int64_t runs = n / inner, parts = (inner + kTile - 1) / kTile;
  const PieceSums<scalar_t> pieces{inner, parts, std::min(inner, kTile)};
  std::vector<acc> sums(runs * parts);
  at::parallel_for(0, runs * parts, std::max<int64_t>(1, 8 * kTile / pieces.piece), [&](int64_t q0, int64_t q1) {
    alignas(64) float tile[kTile];
    acc lanes[kLanes] = {};
    // The next piece starts where one ends; its end is the run's end or a piece further.
    int64_t q = q0, qbegin = pieces.begin(q0), qend = pieces.end(q0), run_end = (q0 / parts + 1) * inner;
    auto close_piece = [&] {
      acc s = 0;
      for (int l = 0; l < kLanes; ++l) s += lanes[l];
      sums[q++] = s;
      std::fill(lanes, lanes + kLanes, acc(0));
      if (qend == run_end) run_end += inner;
      qbegin = qend;
      qend = std::min(qbegin + pieces.piece, run_end);
    };
    for_each_run(qbegin, pieces.end(q1 - 1), n, n / segments, 4, offset,
                 [&](int64_t t, int64_t m, uint64_t counter, int64_t skip) {
#ifdef NK_PHILOX_AVX512
      // float32 Gaussian noise on whole counters with pieces on 16-element vectors: the whole steps
      // straight from the generator's registers (lane l of a vector is lane l of its piece), the
      // rest through the tile.
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (dist == kGaussian && skip == 0 && t % 16 == 0 && fuses_scale(0, inner, channels)) {
          const int64_t steps = m / kNormalStep;
          __m512 sum = _mm512_loadu_ps(lanes);
          avx512::for_normals(keys, counter, steps, [&](int64_t i, __m512 z) {
            sum = _mm512_add_ps(sum, _mm512_mul_ps(_mm512_loadu_ps(g + t + i), z));
            if (t + i + 16 == qend) {
              _mm512_storeu_ps(lanes, sum);
              close_piece();
              sum = _mm512_setzero_ps();
            }
          });
          _mm512_storeu_ps(lanes, sum);
          if (!advance_run(steps * kNormalStep, t, m, counter)) return;
        }
      }
#endif
      noise4_tile(dist, keys, counter, run_counters(m, skip, 4), tile);
      for (int64_t i = t; i < t + m;) {  // the run's parts in pieces q, q + 1, ...
        const int64_t len = std::min(t + m, qend) - i;
        PieceSums<scalar_t>::add(g + i, tile + skip + (i - t), len, i - qbegin, lanes);
        i += len;
        if (i == qend) close_piece();
      }
    });
  });
  at::parallel_for(0, channels, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc s = 0;
      for (int64_t u = c; u < runs; u += channels) {
        for (int64_t k = 0; k < parts; ++k) s += sums[u * parts + k];
      }
      out[c] = s;
    }
  });
}

at::Tensor noise_add(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& seed,
                     const at::Tensor& offset, int64_t dist, int64_t inner, int64_t channels,
                     int64_t replicas, std::optional<double> lo, std::optional<double> hi,
                     int64_t segments) {
  check_noise_add_args(x, scale, seed, offset, dist, inner, channels, replicas, lo, hi, segments);
  const at::Tensor xc = x.contiguous(), sc = scale.contiguous();
  std::vector<int64_t> size(xc.sizes().begin(), xc.sizes().end());
  if (replicas != 1) size[0] *= replicas;
  at::Tensor out = at::empty(size, xc.options());
  if (out.numel() == 0) return out;
  const auto [s, o] = read_cpu_stream(seed, offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "noise_add", [&] {
    using acc = acc_t<scalar_t>;
    const acc* sp = sc.const_data_ptr<acc>();
    if (lo.has_value()) {
      noise_add_kernel<scalar_t, true>(xc.const_data_ptr<scalar_t>(), sp, out.data_ptr<scalar_t>(),
                                       xc.numel(), replicas, segments, inner, channels, static_cast<int>(dist),
                                       static_cast<acc>(*lo), static_cast<acc>(*hi), s, o);
    } else {
      noise_add_kernel<scalar_t, false>(xc.const_data_ptr<scalar_t>(), sp, out.data_ptr<scalar_t>(),
                                        xc.numel(), replicas, segments, inner, channels, static_cast<int>(dist),
                                        acc(0), acc(0), s, o);
    }
  });
  return out;
}

at::Tensor noise_mul(const at::Tensor& g, const at::Tensor& seed, const at::Tensor& offset,
                     int64_t dist, int64_t segments) {
  check_noise_mul_args(g, seed, offset, dist, segments);
  const at::Tensor gc = g.contiguous();
  at::Tensor out = at::empty_like(gc);
  if (out.numel() == 0) return out;
  const auto [s, o] = read_cpu_stream(seed, offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "noise_mul", [&] {
    noise_mul_kernel(gc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), gc.numel(), segments,
                     static_cast<int>(dist), s, o);
  });
  return out;
}

at::Tensor noise_mul_sum(const at::Tensor& g, const at::Tensor& seed, const at::Tensor& offset,
                         int64_t dist, int64_t inner, int64_t channels, int64_t segments) {
  check_noise_mul_sum_args(g, seed, offset, dist, inner, channels, segments);
  const at::Tensor gc = g.contiguous();
  at::Tensor out = at::zeros({channels}, gc.options().dtype(g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (gc.numel() == 0) return out;
  const auto [s, o] = read_cpu_stream(seed, offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "noise_mul_sum", [&] {
    noise_mul_sum_kernel(gc.const_data_ptr<scalar_t>(), out.data_ptr<acc_t<scalar_t>>(), gc.numel(), segments, inner,
                         channels, static_cast<int>(dist), s, o);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(noisekernels, CPU, m) {
  m.impl("noise_add", &noise_add);
  m.impl("noise_mul", &noise_mul);
  m.impl("noise_mul_sum", &noise_mul_sum);
}

}  // namespace noisekernels::cpu
