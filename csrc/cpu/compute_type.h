// The arithmetic type of the CPU noise kernels: float64 tensors compute in float64 (gradcheck),
// everything else in float32.
#pragma once
#include <type_traits>

namespace noisekernels::cpu {

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

}  // namespace noisekernels::cpu
