// Host launchers of the CUDA kernels: raw pointers, sizes and a cudaStream_t, no torch types, so
// csrc/cuda compiles with nvcc alone. Stream tensors (seed, offset) are device pointers read by
// the kernels. Each launcher returns the launch's cudaError_t.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace noisekernels::cuda {

// Floating dtypes the kernels read and write; arithmetic is float64 for kFloat64, else float32.
enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// out[i, 0..3] = Philox4x32-10(counter[i, 0..3], key[0..1]) for n counters (int64 words).
cudaError_t launch_philox4x32(int64_t* out, const int64_t* counter, const int64_t* key,
                              int64_t n, cudaStream_t stream);

// n uniforms (normal = false) or normals (normal = true) of the stream contract (version 2) in
// `segments` segments, under key *seed from counter *offset.
cudaError_t launch_philox_fill(void* out, DType dtype, int64_t n, int64_t segments,
                               const int64_t* seed, const int64_t* offset, bool normal,
                               cudaStream_t stream);

}  // namespace noisekernels::cuda

namespace noisekernels::cuda {

// Random Spiking forward: finite min/max of each of `groups` equal contiguous groups of x into
// `workspace` (2 * groups 64-bit words, order-preserving keys, no host round trip), then each
// element keeps x where U(keep word) < p, else lo + U(value word) * (hi - lo) clamped to hi; two
// elements per counter, `segments` segments. mask (ceil(n / 8) bytes) gets the keep tests packed:
// element i at bit i % 8 of byte i / 8.
cudaError_t launch_random_spike(const void* x, void* out, uint8_t* mask, DType dtype, int64_t n,
                                int64_t groups, int64_t segments, float p, const int64_t* seed,
                                const int64_t* offset, void* workspace, cudaStream_t stream);

// Random Spiking backward: grad where the element's bit of the forward's mask is set, else 0.
cudaError_t launch_random_spike_backward(const void* grad, const uint8_t* mask, void* out, DType dtype,
                                         int64_t n, cudaStream_t stream);

}  // namespace noisekernels::cuda

namespace noisekernels::cuda {

// Additive noise (noise_add): out[i] = x[i % numel_x] + scale[((i % numel_x) / inner) % channels]
// * eps_i for i < numel_x * replicas, eps of `dist` (NoiseDist) from the output's `segments`
// segments; clipped to [lo, hi] when clamp. scale is double for kFloat64 x, else float.
cudaError_t launch_noise_add(const void* x, const void* scale, void* out, DType dtype,
                             int64_t numel_x, int64_t replicas, int64_t segments, int64_t inner,
                             int64_t channels, int dist, bool clamp, double lo, double hi,
                             const int64_t* seed, const int64_t* offset, cudaStream_t stream);

// out[i] = grad[i] * eps_i (noise_mul): the learnable scale's gradient before its reduction.
cudaError_t launch_noise_mul(const void* grad, void* out, DType dtype, int64_t n, int64_t segments,
                             int dist, const int64_t* seed, const int64_t* offset,
                             cudaStream_t stream);

// The learnable scale's gradient: out[c] = sum of grad[i] * eps_i over the elements i of entry c
// ((i / inner) % channels, n a multiple of inner * channels), in a fixed order; out and workspace
// (noise_mul_sum_workspace(n, inner, channels) values) are double for kFloat64 grad, else float.
constexpr int64_t kNoiseMulSumPiece = 4096;  // elements one block sums
inline int64_t noise_mul_sum_workspace(int64_t n, int64_t inner, int64_t channels) {
  if (n == 0) return 0;
  if (channels == 1) inner = n;
  return n / inner * ((inner + kNoiseMulSumPiece - 1) / kNoiseMulSumPiece);
}
cudaError_t launch_noise_mul_sum(const void* grad, void* out, void* workspace, DType dtype, int64_t n,
                                 int64_t segments, int64_t inner, int64_t channels, int dist,
                                 const int64_t* seed, const int64_t* offset, cudaStream_t stream);

}  // namespace noisekernels::cuda

namespace noisekernels::cuda {

// Multi-tensor noise_add in one launch over `total` counters. meta (device, int64) holds for k
// tensors: k input pointers, k output pointers, k + 1 prefix sums of their counters
// (ceil(numel / 4) each), k counter starts and k element counts; tensor t's counter c holds its
// elements 4c .. 4c + 3, x + scales[t] * eps of counter *offset + starts[t] + c.
cudaError_t launch_noise_add_foreach(const int64_t* meta, int64_t k, int64_t total,
                                     const void* scales, DType dtype, int dist,
                                     const int64_t* seed, const int64_t* offset,
                                     cudaStream_t stream);

}  // namespace noisekernels::cuda

namespace noisekernels::cuda {

// replica_reduce over (n, b, c) logits into out (b, c): mean softmax (vote = false) or argmax
// vote counts with ties to the smaller index and NaN counted as -inf (vote = true). out is double
// whatever the logits' type: the sums over replicas accumulate there (a float sum drifts at large n).
cudaError_t launch_replica_reduce(const void* logits, void* out, DType dtype, int64_t n, int64_t b,
                                  int64_t c, bool vote, cudaStream_t stream);

}  // namespace noisekernels::cuda

namespace noisekernels::cuda {

// A Stream reservation (offset_reserve): *start = *offset, then *offset += n (modulo 2**64), as one
// atomic step on the device.
cudaError_t launch_offset_reserve(int64_t* offset, int64_t* start, int64_t n, cudaStream_t stream);

}  // namespace noisekernels::cuda
