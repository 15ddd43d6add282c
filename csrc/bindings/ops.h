// Argument checks shared by the CPU and CUDA registrations of every op.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <utility>

namespace noisekernels {

// A stream's seed and offset arrive as one-element int64 tensors (module buffers) on the op's
// device; the kernel reads them there, so nothing syncs with the host.
void check_stream_args(const at::Tensor& seed, const at::Tensor& offset);

// The dtypes the noise kernels read and write.
void check_floating(at::ScalarType dtype, const char* name);

// A call's segment count (ARCHITECTURE.md section 2): >= 1 and dividing numel.
void check_segments(int64_t numel, int64_t segments);

// random_spike's arguments; the stream must be on x's device.
void check_random_spike_args(const at::Tensor& x, double p, const at::Tensor& seed,
                             const at::Tensor& offset, int64_t groups, int64_t segments);

// random_spike_backward's: mask is the forward's packed keep mask, ceil(numel / 8) uint8 bytes.
void check_random_spike_backward_args(const at::Tensor& grad, const at::Tensor& mask);

// noise_add's arguments: scale holds `channels` values in x's compute dtype (float64 for float64 x,
// else float32); element i of replica r of x uses scale[(i / inner) % channels].
void check_noise_add_args(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& seed,
                          const at::Tensor& offset, int64_t dist, int64_t inner, int64_t channels,
                          int64_t replicas, std::optional<double> lo, std::optional<double> hi,
                          int64_t segments);
void check_noise_mul_args(const at::Tensor& g, const at::Tensor& seed, const at::Tensor& offset,
                          int64_t dist, int64_t segments);
// noise_mul_sum's: noise_mul's, and grad made of whole periods of inner * channels elements.
void check_noise_mul_sum_args(const at::Tensor& g, const at::Tensor& seed, const at::Tensor& offset,
                              int64_t dist, int64_t inner, int64_t channels, int64_t segments);

// noise_add_foreach's arguments: tensors of one device and dtype, one scale and one counter start each.
void check_noise_add_foreach_args(at::TensorList xs, const at::Tensor& scales, const at::Tensor& seed,
                                  const at::Tensor& offset, at::IntArrayRef starts, int64_t dist);

// replica_reduce's arguments: (n, B, C) floating logits, mode 0 (mean softmax) or 1 (votes).
void check_replica_reduce_args(const at::Tensor& logits, int64_t mode);

// Lets this thread's offset_snapshot and offset_reserve calls run during a backward pass
// (noisekernels.fresh_noise_in_backward); returns the previous setting.
bool set_fresh_noise_in_backward(bool on);

// Refuses a Stream reservation during a backward pass, unless this thread allowed it (above).
void check_not_in_backward();

// Gives back the reservation [start, start + n) of a CPU offset if it is the last one made (a
// compare-and-swap, so a reservation made after it is never handed out twice); returns whether it did.
bool offset_release_cpu(at::Tensor& offset, int64_t start, int64_t n);

// noisekernels::noise_add through the dispatcher (its Autograd kernel included; noise_add_autograd.cpp).
at::Tensor noise_add_op(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& seed,
                        const at::Tensor& offset, int64_t dist, int64_t inner, int64_t channels,
                        int64_t replicas, std::optional<double> lo, std::optional<double> hi,
                        int64_t segments);

// offset_reserve's arguments: a one-element int64 offset and a count n >= 0.
void check_offset_reserve_args(const at::Tensor& offset, int64_t n);

// Seed and offset values of CPU stream tensors, as the 64-bit words the kernels use.
std::pair<uint64_t, uint64_t> read_cpu_stream(const at::Tensor& seed, const at::Tensor& offset);

}  // namespace noisekernels
