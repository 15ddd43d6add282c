// CUDA kernels of random_spike and random_spike_backward (Random Spiking).
#include <noisekernels/cuda_launchers.h>
#include <noisekernels/philox.h>

#include "common.cuh"

namespace noisekernels::cuda {
namespace {

// Enough blocks per group to fill the GPU when there is one group, no more than the group needs.
constexpr int64_t kReduceItemsPerThread = 16;

template <typename T>
__global__ void group_minmax_kernel(const T* x, int64_t group_size, int64_t per_group,
                                    int64_t groups, uint32_t* keys) {
  const int64_t g = blockIdx.x / per_group, j = blockIdx.x % per_group;
  const T* xg = x + g * group_size;
  float mn = kInf, mx = -kInf;
  for (int64_t i = j * blockDim.x + threadIdx.x; i < group_size; i += per_group * blockDim.x) {
    const float v = to_float(xg[i]);
    const bool finite = fabsf(v) < kInf;  // false for NaN and +-inf
    mn = fminf(mn, finite ? v : kInf);
    mx = fmaxf(mx, finite ? v : -kInf);
  }
  block_minmax(mn, mx);
  if (threadIdx.x == 0) {
    atomicMin(keys + g, float_key(mn));
    atomicMax(keys + groups + g, float_key(mx));
  }
}

template <typename T>
__global__ void random_spike_kernel(const T* x, T* out, int64_t n, int64_t group_size,
                                    int64_t groups, const uint32_t* keys, float p,
                                    const int64_t* seed, const int64_t* offset) {
  const uint64_t s = static_cast<uint64_t>(*seed), o = static_cast<uint64_t>(*offset);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Philox4 w = philox_at(s, o, static_cast<uint64_t>(i));
    if (uniform_from_word(w.w0) < p) {
      out[i] = x[i];
    } else {
      const int64_t g = groups == 1 ? 0 : i / group_size;
      const float lo = key_float(keys[g]), hi = key_float(keys[groups + g]);
      // Explicit round-to-nearest ops: no FMA, the same rounding as the CPU and the reference.
      float v = __fadd_rn(lo, __fmul_rn(uniform_from_word(w.w1), __fsub_rn(hi, lo)));
      v = v > hi ? hi : v;
      out[i] = from_float<T>(v);
    }
  }
}

template <typename T>
__global__ void random_spike_backward_kernel(const T* grad, T* out, int64_t n, float p,
                                             const int64_t* seed, const int64_t* offset) {
  const uint64_t s = static_cast<uint64_t>(*seed), o = static_cast<uint64_t>(*offset);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Philox4 w = philox_at(s, o, static_cast<uint64_t>(i));
    out[i] = uniform_from_word(w.w0) < p ? grad[i] : from_float<T>(0.0f);
  }
}

}  // namespace

cudaError_t launch_random_spike(const void* x, void* out, DType dtype, int64_t n, int64_t groups,
                                float p, const int64_t* seed, const int64_t* offset,
                                uint32_t* workspace, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t group_size = n / groups;
  int64_t per_group = (group_size + kThreads * kReduceItemsPerThread - 1) / (kThreads * kReduceItemsPerThread);
  per_group = per_group < 1 ? 1 : (per_group > kMaxBlocks ? kMaxBlocks : per_group);
  cudaError_t err = cudaMemsetAsync(workspace, 0xFF, groups * sizeof(uint32_t), stream);  // min keys
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(workspace + groups, 0, groups * sizeof(uint32_t), stream);  // max keys
  if (err != cudaSuccess) return err;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    NK_LAUNCH(static_cast<unsigned int>(groups * per_group), kThreads, 0, stream, group_minmax_kernel<T>)(
        xp, group_size, per_group, groups, workspace);
    NK_LAUNCH(blocks_for(n), kThreads, 0, stream, random_spike_kernel<T>)(
        xp, static_cast<T*>(out), n, group_size, groups, workspace, p, seed, offset);
    return cudaGetLastError();
  });
}

cudaError_t launch_random_spike_backward(const void* grad, void* out, DType dtype, int64_t n,
                                         float p, const int64_t* seed, const int64_t* offset,
                                         cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    NK_LAUNCH(blocks_for(n), kThreads, 0, stream, random_spike_backward_kernel<T>)(
        static_cast<const T*>(grad), static_cast<T*>(out), n, p, seed, offset);
    return cudaGetLastError();
  });
}

}  // namespace noisekernels::cuda
