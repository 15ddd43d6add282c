// CUDA kernel of noise_add_foreach: one launch over a list of tensors described by a device
// metadata table. Each tensor is one flat segment; a thread-step takes one counter of the
// concatenated counter ranges, finds its tensor by binary search over their prefix sums, and
// writes that counter's four elements.
#include <noisekernels/cuda_launchers.h>
#include <noisekernels/philox.h>

#include "common.cuh"

namespace noisekernels::cuda {
namespace {

template <typename T>
__global__ void noise_add_foreach_kernel(const int64_t* meta, int64_t k, int64_t total,
                                         const typename Acc<T>::type* scales, int dist,
                                         const int64_t* seed, const int64_t* offset) {
  using A = typename Acc<T>::type;
  const int64_t* in_ptrs = meta;
  const int64_t* out_ptrs = meta + k;
  const int64_t* first = meta + 2 * k;  // k + 1 counter prefix sums
  const int64_t* starts = meta + 3 * k + 1;
  const int64_t* numels = meta + 4 * k + 1;
  const uint64_t s = static_cast<uint64_t>(*seed), o = static_cast<uint64_t>(*offset);
  NK_FOR_EACH_COUNTER(c, total) {
    int64_t lo = 0, hi = k;  // the last tensor with first[t] <= c (empty tensors are skipped)
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (first[mid] <= c) lo = mid; else hi = mid;
    }
    const int64_t local = c - first[lo];
    float eps[4];
    noise4_from_words(dist, philox_counter(s, o + static_cast<uint64_t>(starts[lo] + local)), eps);
    const int64_t i = 4 * local, left = numels[lo] - i;
    const int m = left < 4 ? static_cast<int>(left) : 4;
    const T* x = reinterpret_cast<const T*>(in_ptrs[lo]) + i;
    T* out = reinterpret_cast<T*>(out_ptrs[lo]) + i;
    T t[4] = {};
    load_run<4>(x, m, t);
#pragma unroll
    for (int l = 0; l < 4; ++l) t[l] = from_acc<T>(add_rn(to_acc(t[l]), mul_rn(scales[lo], static_cast<A>(eps[l]))));
    store_run<4>(out, m, t);
  }
}

}  // namespace

cudaError_t launch_noise_add_foreach(const int64_t* meta, int64_t k, int64_t total,
                                     const void* scales, DType dtype, int dist,
                                     const int64_t* seed, const int64_t* offset,
                                     cudaStream_t stream) {
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    NK_LAUNCH(blocks_for(total), kThreads, 0, stream, noise_add_foreach_kernel<T>)(
        meta, k, total, static_cast<const typename Acc<T>::type*>(scales), dist, seed, offset);
    return cudaGetLastError();
  });
}

}  // namespace noisekernels::cuda
