// CUDA kernels of philox4x32, philox_uniform and philox_normal.
#include <noisekernels/cuda_launchers.h>
#include <noisekernels/philox.h>

#include "common.cuh"

namespace noisekernels::cuda {
namespace {

__global__ void philox4x32_kernel(int64_t* out, const int64_t* counter, const int64_t* key,
                                  int64_t n) {
  const uint32_t k0 = static_cast<uint32_t>(key[0]), k1 = static_cast<uint32_t>(key[1]);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t* c = counter + 4 * i;
    const Philox4 w =
        philox4x32_10(static_cast<uint32_t>(c[0]), static_cast<uint32_t>(c[1]),
                      static_cast<uint32_t>(c[2]), static_cast<uint32_t>(c[3]), k0, k1);
    out[4 * i] = w.w0;
    out[4 * i + 1] = w.w1;
    out[4 * i + 2] = w.w2;
    out[4 * i + 3] = w.w3;
  }
}

template <typename T, bool kNormal>
__global__ void philox_fill_kernel(T* out, int64_t n, const int64_t* seed, const int64_t* offset) {
  const uint64_t s = static_cast<uint64_t>(*seed), o = static_cast<uint64_t>(*offset);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Philox4 w = philox_at(s, o, static_cast<uint64_t>(i));
    out[i] = from_float<T>(kNormal ? normal_from_words(w.w0, w.w1) : uniform_from_word(w.w0));
  }
}

}  // namespace

cudaError_t launch_philox4x32(int64_t* out, const int64_t* counter, const int64_t* key, int64_t n,
                              cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  NK_LAUNCH(blocks_for(n), kThreads, 0, stream, philox4x32_kernel)(out, counter, key, n);
  return cudaGetLastError();
}

cudaError_t launch_philox_fill(void* out, DType dtype, int64_t n, const int64_t* seed,
                               const int64_t* offset, bool normal, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (normal) {
      NK_LAUNCH(blocks_for(n), kThreads, 0, stream, philox_fill_kernel<T, true>)(
          static_cast<T*>(out), n, seed, offset);
    } else {
      NK_LAUNCH(blocks_for(n), kThreads, 0, stream, philox_fill_kernel<T, false>)(
          static_cast<T*>(out), n, seed, offset);
    }
    return cudaGetLastError();
  });
}

}  // namespace noisekernels::cuda
