// CPU kernels of philox4x32, philox_uniform and philox_normal.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../bindings/ops.h"
#include "philox_cpu.h"

namespace noisekernels::cpu {
namespace {

at::Tensor philox4x32(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.scalar_type() == at::kLong && key.scalar_type() == at::kLong,
              "philox4x32: counter and key must be int64 tensors of 32-bit words");
  TORCH_CHECK(counter.dim() >= 1 && counter.size(-1) == 4,
              "philox4x32: counter must have shape (..., 4), got ", counter.sizes());
  TORCH_CHECK(key.numel() == 2, "philox4x32: key must hold 2 words, got ", key.numel());
  const at::Tensor c = counter.contiguous(), k = key.contiguous();
  for (const auto* t : {&c, &k}) {
    const int64_t* p = t->const_data_ptr<int64_t>();
    TORCH_CHECK(std::all_of(p, p + t->numel(), [](int64_t w) { return w >= 0 && w <= 0xFFFFFFFFll; }),
                "philox4x32: ", t == &c ? "counter" : "key", " words must be in [0, 2**32)");
  }
  at::Tensor out = at::empty_like(c);
  const int64_t* cp = c.const_data_ptr<int64_t>();
  const int64_t* kp = k.const_data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  const uint32_t k0 = static_cast<uint32_t>(kp[0]), k1 = static_cast<uint32_t>(kp[1]);
  at::parallel_for(0, c.numel() / 4, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t* ci = cp + 4 * i;
      const Philox4 w = philox4x32_10(static_cast<uint32_t>(ci[0]), static_cast<uint32_t>(ci[1]),
                                      static_cast<uint32_t>(ci[2]), static_cast<uint32_t>(ci[3]),
                                      k0, k1);
      op[4 * i] = w.w0;
      op[4 * i + 1] = w.w1;
      op[4 * i + 2] = w.w2;
      op[4 * i + 3] = w.w3;
    }
  });
  return out;
}

template <typename scalar_t, bool kNormal>
void fill(scalar_t* out, int64_t n, int64_t segments, uint64_t seed, uint64_t offset) {
  const PhiloxKeys keys(seed);
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
    alignas(64) float tile[kTile];
    for_each_run(t0 * kTile, std::min(n, t1 * kTile), n, n / segments, 4, offset,
                 [&](int64_t i, int64_t m, uint64_t counter, int64_t skip) {
      // float32 runs of whole counters are written in place; the rest goes through the tile.
      const bool direct = std::is_same_v<scalar_t, float> && skip == 0 && m % 4 == 0;
      float* dst = direct ? reinterpret_cast<float*>(out + i) : tile;
      if constexpr (kNormal) {
        normal4_tile(keys, counter, run_counters(m, skip, 4), dst);
      } else {
        uniform4_tile(keys, counter, run_counters(m, skip, 4), dst);
      }
      if (!direct) {
        for (int64_t k = 0; k < m; ++k) out[i + k] = static_cast<scalar_t>(tile[skip + k]);
      }
    });
  });
}

template <bool kNormal>
at::Tensor philox_fill(const at::Tensor& seed, const at::Tensor& offset, at::IntArrayRef size,
                       at::ScalarType dtype, int64_t segments) {
  check_stream_args(seed, offset);
  check_floating(dtype, "dtype");
  at::Tensor out = at::empty(size, seed.options().dtype(dtype));
  check_segments(out.numel(), segments);
  if (out.numel() == 0) return out;
  const auto [s, o] = read_cpu_stream(seed, offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "philox_fill", [&] {
    fill<scalar_t, kNormal>(out.data_ptr<scalar_t>(), out.numel(), segments, s, o);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(noisekernels, CPU, m) {
  m.impl("philox4x32", &philox4x32);
  m.impl("philox_uniform", &philox_fill<false>);
  m.impl("philox_normal", &philox_fill<true>);
}

}  // namespace noisekernels::cpu
