// Helpers shared by the CUDA kernels: dtype conversion and launch geometry.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace noisekernels::cuda {

// Kernel launch, `kernel<<<grid, block, shmem, stream>>>(args)` under nvcc; the CPU emulation the
// tests build these sources against (tests/cuda_emulation) defines its own.
#ifdef __CUDACC__
#define NK_LAUNCH(grid, block, shmem, stream, ...) __VA_ARGS__<<<grid, block, shmem, stream>>>
#endif

constexpr int kThreads = 256;
// Grid-stride loops cover the rest; enough blocks to fill any current GPU several times over.
// (The emulated test build lowers it to run grid-stride loops many times on small tensors.)
#ifndef NK_MAX_BLOCKS
#define NK_MAX_BLOCKS 65536
#endif
constexpr int64_t kMaxBlocks = NK_MAX_BLOCKS;

inline unsigned int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(b < kMaxBlocks ? (b > 0 ? b : 1) : kMaxBlocks);
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls f.template operator()<T>() with T the C++ type of dtype.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace noisekernels::cuda

namespace noisekernels::cuda {

constexpr float kInf = __builtin_huge_valf();

// Order-preserving float <-> uint32 keys, so atomicMin/atomicMax on keys order the floats.
__device__ __forceinline__ uint32_t float_key(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

// Order-preserving double <-> uint64 keys, for float64 min/max.
__device__ __forceinline__ unsigned long long float_key(double f) {
  const unsigned long long b = static_cast<unsigned long long>(__double_as_longlong(f));
  return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
}
__device__ __forceinline__ double key_float(unsigned long long k) {
  return __longlong_as_double(static_cast<long long>((k & 0x8000000000000000ull) ? (k & 0x7FFFFFFFFFFFFFFFull) : ~k));
}

// The min/max key type of a compute type.
template <typename A>
struct MinMaxKey {
  using type = uint32_t;
};
template <>
struct MinMaxKey<double> {
  using type = unsigned long long;
};

// Min and max over the block (blockDim.x a multiple of 32, at most 1024); thread 0 gets the result.
template <typename A>
__device__ __forceinline__ void block_minmax(A& mn, A& mx) {
  __shared__ A smin[32], smax[32];
  for (int d = 16; d > 0; d >>= 1) {
    const A omn = __shfl_xor_sync(0xFFFFFFFFu, mn, d), omx = __shfl_xor_sync(0xFFFFFFFFu, mx, d);
    mn = omn < mn ? omn : mn;  // values are finite or +-inf: plain compares are exact
    mx = omx > mx ? omx : mx;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) {
    smin[warp] = mn;
    smax[warp] = mx;
  }
  __syncthreads();
  if (warp == 0) {
    mn = lane < warps ? smin[lane] : A(kInf);
    mx = lane < warps ? smax[lane] : A(-kInf);
    for (int d = 16; d > 0; d >>= 1) {
      const A omn = __shfl_xor_sync(0xFFFFFFFFu, mn, d), omx = __shfl_xor_sync(0xFFFFFFFFu, mx, d);
      mn = omn < mn ? omn : mn;
      mx = omx > mx ? omx : mx;
    }
  }
}

}  // namespace noisekernels::cuda

namespace noisekernels::cuda {

// The compute type of a stored type: double for double, float otherwise.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ typename Acc<T>::type to_acc(T v) {
  return static_cast<typename Acc<T>::type>(to_float(v));
}
template <>
__device__ __forceinline__ double to_acc<double>(double v) {
  return v;
}

// Round-to-nearest add and multiply that nvcc never fuses into an FMA.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v) {
  return from_float<T>(v);
}
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}

}  // namespace noisekernels::cuda

namespace noisekernels::cuda {

// Four (or two) consecutive elements as one aligned vector, so a thread's elements move in one
// load or store where the address allows it.
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Vec {
  T v[kN];
};

// Loads m <= kN elements from p into v, vectorised when the run is whole and aligned.
template <int kN, typename T>
__device__ __forceinline__ void load_run(const T* p, int m, T* v) {
  if (m == kN && reinterpret_cast<uintptr_t>(p) % sizeof(Vec<T, kN>) == 0) {
    const Vec<T, kN> w = *reinterpret_cast<const Vec<T, kN>*>(p);
#pragma unroll
    for (int l = 0; l < kN; ++l) v[l] = w.v[l];
  } else {
    for (int l = 0; l < m; ++l) v[l] = p[l];
  }
}

// Stores m <= kN elements of v to p, vectorised when the run is whole and aligned.
template <int kN, typename T>
__device__ __forceinline__ void store_run(T* p, int m, const T* v) {
  if (m == kN && reinterpret_cast<uintptr_t>(p) % sizeof(Vec<T, kN>) == 0) {
    Vec<T, kN> w;
#pragma unroll
    for (int l = 0; l < kN; ++l) w.v[l] = v[l];
    *reinterpret_cast<Vec<T, kN>*>(p) = w;
  } else {
    for (int l = 0; l < m; ++l) p[l] = v[l];
  }
}

// Where counter c of a call lands (ARCHITECTURE.md section 2): segments of `size` elements, each
// on `per_segment` fresh counters of `kPer` elements; returns the flat index of the counter's
// first element and sets m to how many of its kPer elements exist (fewer at a segment's end).
template <int kPer>
__device__ __forceinline__ int64_t counter_elements(int64_t c, int64_t size, int64_t per_segment,
                                                    int* m) {
  const int64_t k = c / per_segment, j = (c - k * per_segment) * kPer;
  const int64_t left = size - j;
  *m = left < kPer ? static_cast<int>(left) : kPer;
  return k * size + j;
}

// Counters per segment of `size` elements at kPer elements per counter.
inline int64_t counters_per_segment(int64_t size, int per) { return (size + per - 1) / per; }

// Grid-stride loop over counters [0, total).
#define NK_FOR_EACH_COUNTER(c, total)                                                       \
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < (total); \
       c += static_cast<int64_t>(gridDim.x) * blockDim.x)

}  // namespace noisekernels::cuda
