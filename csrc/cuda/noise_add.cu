// CUDA kernels of noise_add, noise_mul and noise_mul_sum (additive noise, its replicas, grad * eps
// and its sum per scale entry): one counter per thread-step, its four words the eps of four
// consecutive elements, loaded and stored as one vector where the run is whole and aligned.
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
    for (int l = 0; l < 4; ++l) t[l] = from_acc<T>(mul_rn(to_acc(t[l]), static_cast<A>(eps[l])));
    store_run<4>(out + i, m, t);
  }
}

// Sum over the block in a fixed order (shuffle tree, then the warps' sums in order); thread 0 gets
// it. blockDim.x a multiple of 32, at most 1024.
template <typename A>
__device__ __forceinline__ A block_sum(A v) {
  __shared__ A warp_sums[32];
  for (int d = 16; d > 0; d >>= 1) v = add_rn(v, __shfl_xor_sync(0xFFFFFFFFu, v, d));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    v = warp_sums[0];
    for (int w = 1; w < warps; ++w) v = add_rn(v, warp_sums[w]);
  }
  __syncthreads();  // warp_sums is free for the block's next call
  return v;
}

// sums[q] = sum(grad * eps) over piece q: part q % parts (at most kNoiseMulSumPiece elements) of
// run q / parts (`inner` consecutive elements of one scale entry), one block per piece.
template <typename T>
__global__ void noise_mul_sum_pieces_kernel(const T* grad, typename Acc<T>::type* sums, int64_t pieces,
                                            int64_t size, int64_t per_segment, int64_t inner,
                                            int64_t parts, int dist, const int64_t* seed,
                                            const int64_t* offset) {
  using A = typename Acc<T>::type;
  const uint64_t s = static_cast<uint64_t>(*seed), o = static_cast<uint64_t>(*offset);
  for (int64_t q = blockIdx.x; q < pieces; q += gridDim.x) {
    const int64_t u = q / parts, begin = u * inner + (q - u * parts) * kNoiseMulSumPiece;
    const int64_t end = begin + kNoiseMulSumPiece < (u + 1) * inner ? begin + kNoiseMulSumPiece : (u + 1) * inner;
    const int64_t k0 = begin / size, k1 = (end - 1) / size;
    const int64_t first = k0 * per_segment + (begin - k0 * size) / 4;
    const int64_t last = k1 * per_segment + (end - 1 - k1 * size) / 4;
    A total = 0;
    for (int64_t c = first + threadIdx.x; c <= last; c += blockDim.x) {
      float eps[4];
      noise4_from_words(dist, philox_counter(s, o + static_cast<uint64_t>(c)), eps);
      int m;
      const int64_t i = counter_elements<4>(c, size, per_segment, &m);
      for (int l = 0; l < m; ++l) {
        if (i + l >= begin && i + l < end) total = add_rn(total, mul_rn(to_acc(grad[i + l]), static_cast<A>(eps[l])));
      }
    }
    total = block_sum(total);
    if (threadIdx.x == 0) sums[q] = total;
  }
}

// out[c] = the sums of entry c's pieces (runs c, c + channels, ...), in order.
template <typename A>
__global__ void noise_mul_sum_entries_kernel(const A* sums, A* out, int64_t runs, int64_t channels,
                                             int64_t parts) {
  NK_FOR_EACH_COUNTER(c, channels) {
    A total = 0;
    for (int64_t u = c; u < runs; u += channels) {
      for (int64_t k = 0; k < parts; ++k) total = add_rn(total, sums[u * parts + k]);
    }
    out[c] = total;
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

cudaError_t launch_noise_mul_sum(const void* grad, void* out, void* workspace, DType dtype, int64_t n,
                                 int64_t segments, int64_t inner, int64_t channels, int dist,
                                 const int64_t* seed, const int64_t* offset, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (channels == 1) inner = n;  // one entry: all elements are one run
  const int64_t size = n / segments, per_segment = counters_per_segment(size, 4);
  const int64_t runs = n / inner, parts = (inner + kNoiseMulSumPiece - 1) / kNoiseMulSumPiece;
  const int64_t pieces = runs * parts;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    A* sums = static_cast<A*>(workspace);
    const unsigned int blocks = static_cast<unsigned int>(pieces < kMaxBlocks ? pieces : kMaxBlocks);
    NK_LAUNCH(blocks, kThreads, 0, stream, noise_mul_sum_pieces_kernel<T>)(
        static_cast<const T*>(grad), sums, pieces, size, per_segment, inner, parts, dist, seed, offset);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    NK_LAUNCH(blocks_for(channels), kThreads, 0, stream, noise_mul_sum_entries_kernel<A>)(
        sums, static_cast<A*>(out), runs, channels, parts);
    return cudaGetLastError();
  });
}

}  // namespace noisekernels::cuda
