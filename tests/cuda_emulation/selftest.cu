// Kernels that check the emulation itself (tests/test_cuda_emulation.py): shared memory and
// barriers, warp shuffles, atomics, half/bfloat16 conversions, and the failures it must report.
// Compiled only into the emulated build; called through ctypes like the launchers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

// Each thread writes its slot of dynamic shared memory, then reads its right neighbour's; without
// the barrier the result depends on the schedule.
__global__ void neighbour_kernel(int* out, bool sync) {
  extern __shared__ int slots[];
  const int t = threadIdx.x;
  slots[t] = static_cast<int>(blockIdx.x * blockDim.x) + t;
  if (sync) __syncthreads();
  out[blockIdx.x * blockDim.x + t] = slots[(t + 1) % blockDim.x];
}

// Per block, the sum of its threads' values by a shared-memory tree (static shared memory).
__global__ void block_sum_kernel(const int* in, int* out) {
  __shared__ int partial[1024];
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int n = blockDim.x * blockDim.y * blockDim.z;
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  partial[t] = in[block * n + t];
  __syncthreads();
  for (int width = 1; width < n; width *= 2) {
    const int v = (t % (2 * width) == 0 && t + width < n) ? partial[t + width] : 0;
    __syncthreads();
    partial[t] += v;
    __syncthreads();
  }
  if (t == 0) out[block] = partial[0];
}

// out[4 * i + m] = the value thread i receives from shuffle mode m (idx, up, down, xor).
__global__ void shuffle_kernel(int* out, int arg, int width) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int v = 1000 * static_cast<int>(blockIdx.x) + static_cast<int>(threadIdx.x);
  out[4 * i] = __shfl_sync(0xFFFFFFFFu, v, arg, width);
  out[4 * i + 1] = __shfl_up_sync(0xFFFFFFFFu, v, static_cast<unsigned>(arg), width);
  out[4 * i + 2] = __shfl_down_sync(0xFFFFFFFFu, v, static_cast<unsigned>(arg), width);
  __syncwarp();
  out[4 * i + 3] = __shfl_xor_sync(0xFFFFFFFFu, v, arg, width);
}

// Every thread adds into one counter of each kind, and takes min/max of its index.
__global__ void atomics_kernel(int* ints, unsigned int* uints, float* f, double* d) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(ints, 1);
  atomicMin(ints + 1, -i);
  atomicMax(ints + 2, i);
  int seen = ints[3];  // an increment by compare-and-swap loop
  for (;;) {
    const int old = atomicCAS(ints + 3, seen, seen + 2);
    if (old == seen) break;
    seen = old;
  }
  atomicAdd(uints, 3u);
  atomicMin(uints + 1, static_cast<unsigned int>(i) + 5u);
  atomicMax(uints + 2, static_cast<unsigned int>(i));
  atomicAdd(f, 0.5f);
  atomicAdd(d, 0.25);
}

__global__ void convert_kernel(const float* in, uint16_t* half_bits, uint16_t* bf16_bits, float* back, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const __half h = __float2half_rn(in[i]);
    const __nv_bfloat16 b = __float2bfloat16_rn(in[i]);
    memcpy(half_bits + i, &h, 2);
    memcpy(bf16_bits + i, &b, 2);
    back[2 * i] = __half2float(h);
    back[2 * i + 1] = __bfloat162float(b);
  }
}

// Broken kernels the emulation must reject: 0 a barrier some threads skip by returning, 1 a
// shuffle after a lane returned, 2 lanes of one warp waiting at different barriers (a deadlock
// when the block is that one warp).
__global__ void broken_kernel(int kind, int* out) {
  const int t = threadIdx.x;
  if (kind == 0) {
    if (t < 5) return;
    __syncthreads();
  } else if (kind == 1) {
    if (t == 3) return;
    out[t] = __shfl_xor_sync(0xFFFFFFFFu, t, 1);
  } else {
    if (t < 16) {
      __syncthreads();
    } else {
      __syncwarp();
    }
  }
}

}  // namespace

extern "C" {

int nk_test_neighbour(int* out, unsigned blocks, unsigned threads, int sync) {
  NK_LAUNCH(blocks, threads, threads * sizeof(int), nullptr, neighbour_kernel)(out, sync != 0);
  return cudaGetLastError();
}

int nk_test_block_sum(const int* in, int* out, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                      unsigned bz) {
  NK_LAUNCH(dim3(gx, gy, gz), dim3(bx, by, bz), 0, nullptr, block_sum_kernel)(in, out);
  return cudaGetLastError();
}

int nk_test_shuffle(int* out, unsigned blocks, unsigned threads, int arg, int width) {
  NK_LAUNCH(blocks, threads, 0, nullptr, shuffle_kernel)(out, arg, width);
  return cudaGetLastError();
}

int nk_test_atomics(int* ints, unsigned int* uints, float* f, double* d, unsigned blocks, unsigned threads) {
  NK_LAUNCH(blocks, threads, 0, nullptr, atomics_kernel)(ints, uints, f, d);
  return cudaGetLastError();
}

int nk_test_convert(const float* in, uint16_t* half_bits, uint16_t* bf16_bits, float* back, int n) {
  NK_LAUNCH(3, 64, 0, nullptr, convert_kernel)(in, half_bits, bf16_bits, back, n);
  return cudaGetLastError();
}

int nk_test_broken(int kind, int* out, unsigned threads) {
  NK_LAUNCH(1, threads, 0, nullptr, broken_kernel)(kind, out);
  return cudaGetLastError();
}

}  // extern "C"
