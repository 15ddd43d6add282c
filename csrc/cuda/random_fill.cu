// CUDA kernels of philox4x32, philox_uniform and philox_normal: one counter per thread-step, its
// four words the four elements (uniforms, or two Box-Muller pairs), stored as one vector.
#include <noisekernels/cuda_launchers.h>
#include <noisekernels/philox.h>

#include "common.cuh"

namespace noisekernels::cuda {
namespace {

__global__ void philox4x32_kernel(int64_t* out, const int64_t* counter, const int64_t* key,
                                  int64_t n) {
  const uint32_t k0 = static_cast<uint32_t>(key[0]), k1 = static_cast<uint32_t>(key[1]);
  NK_FOR_EACH_COUNTER(i, n) {
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
__global__ void philox_fill_kernel(T* out, int64_t total, int64_t size, int64_t per_segment,
                                   const int64_t* seed, const int64_t* offset) {
  const uint64_t s = static_cast<uint64_t>(*seed), o = static_cast<uint64_t>(*offset);
  NK_FOR_EACH_COUNTER(c, total) {
    const Philox4 w = philox_counter(s, o + static_cast<uint64_t>(c));
    float v[4];
    if (kNormal) {
      normal_pair(w.w0, w.w1, v);
      normal_pair(w.w2, w.w3, v + 2);
    } else {
      v[0] = uniform_from_word(w.w0);
      v[1] = uniform_from_word(w.w1);
      v[2] = uniform_from_word(w.w2);
      v[3] = uniform_from_word(w.w3);
    }
    int m;
    const int64_t i = counter_elements<4>(c, size, per_segment, &m);
    T t[4] = {};
#pragma unroll
    for (int l = 0; l < 4; ++l) t[l] = from_float<T>(v[l]);
    store_run<4>(out + i, m, t);
  }
}

}  // namespace

cudaError_t launch_philox4x32(int64_t* out, const int64_t* counter, const int64_t* key, int64_t n,
                              cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  NK_LAUNCH(blocks_for(n), kThreads, 0, stream, philox4x32_kernel)(out, counter, key, n);
  return cudaGetLastError();
}

cudaError_t launch_philox_fill(void* out, DType dtype, int64_t n, int64_t segments,
                               const int64_t* seed, const int64_t* offset, bool normal,
                               cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t size = n / segments, per_segment = counters_per_segment(size, 4);
  const int64_t total = segments * per_segment;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (normal) {
      NK_LAUNCH(blocks_for(total), kThreads, 0, stream, philox_fill_kernel<T, true>)(
          static_cast<T*>(out), total, size, per_segment, seed, offset);
    } else {
      NK_LAUNCH(blocks_for(total), kThreads, 0, stream, philox_fill_kernel<T, false>)(
          static_cast<T*>(out), total, size, per_segment, seed, offset);
    }
    return cudaGetLastError();
  });
}

}  // namespace noisekernels::cuda
