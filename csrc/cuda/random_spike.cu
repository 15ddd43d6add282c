// CUDA kernels of random_spike and random_spike_backward (Random Spiking): one counter per
// thread-step, two elements per counter ((w0, w1) and (w2, w3): keep test, value), loaded and
// stored as one vector. min/max and the spiked value are float64 for float64 x, else float32.
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

template <typename T>
__global__ void random_spike_kernel(const T* x, T* out, int64_t total, int64_t size,
                                    int64_t per_segment, int64_t group_size, int64_t groups,
                                    const typename MinMaxKey<typename Acc<T>::type>::type* keys,
                                    float p, const int64_t* seed, const int64_t* offset) {
  using A = typename Acc<T>::type;
  const uint64_t s = static_cast<uint64_t>(*seed), o = static_cast<uint64_t>(*offset);
  NK_FOR_EACH_COUNTER(c, total) {
    const Philox4 w = philox_counter(s, o + static_cast<uint64_t>(c));
    int m;
    const int64_t i = counter_elements<2>(c, size, per_segment, &m);
    T t[2] = {};
    load_run<2>(x + i, m, t);
    const float keep[2] = {uniform_from_word(w.w0), uniform_from_word(w.w2)};
    const float value[2] = {uniform_from_word(w.w1), uniform_from_word(w.w3)};
#pragma unroll
    for (int l = 0; l < 2; ++l) {
      if (l < m && keep[l] >= p) {
        const int64_t g = groups == 1 ? 0 : (i + l) / group_size;
        const A lo = key_float(keys[g]), hi = key_float(keys[groups + g]);
        // Explicit round-to-nearest ops: no FMA, the same rounding as the CPU and the reference.
        A v = add_rn(lo, mul_rn(static_cast<A>(value[l]), add_rn(hi, -lo)));
        v = v > hi ? hi : v;
        t[l] = from_acc<T>(v);
      }
    }
    store_run<2>(out + i, m, t);
  }
}

template <typename T>
__global__ void random_spike_backward_kernel(const T* grad, T* out, int64_t total, int64_t size,
                                             int64_t per_segment, float p, const int64_t* seed,
                                             const int64_t* offset) {
  const uint64_t s = static_cast<uint64_t>(*seed), o = static_cast<uint64_t>(*offset);
  NK_FOR_EACH_COUNTER(c, total) {
    const Philox4 w = philox_counter(s, o + static_cast<uint64_t>(c));
    int m;
    const int64_t i = counter_elements<2>(c, size, per_segment, &m);
    const bool keep[2] = {uniform_from_word(w.w0) < p, uniform_from_word(w.w2) < p};
    T t[2] = {};
    load_run<2>(grad + i, m, t);
#pragma unroll
    for (int l = 0; l < 2; ++l) {
      if (!keep[l]) t[l] = from_float<T>(0.0f);
    }
    store_run<2>(out + i, m, t);
  }
}

}  // namespace

cudaError_t launch_random_spike(const void* x, void* out, DType dtype, int64_t n, int64_t groups,
                                int64_t segments, float p, const int64_t* seed,
                                const int64_t* offset, void* workspace, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t group_size = n / groups;
  int64_t per_group = (group_size + kThreads * kReduceItemsPerThread - 1) / (kThreads * kReduceItemsPerThread);
  per_group = per_group < 1 ? 1 : (per_group > kMaxBlocks ? kMaxBlocks : per_group);
  const int64_t size = n / segments, per_segment = counters_per_segment(size, 2);
  const int64_t total = segments * per_segment;
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
    NK_LAUNCH(blocks_for(total), kThreads, 0, stream, random_spike_kernel<T>)(
        xp, static_cast<T*>(out), total, size, per_segment, group_size, groups, keys, p, seed, offset);
    return cudaGetLastError();
  });
}

cudaError_t launch_random_spike_backward(const void* grad, void* out, DType dtype, int64_t n,
                                         int64_t segments, float p, const int64_t* seed,
                                         const int64_t* offset, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t size = n / segments, per_segment = counters_per_segment(size, 2);
  const int64_t total = segments * per_segment;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    NK_LAUNCH(blocks_for(total), kThreads, 0, stream, random_spike_backward_kernel<T>)(
        static_cast<const T*>(grad), static_cast<T*>(out), total, size, per_segment, p, seed, offset);
    return cudaGetLastError();
  });
}

}  // namespace noisekernels::cuda
