// CUDA kernel of noise_add_foreach: one launch over a list of tensors described by a device
// metadata table; each element finds its tensor by binary search over the prefix sums.
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
  const int64_t* first = meta + 2 * k;
  const int64_t* starts = meta + 3 * k + 1;
  const uint64_t s = static_cast<uint64_t>(*seed), o = static_cast<uint64_t>(*offset);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = k;  // the last tensor with first[t] <= i (empty tensors are skipped)
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (first[mid] <= i) lo = mid; else hi = mid;
    }
    const int64_t local = i - first[lo];
    const Philox4 w = philox_at(s, o, static_cast<uint64_t>(starts[lo] + local));
    const T* x = reinterpret_cast<const T*>(in_ptrs[lo]);
    T* out = reinterpret_cast<T*>(out_ptrs[lo]);
    out[local] = from_acc<T>(add_rn(to_acc(x[local]), mul_rn(scales[lo], static_cast<A>(noise_from_words(dist, w.w0, w.w1)))));
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
