// CUDA kernel of replica_reduce: one warp per sample, lanes over classes.
#include <noisekernels/cuda_launchers.h>

#include "common.cuh"

namespace noisekernels::cuda {
namespace {

// A logit as the vote ranks it: NaN counts as -inf, so it never wins (one rule on every backend).
template <typename A>
__device__ __forceinline__ A vote_key(A v) {
  return isnan(v) ? A(-kInf) : v;
}

// Whether logit key (v, k) comes before (best_v, best) in argmax order: larger first, ties to the
// smaller index. A lane with no class holds (-inf, c), which any class beats.
template <typename A>
__device__ __forceinline__ bool argmax_before(A v, int64_t k, A best_v, int64_t best) {
  return v > best_v || (v == best_v && k < best);
}

template <typename T>
__global__ void replica_reduce_kernel(const T* logits, double* out, int64_t n,
                                      int64_t b, int64_t c, bool vote) {
  using A = typename Acc<T>::type;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (i >= b) return;
  double* acc = out + i * c;  // sums over replicas in double: a float sum drifts at large n
  for (int64_t k = lane; k < c; k += 32) acc[k] = 0;
  __syncwarp();
  for (int64_t r = 0; r < n; ++r) {
    const T* x = logits + (r * b + i) * c;
    A best_v = -kInf;
    int64_t best = c;  // the argmax: the smallest index of the largest non-NaN logit
    int voted = 0;     // any logit not NaN: a replica of all-NaN logits votes for no class
    for (int64_t k = lane; k < c; k += 32) {
      const A v = vote_key(to_acc(x[k]));
      voted |= !isnan(to_acc(x[k]));
      if (argmax_before(v, k, best_v, best)) {
        best_v = v;
        best = k;
      }
    }
    for (int d = 16; d > 0; d >>= 1) {
      const A ov = __shfl_xor_sync(0xFFFFFFFFu, best_v, d);
      const int64_t ok = __shfl_xor_sync(0xFFFFFFFFu, best, d);
      voted |= __shfl_xor_sync(0xFFFFFFFFu, voted, d);
      if (argmax_before(ov, ok, best_v, best)) {
        best_v = ov;
        best = ok;
      }
    }
    if (vote) {
      if (lane == 0 && voted) acc[best] += 1;
      __syncwarp();
      continue;
    }
    A sum = 0;
    for (int64_t k = lane; k < c; k += 32) sum += exp(to_acc(x[k]) - best_v);
    for (int d = 16; d > 0; d >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, d);
    for (int64_t k = lane; k < c; k += 32) acc[k] += static_cast<double>(exp(to_acc(x[k]) - best_v) / sum);
    __syncwarp();
  }
  if (!vote) {
    for (int64_t k = lane; k < c; k += 32) acc[k] /= static_cast<double>(n);
  }
}

}  // namespace

cudaError_t launch_replica_reduce(const void* logits, void* out, DType dtype, int64_t n, int64_t b,
                                  int64_t c, bool vote, cudaStream_t stream) {
  if (b == 0 || c == 0) return cudaSuccess;
  constexpr int kWarps = kThreads / 32;
  const unsigned int blocks = static_cast<unsigned int>((b + kWarps - 1) / kWarps);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    NK_LAUNCH(blocks, kThreads, 0, stream, replica_reduce_kernel<T>)(
        static_cast<const T*>(logits), static_cast<double*>(out), n, b, c, vote);
    return cudaGetLastError();
  });
}

}  // namespace noisekernels::cuda
