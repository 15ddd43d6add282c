// offset_snapshot, the op behind every Stream reservation (noisekernels/stream.py has the reasons it
// is an op): a copy of the offset, refused during a backward pass unless this thread is inside
// noisekernels.fresh_noise_in_backward(). In C++ because a Python kernel cost about 30 us of each
// noise layer's call, more than the kernel of a small layer. stream.py's _offset_snapshot is the
// reference mode's kernel, with the same check and message.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "ops.h"

namespace noisekernels {
namespace {

thread_local bool fresh_in_backward = false;

at::Tensor offset_snapshot(const at::Tensor& offset) {
  // A draw in a backward pass is a recomputed forward's (torch.utils.checkpoint), whose noise would
  // differ from the forward's.
  TORCH_CHECK(torch::autograd::get_current_graph_task_id() == -1 || fresh_in_backward,
              "a noise layer drew new noise during a backward pass: torch.utils.checkpoint recomputes a forward "
              "there, and its recomputation would use other noise than the forward did (a wrong gradient). "
              "Checkpoint noisy code with noisekernels.checkpoint, which replays the forward's noise (eager mode; "
              "under torch.compile, leave noise layers outside checkpointed regions). Noise meant to be new in "
              "the backward (added to gradients in a hook, a BPDA surrogate's backward) is drawn inside "
              "noisekernels.fresh_noise_in_backward()");
  return offset.clone();
}

}  // namespace

bool set_fresh_noise_in_backward(bool on) {
  const bool before = fresh_in_backward;
  fresh_in_backward = on;
  return before;
}

TORCH_LIBRARY_IMPL(noisekernels, CompositeExplicitAutograd, m) {
  m.impl("offset_snapshot", &offset_snapshot);
}

}  // namespace noisekernels
