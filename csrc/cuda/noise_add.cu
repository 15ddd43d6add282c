// CUDA kernels of noise_add and noise_mul (additive noise, its replicas, grad * eps): one counter
// per thread-step, its four words the eps of four consecutive elements, loaded and stored as one
// vector where the run is whole and aligned.
#include <noisekernels/cuda_launchers.h>
#include <noisekernels/philox.h>

#include "common.cuh"

namespace noisekernels::cuda {
namespace {

template <typename T, bool kClamp>
__global__ void noise_add_kernel(const T* x, const typename Acc<T>::type* scale, T* out,
                                 int64_t total, int64_t size, int64_t per_segment, int64_t numel_x,
                                 int64_t inner, int64_t channels, int dist,
                                 typename Acc<T>::type lo, typename Acc<T>::type hi,
                                 const int64_t* seed, const int64_t* offset) {
  using A = typename Acc<T>::type;
  const uint64_t s = static_cast<uint64_t>(*seed), o = static_cast<uint64_t>(*offset);
  NK_FOR_EACH_COUNTER(c, total) {
    float eps[4];
    noise4_from_words(dist, philox_counter(s, o + static_cast<uint64_t>(c)), eps);
    int m;
    const int64_t i = counter_elements<4>(c, size, per_segment, &m);
    const int64_t j = i % numel_x;
    T xv[4];
    if (j + m <= numel_x) {
      load_run<4>(x + j, m, xv);
    } else {  // the run wraps into the next replica of x
      for (int l = 0; l < m; ++l) xv[l] = x[(j + l) % numel_x];
    }
    T t[4] = {};
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (l < m) {
        const int64_t jl = (j + l) % numel_x;
        A v = add_rn(to_acc(xv[l]), mul_rn(scale[(jl / inner) % channels], static_cast<A>(eps[l])));
        if (kClamp) {
          v = v < lo ? lo : v;
          v = v > hi ? hi : v;
        }
        t[l] = from_acc<T>(v);
      }
    }
    store_run<4>(out + i, m, t);
  }
}

template <typename T>
__global__ void noise_mul_kernel(const T* grad, T* out, int64_t total, int64_t size,
                                 int64_t per_segment, int dist, const int64_t* seed,
                                 const int64_t* offset) {
  using A = typename Acc<T>::type;
  const uint64_t s = static_cast<uint64_t>(*seed), o = static_cast<uint64_t>(*offset);
  NK_FOR_EACH_COUNTER(c, total) {
    float eps[4];
    noise4_from_words(dist, philox_counter(s, o + static_cast<uint64_t>(c)), eps);
    int m;
    const int64_t i = counter_elements<4>(c, size, per_segment, &m);
    T t[4] = {};
    load_run<4>(grad + i, m, t);
#pragma unroll
    for (int l = 0; l < 4; ++l) t[l] = from_acc<T>(mul_rn(to_acc(t[l]), static_cast<A>(eps[l])));
    store_run<4>(out + i, m, t);
  }
}

}  // namespace

cudaError_t launch_noise_add(const void* x, const void* scale, void* out, DType dtype,
                             int64_t numel_x, int64_t replicas, int64_t segments, int64_t inner,
                             int64_t channels, int dist, bool clamp, double lo, double hi,
                             const int64_t* seed, const int64_t* offset, cudaStream_t stream) {
  const int64_t n = numel_x * replicas;
  if (n == 0) return cudaSuccess;
  const int64_t size = n / segments, per_segment = counters_per_segment(size, 4);
  const int64_t total = segments * per_segment;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const T* xp = static_cast<const T*>(x);
    const A* sp = static_cast<const A*>(scale);
    if (clamp) {
      NK_LAUNCH(blocks_for(total), kThreads, 0, stream, noise_add_kernel<T, true>)(
          xp, sp, static_cast<T*>(out), total, size, per_segment, numel_x, inner, channels, dist,
          static_cast<A>(lo), static_cast<A>(hi), seed, offset);
    } else {
      NK_LAUNCH(blocks_for(total), kThreads, 0, stream, noise_add_kernel<T, false>)(
          xp, sp, static_cast<T*>(out), total, size, per_segment, numel_x, inner, channels, dist,
          A(0), A(0), seed, offset);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_noise_mul(const void* grad, void* out, DType dtype, int64_t n, int64_t segments,
                             int dist, const int64_t* seed, const int64_t* offset,
                             cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t size = n / segments, per_segment = counters_per_segment(size, 4);
  const int64_t total = segments * per_segment;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    NK_LAUNCH(blocks_for(total), kThreads, 0, stream, noise_mul_kernel<T>)(
        static_cast<const T*>(grad), static_cast<T*>(out), total, size, per_segment, dist, seed, offset);
    return cudaGetLastError();
  });
}

}  // namespace noisekernels::cuda
