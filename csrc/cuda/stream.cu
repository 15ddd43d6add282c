// CUDA kernel of offset_reserve (a Stream reservation): one thread returns the offset and adds n to
// it with one atomicAdd, so reservations made on different CUDA streams never overlap.
#include <noisekernels/cuda_launchers.h>

#include "common.cuh"

namespace noisekernels::cuda {
namespace {

__global__ void offset_reserve_kernel(int64_t* offset, int64_t* start, int64_t n) {
  // Offsets wrap modulo 2**64 (the counter space), as the int64 add of the traced path does.
  *start = static_cast<int64_t>(atomicAdd(reinterpret_cast<unsigned long long*>(offset),
                                          static_cast<unsigned long long>(n)));
}

}  // namespace

cudaError_t launch_offset_reserve(int64_t* offset, int64_t* start, int64_t n, cudaStream_t stream) {
  NK_LAUNCH(1, 1, 0, stream, offset_reserve_kernel)(offset, start, n);
  return cudaGetLastError();
}

}  // namespace noisekernels::cuda
