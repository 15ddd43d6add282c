// CUDA kernels of random_spike and random_spike_backward (Random Spiking): one thread-step per byte
// of the packed keep mask (8 elements, loaded and stored as one vector), two elements per counter
// ((w0, w1) and (w2, w3): keep test, value). min/max and the spiked value are float64 for float64
// x, else float32. The backward is a masked copy of grad under the forward's mask.
#include <noisekernels/cuda_launchers.h>
#include <noisekernels/philox.h>

#include "common.cuh"

namespace noisekernels::cuda {
namespace {

// Enough blocks per group to fill the GPU when there is one group, no more than the group needs.
constexpr int64_t kReduceItemsPerThread = 16;

template <typename T>
__global__ void group_minmax_kernel(const T* x, int64_t group_size, int64_t per_group,
                                    int64_t groups, typename MinMaxKey<typename Acc<T>::type>::type* keys) {
  using A = typename Acc<T>::type;
  const int64_t g = blockIdx.x / per_group, j = blockIdx.x % per_group;
  const T* xg = x + g * group_size;
  A mn = kInf, mx = -kInf;
  for (int64_t i = j * blockDim.x + threadIdx.x; i < group_size; i += per_group * blockDim.x) {
    const A v = to_acc(xg[i]);
    const bool finite = fabs(v) < A(kInf);  // false for NaN and +-inf
    const A a = finite ? v : A(kInf), b = finite ? v : A(-kInf);
    mn = a < mn ? a : mn;
    mx = b > mx ? b : mx;
  }
  block_minmax(mn, mx);
  if (threadIdx.x == 0) {
    atomicMin(keys + g, float_key(mn));
    atomicMax(keys + groups + g, float_key(mx));
  }
}

// Grid-stride over the mask's bytes: f(b, e0, m) for byte b, whose elements are [e0, e0 + m),
// m = 8 except in the last byte.
template <typename F>
__device__ void for_each_mask_byte(int64_t n, F&& f) {
  const int64_t bytes = (n + 7) / 8;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < bytes;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e0 = b * 8;
    f(b, e0, n - e0 < 8 ? static_cast<int>(n - e0) : 8);
  }
}

template <typename T>
__global__ void random_spike_kernel(const T* x, T* out, uint8_t* mask, int64_t n, int64_t size,
                                    int64_t per_segment, int64_t group_size, int64_t groups,
                                    const typename MinMaxKey<typename Acc<T>::type>::type* keys,
                                    float p, const int64_t* seed, const int64_t* offset) {
  using A = typename Acc<T>::type;
  const uint64_t s = static_cast<uint64_t>(*seed), o = static_cast<uint64_t>(*offset);
  for_each_mask_byte(n, [&](int64_t b, int64_t e0, int m) {
    T t[8] = {};
    load_run<8>(x + e0, m, t);
    // Element e0 + l is element j of segment k; a byte may cross into the next segment.
    int64_t k = e0 / size, j = e0 - k * size;
    Philox4 w{};
    unsigned bits = 0;
    for (int l = 0; l < 8; ++l, ++j) {
      if (l == m) break;
      if (j == size) {
        ++k;
        j = 0;
      }
      if (l == 0 || j % 2 == 0) w = philox_counter(s, o + static_cast<uint64_t>(k * per_segment + j / 2));
      const bool odd = j % 2;
      if (uniform_from_word(odd ? w.w2 : w.w0) < p) {
        bits |= 1u << l;
        continue;
      }
      const int64_t g = groups == 1 ? 0 : (e0 + l) / group_size;
      const A lo = key_float(keys[g]), hi = key_float(keys[groups + g]);
      // Explicit round-to-nearest ops: no FMA, the same rounding as the CPU and the reference.
      const A u = static_cast<A>(uniform_from_word(odd ? w.w3 : w.w1)), d = add_rn(hi, -lo);
      // Where hi - lo overflows (a range wider than A's largest value), (lo - u lo) + u hi.
      A v = fabs(d) < A(kInf) ? add_rn(lo, mul_rn(u, d)) : add_rn(add_rn(lo, -mul_rn(u, lo)), mul_rn(u, hi));
      v = v > hi ? hi : v;
      t[l] = from_acc<T>(v);
    }
    store_run<8>(out + e0, m, t);
    mask[b] = static_cast<uint8_t>(bits);
  });
}

template <typename T>
__global__ void random_spike_backward_kernel(const T* grad, const uint8_t* mask, T* out, int64_t n) {
  for_each_mask_byte(n, [&](int64_t b, int64_t e0, int m) {
    T t[8] = {};
    load_run<8>(grad + e0, m, t);
    const unsigned bits = mask[b];
    for (int l = 0; l < 8; ++l) {
      if (!((bits >> l) & 1u)) t[l] = from_float<T>(0.0f);
    }
    store_run<8>(out + e0, m, t);
  });
}

}  // namespace

cudaError_t launch_random_spike(const void* x, void* out, uint8_t* mask, DType dtype, int64_t n,
                                int64_t groups, int64_t segments, float p, const int64_t* seed,
                                const int64_t* offset, void* workspace, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t group_size = n / groups;
  int64_t per_group = (group_size + kThreads * kReduceItemsPerThread - 1) / (kThreads * kReduceItemsPerThread);
  per_group = per_group < 1 ? 1 : (per_group > kMaxBlocks ? kMaxBlocks : per_group);
  const int64_t size = n / segments, per_segment = counters_per_segment(size, 2);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Key = typename MinMaxKey<typename Acc<T>::type>::type;
    Key* keys = static_cast<Key*>(workspace);
    cudaError_t err = cudaMemsetAsync(keys, 0xFF, groups * sizeof(Key), stream);  // min keys
    if (err != cudaSuccess) return err;
    err = cudaMemsetAsync(keys + groups, 0, groups * sizeof(Key), stream);  // max keys
    if (err != cudaSuccess) return err;
    const T* xp = static_cast<const T*>(x);
    NK_LAUNCH(static_cast<unsigned int>(groups * per_group), kThreads, 0, stream, group_minmax_kernel<T>)(
        xp, group_size, per_group, groups, keys);
    NK_LAUNCH(blocks_for((n + 7) / 8), kThreads, 0, stream, random_spike_kernel<T>)(
        xp, static_cast<T*>(out), mask, n, size, per_segment, group_size, groups, keys, p, seed, offset);
    return cudaGetLastError();
  });
}

cudaError_t launch_random_spike_backward(const void* grad, const uint8_t* mask, void* out, DType dtype,
                                         int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    NK_LAUNCH(blocks_for((n + 7) / 8), kThreads, 0, stream, random_spike_backward_kernel<T>)(
        static_cast<const T*>(grad), mask, static_cast<T*>(out), n);
    return cudaGetLastError();
  });
}

}  // namespace noisekernels::cuda
