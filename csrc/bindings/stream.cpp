// The ops behind every Stream reservation (noisekernels/stream.py has the reasons they are ops):
// offset_reserve, eager mode's, returns the start offset and advances the offset in one atomic step;
// offset_snapshot, torch.compile's, copies the offset (the traced graph advances it). Both are
// refused during a backward pass unless this thread is inside noisekernels.fresh_noise_in_backward().
// In C++ because a Python kernel cost about 30 us of each noise layer's call, more than the kernel
// of a small layer. stream.py's _offset_snapshot and _offset_reserve are the reference mode's
// kernels, with the same check and message. offset_reserve's CUDA kernel is in csrc/cuda/stream.cu.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <atomic>

#include "ops.h"

namespace noisekernels {
namespace {

thread_local bool fresh_in_backward = false;

}  // namespace

void check_not_in_backward() {
  // A draw in a backward pass is a recomputed forward's (torch.utils.checkpoint), whose noise would
  // differ from the forward's.
  TORCH_CHECK(torch::autograd::get_current_graph_task_id() == -1 || fresh_in_backward,
              "a noise layer drew new noise during a backward pass: torch.utils.checkpoint recomputes a forward "
              "there, and its recomputation would use other noise than the forward did (a wrong gradient). "
              "Checkpoint noisy code with noisekernels.checkpoint, which replays the forward's noise (eager mode; "
              "under torch.compile, leave noise layers outside checkpointed regions). Noise meant to be new in "
              "the backward (added to gradients in a hook, a BPDA surrogate's backward) is drawn inside "
              "noisekernels.fresh_noise_in_backward()");
}

namespace {

// A one-element int64 offset as the 64-bit counter it holds; offsets wrap modulo 2**64 (the counter
// space), as the int64 add of the traced path does.
std::atomic_ref<uint64_t> counter_of(at::Tensor& offset) {
  return std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(offset.data_ptr<int64_t>()));
}

at::Tensor offset_snapshot(const at::Tensor& offset) {
  check_not_in_backward();
  return offset.clone();
}

at::Tensor offset_reserve_cpu(at::Tensor& offset, int64_t n) {
  check_not_in_backward();
  check_offset_reserve_args(offset, n);
  offset.unsafeGetTensorImpl()->bump_version();  // changed in place, as an add_ would
  at::Tensor start = at::empty_like(offset);
  *start.data_ptr<int64_t>() = static_cast<int64_t>(counter_of(offset).fetch_add(static_cast<uint64_t>(n)));
  return start;
}

}  // namespace

bool offset_release_cpu(at::Tensor& offset, int64_t start, int64_t n) {
  TORCH_CHECK_VALUE(offset.device().is_cpu() && offset.scalar_type() == at::kLong && offset.numel() == 1,
                    "offset_release needs a one-element int64 CPU offset");
  uint64_t expected = static_cast<uint64_t>(start) + static_cast<uint64_t>(n);  // wraps as reservations do
  const bool released = counter_of(offset).compare_exchange_strong(expected, static_cast<uint64_t>(start));
  if (released) offset.unsafeGetTensorImpl()->bump_version();
  return released;
}

bool set_fresh_noise_in_backward(bool on) {
  const bool before = fresh_in_backward;
  fresh_in_backward = on;
  return before;
}

TORCH_LIBRARY_IMPL(noisekernels, CompositeExplicitAutograd, m) {
  m.impl("offset_snapshot", &offset_snapshot);
}

TORCH_LIBRARY_IMPL(noisekernels, CPU, m) {
  m.impl("offset_reserve", &offset_reserve_cpu);
}

}  // namespace noisekernels
