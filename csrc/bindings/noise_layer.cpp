// The eager call of an additive noise layer (GaussianNoise, UniformNoise, LaplaceNoise) in one C++
// step: check x, reserve the layer's counters atomically (offset_reserve) and call noise_add, whose
// C++ autograd node makes the backward. Python paid about 45 us a call for the same work (argument
// parsing, the reservation, two dispatches), more than the eager composite x + s * randn_like(x)
// costs in all. noisekernels/nn/noise.py takes this path only in plain eager mode; torch.compile,
// vmap, checkpointed regions and the engine's sandbox take the Python one (same counters, same values).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "ops.h"

namespace noisekernels {
namespace {

at::Tensor offset_reserve_op(at::Tensor& offset, int64_t n) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("noisekernels::offset_reserve", "")
                             .typed<at::Tensor(at::Tensor&, int64_t)>();
  return op.call(offset, n);
}

// The checks of noise_add_stream (noisekernels/ops/noise_add.py), with its messages, all before the
// stream moves.
at::Tensor noise_layer_add(const at::Tensor& x, double scale, const at::Tensor& seed, at::Tensor& offset,
                           int64_t dist, int64_t replicas, int64_t segments) {
  const auto type = x.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16,
                   "x.dtype must be one of float32, float64, float16, bfloat16, got ", type);
  TORCH_CHECK_VALUE(x.device() == seed.device(), "the layer's stream is on ", seed.device(), " but x is on ",
                    x.device(), "; move the model to x's device");
  TORCH_CHECK_VALUE(replicas == 1 || x.dim() > 0, "replicas > 1 needs x with a batch dimension, got a 0-dim tensor");
  const int64_t rows = x.dim() > 0 ? x.size(0) * replicas : 0;
  TORCH_CHECK_VALUE(segments == 1 || (x.dim() > 0 && rows % segments == 0), "segments=", segments,
                    " must divide the output's rows, got ", rows, " output rows");
  const int64_t size = x.numel() * replicas / segments;  // philox.counters: a fresh counter per segment
  at::Tensor start = offset_reserve_op(offset, segments * ((size + 3) / 4));
  const at::Tensor flat = at::full({1}, scale, x.options().dtype(type == at::kDouble ? at::kDouble : at::kFloat));
  return noise_add_op(x, flat, seed, start, dist, 1, 1, replicas, std::nullopt, std::nullopt, segments);
}

}  // namespace

PyObject* noise_layer_add(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *x, *seed, *offset;
  double scale;
  long long dist, replicas, segments;
  if (!PyArg_ParseTuple(args, "OdOOLLL", &x, &scale, &seed, &offset, &dist, &replicas, &segments)) return nullptr;
  if (!THPVariable_Check(x)) {
    PyErr_Format(PyExc_TypeError, "x must be a tensor, got %s", Py_TYPE(x)->tp_name);
    return nullptr;
  }
  at::Tensor offset_tensor = THPVariable_Unpack(offset);
  return THPVariable_Wrap(noise_layer_add(THPVariable_Unpack(x), scale, THPVariable_Unpack(seed), offset_tensor,
                                          dist, replicas, segments));
  END_HANDLE_TH_ERRORS
}

}  // namespace noisekernels
