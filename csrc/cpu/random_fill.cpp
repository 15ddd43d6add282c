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
void fill(scalar_t* out, int64_t n, uint64_t seed, uint64_t offset) {
  const PhiloxKeys keys(seed);
  at::parallel_for(0, n, 8 * kTile, [&](int64_t begin, int64_t end) {
    alignas(64) float tile[kTile];
    for (int64_t t = begin; t < end; t += kTile) {
      const int64_t m = std::min(kTile, end - t);
      float* dst;
      if constexpr (std::is_same_v<scalar_t, float>) {
        dst = out + t;  // float32 is written in place
      } else {
        dst = tile;
      }
      if constexpr (kNormal) {
        normal_tile(keys, offset + t, m, dst);
      } else {
        uniform_tile(keys, offset + t, m, dst, nullptr);
      }
      if constexpr (!std::is_same_v<scalar_t, float>) {
        for (int64_t i = 0; i < m; ++i) out[t + i] = static_cast<scalar_t>(tile[i]);
      }
    }
  });
}

template <bool kNormal>
at::Tensor philox_fill(const at::Tensor& seed, const at::Tensor& offset, at::IntArrayRef size,
                       at::ScalarType dtype) {
  check_stream_args(seed, offset);
  check_floating(dtype, "dtype");
  at::Tensor out = at::empty(size, seed.options().dtype(dtype));
  const auto [s, o] = read_cpu_stream(seed, offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "philox_fill", [&] {
    fill<scalar_t, kNormal>(out.data_ptr<scalar_t>(), out.numel(), s, o);
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
