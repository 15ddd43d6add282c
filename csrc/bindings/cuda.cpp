// CUDA registrations: unpack tensors, call the torch-free launchers in csrc/cuda on the current
// stream. Built only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include <noisekernels/cuda_launchers.h>

#include "ops.h"

namespace noisekernels::cuda {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "noisekernels: unsupported dtype ", t);
  }
}

at::Tensor philox4x32(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.scalar_type() == at::kLong && key.scalar_type() == at::kLong,
              "philox4x32: counter and key must be int64 tensors of 32-bit words");
  TORCH_CHECK(counter.dim() >= 1 && counter.size(-1) == 4,
              "philox4x32: counter must have shape (..., 4), got ", counter.sizes());
  TORCH_CHECK(key.numel() == 2 && key.device() == counter.device(),
              "philox4x32: key must hold 2 words on counter's device");
  // Words outside 32 bits are rejected by noisekernels.random.philox4x32 (a check here would
  // read the tensors back to the host).
  const c10::cuda::CUDAGuard guard(counter.device());
  const at::Tensor c = counter.contiguous(), k = key.contiguous();
  at::Tensor out = at::empty_like(c);
  C10_CUDA_CHECK(launch_philox4x32(out.data_ptr<int64_t>(), c.const_data_ptr<int64_t>(),
                                   k.const_data_ptr<int64_t>(), c.numel() / 4,
                                   c10::cuda::getCurrentCUDAStream()));
  return out;
}

