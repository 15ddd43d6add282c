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

// Min and max over the block (blockDim.x a multiple of 32, at most 1024); thread 0 gets the result.
__device__ __forceinline__ void block_minmax(float& mn, float& mx) {
  __shared__ float smin[32], smax[32];
  for (int d = 16; d > 0; d >>= 1) {
    mn = fminf(mn, __shfl_xor_sync(0xFFFFFFFFu, mn, d));
    mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, d));
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) {
    smin[warp] = mn;
    smax[warp] = mx;
  }
  __syncthreads();
  if (warp == 0) {
    mn = lane < warps ? smin[lane] : kInf;
    mx = lane < warps ? smax[lane] : -kInf;
    for (int d = 16; d > 0; d >>= 1) {
      mn = fminf(mn, __shfl_xor_sync(0xFFFFFFFFu, mn, d));
      mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, d));
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
