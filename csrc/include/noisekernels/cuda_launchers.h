// Host launchers of the CUDA kernels: raw pointers, sizes and a cudaStream_t, no torch types, so
// csrc/cuda compiles with nvcc alone. Stream tensors (seed, offset) are device pointers read by
// the kernels. Each launcher returns the launch's cudaError_t.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace noisekernels::cuda {

// Floating dtypes the kernels read and write; arithmetic is float32 inside.
enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// out[i, 0..3] = Philox4x32-10(counter[i, 0..3], key[0..1]) for n counters (int64 words).
cudaError_t launch_philox4x32(int64_t* out, const int64_t* counter, const int64_t* key,
                              int64_t n, cudaStream_t stream);

// out[i] = U(w0) (normal = false) or the contract's normal (normal = true) of counter
// *offset + i under key *seed, i < n.
cudaError_t launch_philox_fill(void* out, DType dtype, int64_t n, const int64_t* seed,
                               const int64_t* offset, bool normal, cudaStream_t stream);

}  // namespace noisekernels::cuda

namespace noisekernels::cuda {

// Random Spiking forward: finite min/max of each of `groups` equal contiguous groups of x into
// `workspace` (2 * groups words, order-preserving keys, no host round trip), then out[i] = x[i]
// where U(w0) < p, else lo + U(w1) * (hi - lo) clamped to hi, for counter *offset + i.
cudaError_t launch_random_spike(const void* x, void* out, DType dtype, int64_t n, int64_t groups,
                                float p, const int64_t* seed, const int64_t* offset,
                                uint32_t* workspace, cudaStream_t stream);

// Random Spiking backward: out[i] = grad[i] where U(w0) < p, else 0.
cudaError_t launch_random_spike_backward(const void* grad, void* out, DType dtype, int64_t n,
                                         float p, const int64_t* seed, const int64_t* offset,
                                         cudaStream_t stream);

}  // namespace noisekernels::cuda

namespace noisekernels::cuda {

// Additive noise (noise_add): out[i] = x[i % numel_x] + scale[((i % numel_x) / inner) % channels]
// * eps_i for i < numel_x * replicas, eps of `dist` (NoiseDist); clipped to [lo, hi] when clamp.
// scale is double for kFloat64 x, else float.
cudaError_t launch_noise_add(const void* x, const void* scale, void* out, DType dtype,
                             int64_t numel_x, int64_t replicas, int64_t inner, int64_t channels,
                             int dist, bool clamp, double lo, double hi, const int64_t* seed,
                             const int64_t* offset, cudaStream_t stream);

// out[i] = grad[i] * eps_i (noise_mul): the learnable scale's gradient before its reduction.
cudaError_t launch_noise_mul(const void* grad, void* out, DType dtype, int64_t n, int dist,
                             const int64_t* seed, const int64_t* offset, cudaStream_t stream);

}  // namespace noisekernels::cuda

namespace noisekernels::cuda {

// Multi-tensor noise_add in one launch. meta (device, int64) holds for k tensors: k input
// pointers, k output pointers, k + 1 element prefix sums (first[k]) and k counter starts; tensor
// k's element i becomes x + scales[k] * eps of counter *offset + starts[k] + i.
cudaError_t launch_noise_add_foreach(const int64_t* meta, int64_t k, int64_t total,
                                     const void* scales, DType dtype, int dist,
                                     const int64_t* seed, const int64_t* offset,
                                     cudaStream_t stream);

}  // namespace noisekernels::cuda

namespace noisekernels::cuda {

// replica_reduce over (n, b, c) logits into out (b, c): mean softmax (vote = false) or argmax
// vote counts with ties to the smaller index (vote = true). out is double for kFloat64 logits,
// else float.
cudaError_t launch_replica_reduce(const void* logits, void* out, DType dtype, int64_t n, int64_t b,
                                  int64_t c, bool vote, cudaStream_t stream);

}  // namespace noisekernels::cuda