template <bool kNormal>
at::Tensor philox_fill(const at::Tensor& seed, const at::Tensor& offset, at::IntArrayRef size,
                       at::ScalarType dtype, int64_t segments) {
  check_stream_args(seed, offset);
  check_floating(dtype, "dtype");
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor out = at::empty(size, seed.options().dtype(dtype));
  check_segments(out.numel(), segments);
  C10_CUDA_CHECK(launch_philox_fill(out.data_ptr(), to_dtype(dtype), out.numel(), segments,
                                    seed.const_data_ptr<int64_t>(),
                                    offset.const_data_ptr<int64_t>(), kNormal,
                                    c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> random_spike(const at::Tensor& x, double p, const at::Tensor& seed,
                                                const at::Tensor& offset, int64_t groups, int64_t segments) {
  check_random_spike_args(x, p, seed, offset, groups, segments);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  at::Tensor mask = at::empty({(xc.numel() + 7) / 8}, xc.options().dtype(at::kByte));
  at::Tensor workspace = at::empty({2 * groups}, xc.options().dtype(at::kLong));  // 64-bit keys fit all dtypes
  C10_CUDA_CHECK(launch_random_spike(
      xc.const_data_ptr(), out.data_ptr(), mask.data_ptr<uint8_t>(), to_dtype(xc.scalar_type()), xc.numel(), groups,
      segments, static_cast<float>(p), seed.const_data_ptr<int64_t>(), offset.const_data_ptr<int64_t>(),
      workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return {out, mask};
}

at::Tensor random_spike_backward(const at::Tensor& grad, const at::Tensor& mask) {
  check_random_spike_backward_args(grad, mask);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor gc = grad.contiguous(), mc = mask.contiguous();
  at::Tensor out = at::empty_like(gc);
  C10_CUDA_CHECK(launch_random_spike_backward(gc.const_data_ptr(), mc.const_data_ptr<uint8_t>(), out.data_ptr(),
                                              to_dtype(gc.scalar_type()), gc.numel(),
                                              c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor noise_add(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& seed,
                     const at::Tensor& offset, int64_t dist, int64_t inner, int64_t channels,
                     int64_t replicas, std::optional<double> lo, std::optional<double> hi,
                     int64_t segments) {
  check_noise_add_args(x, scale, seed, offset, dist, inner, channels, replicas, lo, hi, segments);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), sc = scale.contiguous();
  std::vector<int64_t> size(xc.sizes().begin(), xc.sizes().end());
  if (replicas != 1) size[0] *= replicas;
  at::Tensor out = at::empty(size, xc.options());
  C10_CUDA_CHECK(launch_noise_add(
      xc.const_data_ptr(), sc.const_data_ptr(), out.data_ptr(), to_dtype(xc.scalar_type()),
      xc.numel(), replicas, segments, inner, channels, static_cast<int>(dist), lo.has_value(),
      lo.value_or(0.0), hi.value_or(0.0), seed.const_data_ptr<int64_t>(),
      offset.const_data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor noise_mul(const at::Tensor& g, const at::Tensor& seed, const at::Tensor& offset,
                     int64_t dist, int64_t segments) {
  check_noise_mul_args(g, seed, offset, dist, segments);
  const c10::cuda::CUDAGuard guard(g.device());
  const at::Tensor gc = g.contiguous();
  at::Tensor out = at::empty_like(gc);
  C10_CUDA_CHECK(launch_noise_mul(gc.const_data_ptr(), out.data_ptr(), to_dtype(gc.scalar_type()),
                                  gc.numel(), segments, static_cast<int>(dist),
                                  seed.const_data_ptr<int64_t>(), offset.const_data_ptr<int64_t>(),
                                  c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor noise_mul_sum(const at::Tensor& g, const at::Tensor& seed, const at::Tensor& offset,
                         int64_t dist, int64_t inner, int64_t channels, int64_t segments) {
  check_noise_mul_sum_args(g, seed, offset, dist, inner, channels, segments);
  const c10::cuda::CUDAGuard guard(g.device());
  const at::Tensor gc = g.contiguous();
  const auto acc = gc.options().dtype(gc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor out = at::zeros({channels}, acc);
  at::Tensor workspace = at::empty({noise_mul_sum_workspace(gc.numel(), inner, channels)}, acc);
  C10_CUDA_CHECK(launch_noise_mul_sum(gc.const_data_ptr(), out.data_ptr(), workspace.data_ptr(),
                                      to_dtype(gc.scalar_type()), gc.numel(), segments, inner, channels,
                                      static_cast<int>(dist), seed.const_data_ptr<int64_t>(),
                                      offset.const_data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::vector<at::Tensor> noise_add_foreach(at::TensorList xs, const at::Tensor& scales,
                                          const at::Tensor& seed, const at::Tensor& offset,
                                          at::IntArrayRef starts, int64_t dist) {
  check_noise_add_foreach_args(xs, scales, seed, offset, starts, dist);
  const c10::cuda::CUDAGuard guard(seed.device());
  const int64_t k = static_cast<int64_t>(xs.size());
  std::vector<at::Tensor> inputs, outputs;
  // The table the kernel reads: input and output pointers, counter prefix sums, counter starts,
  // element counts.
  at::Tensor meta = at::empty({5 * k + 1}, at::TensorOptions(at::kLong).pinned_memory(true));
  int64_t* m = meta.data_ptr<int64_t>();
  m[2 * k] = 0;
  for (int64_t i = 0; i < k; ++i) {
    inputs.push_back(xs[i].contiguous());
    outputs.push_back(at::empty_like(inputs.back()));
    m[i] = reinterpret_cast<int64_t>(inputs.back().const_data_ptr());
    m[k + i] = reinterpret_cast<int64_t>(outputs.back().data_ptr());
    m[2 * k + i + 1] = m[2 * k + i] + (xs[i].numel() + 3) / 4;
    m[3 * k + 1 + i] = starts[i];
    m[4 * k + 1 + i] = xs[i].numel();
  }
  if (k == 0 || m[3 * k] == 0) return outputs;
  const at::Tensor meta_dev = meta.to(seed.device(), /*non_blocking=*/true);
  C10_CUDA_CHECK(launch_noise_add_foreach(
      meta_dev.const_data_ptr<int64_t>(), k, m[3 * k], scales.contiguous().const_data_ptr(),
      to_dtype(xs[0].scalar_type()), static_cast<int>(dist), seed.const_data_ptr<int64_t>(),
      offset.const_data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()));
  return outputs;
}

at::Tensor replica_reduce(const at::Tensor& logits, int64_t mode) {
  check_replica_reduce_args(logits, mode);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const auto out_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sums = at::empty({x.size(1), x.size(2)}, x.options().dtype(at::kDouble));
  C10_CUDA_CHECK(launch_replica_reduce(x.const_data_ptr(), sums.data_ptr(), to_dtype(x.scalar_type()),
                                       x.size(0), x.size(1), x.size(2), mode == 1,
                                       c10::cuda::getCurrentCUDAStream()));
  return sums.to(out_type);
}

at::Tensor offset_reserve(at::Tensor& offset, int64_t n) {
  check_not_in_backward();
  check_offset_reserve_args(offset, n);
  const c10::cuda::CUDAGuard guard(offset.device());
  offset.unsafeGetTensorImpl()->bump_version();  // changed in place, as an add_ would
  at::Tensor start = at::empty_like(offset);
  C10_CUDA_CHECK(launch_offset_reserve(offset.data_ptr<int64_t>(), start.data_ptr<int64_t>(), n,
                                       c10::cuda::getCurrentCUDAStream()));
  return start;
}

}  // namespace

TORCH_LIBRARY_IMPL(noisekernels, CUDA, m) {
  m.impl("offset_reserve", &offset_reserve);
  m.impl("replica_reduce", &replica_reduce);
  m.impl("noise_add_foreach", &noise_add_foreach);
  m.impl("noise_add", &noise_add);
  m.impl("noise_mul", &noise_mul);
  m.impl("noise_mul_sum", &noise_mul_sum);
  m.impl("random_spike", &random_spike);
  m.impl("random_spike_backward", &random_spike_backward);
  m.impl("philox4x32", &philox4x32);
  m.impl("philox_uniform", &philox_fill<false>);
  m.impl("philox_normal", &philox_fill<true>);
}

}  // namespace noisekernels::cuda
