// CPU kernels of random_spike and random_spike_backward (Random Spiking, random-spiking.txt 4.2).
// Forward: two passes, the copy floor (a min/max reduction, then one read and one write): finite
// min/max per group, then per element keep x if U(keep word) < p, else lo + U(value word) *
// (hi - lo) clamped to hi, in float64 for float64 x (float32 cannot hold its range), else float32.
// Two elements per counter: (w0, w1) and (w2, w3). The forward also packs the keep tests into a
// bit mask (element i at bit i % 8 of byte i // 8: 1/8 byte per element), so the backward is a
// masked copy of grad at memory speed instead of a second pass of the generator.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "../bindings/ops.h"
#include "compute_type.h"
#include "philox_avx512.h"
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

// Packs the keep tests (keep[i] < p) of a run of m elements starting at element `first` of the
// call into mask. A run that starts a byte writes it whole (zeros above its last element); one
// that starts inside a byte ORs into it: the same thread wrote its start, as every thread's range
// of elements starts on a byte.
void pack_keep(const float* keep, int64_t m, float p, int64_t first, uint8_t* mask) {
  uint8_t* byte = mask + first / 8;
  int64_t i = 0;
  if (const int shift = static_cast<int>(first % 8)) {
    unsigned bits = 0;
    for (; i < m && shift + i < 8; ++i) bits |= static_cast<unsigned>(keep[i] < p) << (shift + i);
    *byte++ |= static_cast<uint8_t>(bits);
  }
#ifdef __AVX512F__
  const __m512 below = _mm512_set1_ps(p);
  for (; i + 16 <= m; i += 16, byte += 2) {
    const __mmask16 k = _mm512_cmp_ps_mask(_mm512_loadu_ps(keep + i), below, _CMP_LT_OQ);
    std::memcpy(byte, &k, 2);  // x86 is little-endian: elements i .. i + 7 in the first byte
  }
#endif
  for (; i < m; i += 8) {
    unsigned bits = 0;
    for (int l = 0; l < 8 && i + l < m; ++l) bits |= static_cast<unsigned>(keep[i + l] < p) << l;
    *byte++ = static_cast<uint8_t>(bits);
  }
}

#ifdef NK_PHILOX_AVX512
// Elements per step of spike_f32: the two of each counter of one generator step.
constexpr int64_t kSpikeStep = 2 * avx512::kStep;

// Random Spiking of float32 x straight from the generator's registers (no tile), for steps *
// kSpikeStep elements from counter `first` inside one group (range [lo, hi], d = hi - lo finite):
// the arithmetic of spike()'s elementwise loop, and the keep tests into mask from its first byte.
void spike_f32(const PhiloxKeys& keys, uint64_t first, int64_t steps, const float* x, float* out, uint8_t* mask,
               float p, float lo, float hi, float d) {
  using namespace avx512;
  const __m512 below = _mm512_set1_ps(p), a = _mm512_set1_ps(lo), b = _mm512_set1_ps(hi), width = _mm512_set1_ps(d);
  for (int64_t s = 0; s < steps; ++s) {
    __m512i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
    words_step(keys, first + s * kStep, c0, c1, c2, c3);
    for (int j = 0; j < kChains; ++j) {  // elements 16j .. 16j + 15 of the step, (w0, w2) / (w1, w3) per counter
      const int64_t i = s * kSpikeStep + 16 * j;
      const __mmask16 keep = _mm512_cmp_ps_mask(uniform16(pair_words(c0[j], c2[j])), below, _CMP_LT_OQ);
      __m512 v = _mm512_add_ps(a, _mm512_mul_ps(uniform16(pair_words(c1[j], c3[j])), width));
      v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, b, _CMP_GT_OQ), v, b);  // v > hi ? hi : v, signed zeros kept
      _mm512_storeu_ps(out + i, _mm512_mask_blend_ps(keep, v, _mm512_loadu_ps(x + i)));
      std::memcpy(mask + i / 8, &keep, 2);  // x86 is little-endian: elements i .. i + 7 in the first byte
    }
  }
}
#endif

