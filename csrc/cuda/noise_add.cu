// CUDA kernels of noise_add and noise_mul (additive noise, its replicas, grad * eps).
#include <noisekernels/cuda_launchers.h>
#include <noisekernels/philox.h>

#include "common.cuh"

namespace noisekernels::cuda {
namespace {

template <typename T, bool kClamp>
__global__ void noise_add_kernel(const T* x, const typename Acc<T>::type* scale, T* out, int64_t n,
                                 int64_t numel_x, int64_t inner, int64_t channels, int dist,
                                 typename Acc<T>::type lo, typename Acc<T>::type hi,
                                 const int64_t* seed, const int64_t* offset) {
  using A = typename Acc<T>::type;
  const uint64_t s = static_cast<uint64_t>(*seed), o = static_cast<uint64_t>(*offset);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i % numel_x;
    const Philox4 w = philox_at(s, o, static_cast<uint64_t>(i));
    const A eps = static_cast<A>(noise_from_words(dist, w.w0, w.w1));
    A v = add_rn(to_acc(x[j]), mul_rn(scale[(j / inner) % channels], eps));
    if (kClamp) {
      v = v < lo ? lo : v;
      v = v > hi ? hi : v;
    }
    out[i] = from_acc<T>(v);
  }
}

template <typename T>
__global__ void noise_mul_kernel(const T* grad, T* out, int64_t n, int dist, const int64_t* seed,
                                 const int64_t* offset) {
  using A = typename Acc<T>::type;
  const uint64_t s = static_cast<uint64_t>(*seed), o = static_cast<uint64_t>(*offset);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Philox4 w = philox_at(s, o, static_cast<uint64_t>(i));
    out[i] = from_acc<T>(mul_rn(to_acc(grad[i]), static_cast<A>(noise_from_words(dist, w.w0, w.w1))));
  }
}

}  // namespace

cudaError_t launch_noise_add(const void* x, const void* scale, void* out, DType dtype,
                             int64_t numel_x, int64_t replicas, int64_t inner, int64_t channels,
                             int dist, bool clamp, double lo, double hi, const int64_t* seed,
                             const int64_t* offset, cudaStream_t stream) {
  const int64_t n = numel_x * replicas;
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const T* xp = static_cast<const T*>(x);
    const A* sp = static_cast<const A*>(scale);
    if (clamp) {
      NK_LAUNCH(blocks_for(n), kThreads, 0, stream, noise_add_kernel<T, true>)(
          xp, sp, static_cast<T*>(out), n, numel_x, inner, channels, dist, static_cast<A>(lo),
          static_cast<A>(hi), seed, offset);
    } else {
      NK_LAUNCH(blocks_for(n), kThreads, 0, stream, noise_add_kernel<T, false>)(
          xp, sp, static_cast<T*>(out), n, numel_x, inner, channels, dist, A(0), A(0), seed, offset);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_noise_mul(const void* grad, void* out, DType dtype, int64_t n, int dist,
                             const int64_t* seed, const int64_t* offset, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    NK_LAUNCH(blocks_for(n), kThreads, 0, stream, noise_mul_kernel<T>)(
        static_cast<const T*>(grad), static_cast<T*>(out), n, dist, seed, offset);
    return cudaGetLastError();
  });
}

}  // namespace noisekernels::cuda
