// C entry points of the emulated CUDA build for ctypes (tests/emulated_cuda.py): each calls the
// launcher of csrc/cuda unchanged, on host pointers, and returns its cudaError_t.
#include <noisekernels/cuda_launchers.h>

#include <string>

#include "cuda_emulation.h"

namespace nk = noisekernels::cuda;

namespace {

nk::DType dtype_of(int code) { return static_cast<nk::DType>(code); }

}  // namespace

extern "C" {

void nk_emu_set_schedule(int mode, uint64_t seed) {
  cuda_emulation::set_schedule(static_cast<cuda_emulation::Schedule>(mode), seed);
}

// The message of the last failed launch, copied into buf (NUL-terminated).
void nk_emu_last_failure(char* buf, int size) {
  const std::string m = cuda_emulation::last_failure();
  snprintf(buf, static_cast<size_t>(size), "%s", m.c_str());
}

int nk_philox4x32(int64_t* out, const int64_t* counter, const int64_t* key, int64_t n) {
  return nk::launch_philox4x32(out, counter, key, n, nullptr);
}

int nk_philox_fill(void* out, int dtype, int64_t n, int64_t segments, const int64_t* seed, const int64_t* offset,
                   int normal) {
  return nk::launch_philox_fill(out, dtype_of(dtype), n, segments, seed, offset, normal != 0, nullptr);
}

int nk_random_spike(const void* x, void* out, uint8_t* mask, int dtype, int64_t n, int64_t groups, int64_t segments,
                    float p, const int64_t* seed, const int64_t* offset, void* workspace) {
  return nk::launch_random_spike(x, out, mask, dtype_of(dtype), n, groups, segments, p, seed, offset, workspace,
                                 nullptr);
}

int nk_random_spike_backward(const void* grad, const uint8_t* mask, void* out, int dtype, int64_t n) {
  return nk::launch_random_spike_backward(grad, mask, out, dtype_of(dtype), n, nullptr);
}

int nk_noise_add(const void* x, const void* scale, void* out, int dtype, int64_t numel_x, int64_t replicas,
                 int64_t segments, int64_t inner, int64_t channels, int dist, int clamp, double lo, double hi,
                 const int64_t* seed, const int64_t* offset) {
  return nk::launch_noise_add(x, scale, out, dtype_of(dtype), numel_x, replicas, segments, inner, channels, dist,
                              clamp != 0, lo, hi, seed, offset, nullptr);
}

int nk_noise_mul(const void* grad, void* out, int dtype, int64_t n, int64_t segments, int dist, const int64_t* seed,
                 const int64_t* offset) {
  return nk::launch_noise_mul(grad, out, dtype_of(dtype), n, segments, dist, seed, offset, nullptr);
}

int nk_noise_mul_sum(const void* grad, void* out, void* workspace, int dtype, int64_t n, int64_t segments,
                     int64_t inner, int64_t channels, int dist, const int64_t* seed, const int64_t* offset) {
  return nk::launch_noise_mul_sum(grad, out, workspace, dtype_of(dtype), n, segments, inner, channels, dist, seed,
                                  offset, nullptr);
}

int nk_noise_add_foreach(const int64_t* meta, int64_t k, int64_t total, const void* scales, int dtype, int dist,
                         const int64_t* seed, const int64_t* offset) {
  return nk::launch_noise_add_foreach(meta, k, total, scales, dtype_of(dtype), dist, seed, offset, nullptr);
}

int nk_replica_reduce(const void* logits, void* out, int dtype, int64_t n, int64_t b, int64_t c, int vote) {
  return nk::launch_replica_reduce(logits, out, dtype_of(dtype), n, b, c, vote != 0, nullptr);
}

int nk_offset_reserve(int64_t* offset, int64_t* start, int64_t n) {
  return nk::launch_offset_reserve(offset, start, n, nullptr);
}

}  // extern "C"