template <typename scalar_t, typename acc>
void spike(const scalar_t* x, scalar_t* out, uint8_t* mask, int64_t n, int64_t segments, int64_t group_size,
           const acc* lo, const acc* hi, float p, uint64_t seed, uint64_t offset) {
  const PhiloxKeys keys(seed);
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
    alignas(64) float u0[kTile], u1[kTile];
    // Elements [t, t + m) from element `skip` of `counter`, through a tile of uniforms.
    auto by_tile = [&](int64_t t, int64_t m, uint64_t counter, int64_t skip) {
      spike_tile(keys, counter, run_counters(m, skip, 2), u0, u1);
      for (int64_t i0 = 0; i0 < m;) {  // runs of one group inside the tile
        const int64_t g = (t + i0) / group_size;
        const int64_t i1 = std::min(m, (g + 1) * group_size - t);
        // Locals, not the lambda's captured references: otherwise every store may alias them and
        // the loop stays scalar and branchy.
        const acc a = lo[g], b = hi[g], d = b - a;
        const float keep_below = p;
        const scalar_t* __restrict xs = x + t;
        scalar_t* __restrict os = out + t;
        const float* __restrict keep = u0 + skip;
        const float* __restrict value = u1 + skip;
        if (std::abs(d) < std::numeric_limits<acc>::infinity()) {
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) {
            acc v = a + static_cast<acc>(value[i]) * d;  // -ffp-contract=off: the same rounding as every backend
            v = v > b ? b : v;
            os[i] = keep[i] < keep_below ? xs[i] : static_cast<scalar_t>(v);
          }
        } else {  // a range wider than acc's largest value (or no finite value: NaN)
          for (int64_t i = i0; i < i1; ++i) {
            const acc u = static_cast<acc>(value[i]);
            acc v = (a - u * a) + u * b;
            v = v > b ? b : v;
            os[i] = keep[i] < keep_below ? xs[i] : static_cast<scalar_t>(v);
          }
        }
        i0 = i1;
      }
      pack_keep(u0 + skip, m, p, t, mask);
    };
    for_each_run(t0 * kTile, std::min(n, t1 * kTile), n, n / segments, 2, offset,
                 [&](int64_t t, int64_t m, uint64_t counter, int64_t skip) {
#ifdef NK_PHILOX_AVX512
      // float32 on whole counters: each group's whole steps from an element that starts a counter
      // and a mask byte (with a finite range), straight from the generator's registers; the rest
      // through the tile. Groups under two steps stay in one tile pass (a tile per group would cost
      // more than the registers save).
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (skip == 0 && group_size >= 2 * kSpikeStep) {
          for (int64_t i0 = 0; i0 < m;) {
            const int64_t g = (t + i0) / group_size, i1 = std::min(m, (g + 1) * group_size - t);
            const bool fuses = i0 % 2 == 0 && (t + i0) % 8 == 0 &&
                               std::abs(hi[g] - lo[g]) < std::numeric_limits<float>::infinity();
            const int64_t steps = fuses ? (i1 - i0) / kSpikeStep : 0;
            spike_f32(keys, counter + i0 / 2, steps, x + t + i0, out + t + i0, mask + (t + i0) / 8, p, lo[g], hi[g],
                      hi[g] - lo[g]);
            const int64_t done = i0 + steps * kSpikeStep;
            if (done < i1) by_tile(t + done, i1 - done, counter + done / 2, done % 2);
            i0 = i1;
          }
          return;
        }
      }
#endif
      by_tile(t, m, counter, skip);
    });
  });
}

// out[i] = grad[i] where bit i of mask is set, else +0, for elements [begin, end) (begin on a
// byte). Values move as bit patterns: kept elements are copied exactly, NaN payloads included.
template <typename scalar_t>
void masked_copy(const scalar_t* grad, const uint8_t* mask, scalar_t* out, int64_t begin, int64_t end) {
  int64_t i = begin;
#ifdef __AVX512F__
  // Masked zeroing loads: one mask bit per lane, 64 bytes of grad per step.
  if constexpr (sizeof(scalar_t) == 4) {
    for (; i + 16 <= end; i += 16) {
      __mmask16 k;
      std::memcpy(&k, mask + i / 8, 2);
      _mm512_storeu_si512(out + i, _mm512_maskz_loadu_epi32(k, grad + i));
    }
  } else if constexpr (sizeof(scalar_t) == 8) {
    for (; i + 8 <= end; i += 8) {
      _mm512_storeu_si512(out + i, _mm512_maskz_loadu_epi64(mask[i / 8], grad + i));
    }
  }
#ifdef __AVX512BW__
  if constexpr (sizeof(scalar_t) == 2) {
    for (; i + 32 <= end; i += 32) {
      __mmask32 k;
      std::memcpy(&k, mask + i / 8, 4);
      _mm512_storeu_si512(out + i, _mm512_maskz_loadu_epi16(k, grad + i));
    }
  }
#endif
#endif
  for (; i < end; ++i) out[i] = (mask[i / 8] >> (i % 8)) & 1 ? grad[i] : scalar_t(0);
}

std::tuple<at::Tensor, at::Tensor> random_spike(const at::Tensor& x, double p, const at::Tensor& seed,
                                                const at::Tensor& offset, int64_t groups, int64_t segments) {
  check_random_spike_args(x, p, seed, offset, groups, segments);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.numel();
  at::Tensor mask = at::empty({(n + 7) / 8}, xc.options().dtype(at::kByte));
  if (n == 0) return {out, mask};
  const auto [s, o] = read_cpu_stream(seed, offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "random_spike", [&] {
    using acc = acc_t<scalar_t>;
    std::vector<acc> lo(groups), hi(groups);
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    group_minmax(xp, groups, n / groups, lo.data(), hi.data());
    spike(xp, out.data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(), n, segments, n / groups, lo.data(), hi.data(),
          static_cast<float>(p), s, o);
  });
  return {out, mask};
}

at::Tensor random_spike_backward(const at::Tensor& grad, const at::Tensor& mask) {
  check_random_spike_backward_args(grad, mask);
  const at::Tensor gc = grad.contiguous(), mc = mask.contiguous();
  at::Tensor out = at::empty_like(gc);
  const int64_t n = gc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "random_spike_backward", [&] {
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const uint8_t* mp = mc.const_data_ptr<uint8_t>();
    // Chunks of whole bytes of the mask, 32 KiB of float32 grad at least.
    at::parallel_for(0, (n + 7) / 8, 1024, [&](int64_t b0, int64_t b1) {
      masked_copy(gp, mp, op, b0 * 8, std::min(n, b1 * 8));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(noisekernels, CPU, m) {
  m.impl("random_spike", &random_spike);
  m.impl("random_spike_backward", &random_spike_backward);
}

}  // namespace noisekernels::cpu
