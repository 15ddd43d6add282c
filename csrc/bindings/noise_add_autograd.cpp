// noise_add's Autograd kernel for the dispatcher's backends (CPU, CUDA, Triton under the CUDA key).
// It is the backward of noisekernels/ops/noise_add.py (_noise_add_backward) in C++: a Python
// autograd node costs about 30 us a call, forward and backward, as much as the kernel of a small
// layer (RSE runs 13 of them a step). The Python backward stays for the kernels called outside the
// dispatcher (backend="reference" and "triton" on CPU tensors) and for reference mode, which loads
// no C++; tests compare the two on every case (tests/test_noise_add.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace noisekernels {

at::Tensor noise_add_op(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& seed,
                        const at::Tensor& offset, int64_t dist, int64_t inner, int64_t channels,
                        int64_t replicas, std::optional<double> lo, std::optional<double> hi,
                        int64_t segments) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("noisekernels::noise_add", "")
                             .typed<decltype(noise_add_op)>();
  return op.call(x, scale, seed, offset, dist, inner, channels, replicas, lo, hi, segments);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor noise_mul_op(const at::Tensor& grad, const at::Tensor& seed, const at::Tensor& offset,
                        int64_t dist, int64_t segments) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("noisekernels::noise_mul", "")
                             .typed<decltype(noise_mul_op)>();
  return op.call(grad, seed, offset, dist, segments);
}

at::Tensor noise_mul_sum_op(const at::Tensor& grad, const at::Tensor& seed, const at::Tensor& offset,
                            int64_t dist, int64_t inner, int64_t channels, int64_t segments) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("noisekernels::noise_mul_sum", "")
                             .typed<decltype(noise_mul_sum_op)>();
  return op.call(grad, seed, offset, dist, inner, channels, segments);
}

// A scale entry whose runs of consecutive elements are shorter is reduced by noise_mul and a sum
// (noise_add.py's _FUSED_MIN_INNER, where the reasons are).
constexpr int64_t kFusedMinInner = 64;

class NoiseAdd : public torch::autograd::Function<NoiseAdd> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& seed, const at::Tensor& offset, int64_t dist, int64_t inner,
                            int64_t channels, int64_t replicas, std::optional<double> lo,
                            std::optional<double> hi, int64_t segments) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = noise_add_op(x, scale, seed, offset, dist, inner, channels, replicas, lo, hi, segments);
    }
    ctx->saved_data["args"] = std::vector<int64_t>{dist, inner, channels, replicas, segments};
    if (replicas != 1) {  // the backward sums the replicas' gradients back to x's shape
      ctx->saved_data["x_shape"] = x.sym_sizes();  // sizes() would specialize torch.compile's dynamic sizes
    }
    // A clipped call keeps x and the scale to recompute the unclipped values: an output at a bound
    // does not tell whether the clip was active. Unclipped calls save the 16 bytes of the stream.
    if (lo.has_value()) {
      ctx->saved_data["lo"] = *lo;
      ctx->saved_data["hi"] = hi.value();  // the op refused lo without hi
      ctx->save_for_backward({seed, offset, x, scale});
    } else {
      ctx->save_for_backward({seed, offset});
    }
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto args = ctx->saved_data["args"].toIntVector();
    const int64_t dist = args[0], inner = args[1], channels = args[2], replicas = args[3], segments = args[4];
    const at::Tensor &seed = saved[0], &offset = saved[1];
    at::Tensor grad = grads[0];
    const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    if (saved.size() == 4) {  // torch.clamp's rule: the gradient passes where lo <= unclipped value <= hi
      const double lo = ctx->saved_data["lo"].toDouble(), hi = ctx->saved_data["hi"].toDouble();
      const at::Tensor v = noise_add_op(saved[2].detach().to(acc), saved[3].detach(), seed, offset, dist, inner,
                                        channels, replicas, std::nullopt, std::nullopt, segments);
      grad = at::where(v.ge(lo).logical_and_(v.le(hi)), grad, at::zeros({}, grad.options()));
    }
    at::Tensor grad_x, grad_scale;
    if (ctx->needs_input_grad(0)) {
      if (replicas == 1) {
        grad_x = grad;
      } else {
        auto shape = ctx->saved_data["x_shape"].toSymIntVector();
        shape.insert(shape.begin(), c10::SymInt(replicas));
        grad_x = grad.reshape_symint(shape).sum(0);
      }
    }
    if (ctx->needs_input_grad(1)) {
      // grad * eps and its sum in the compute dtype: rounding each product to float16 overflows (NaN
      // sums), to bfloat16 loses digits. One scale for everything is one run of all elements.
      if (channels == 1 || inner >= kFusedMinInner) {
        grad_scale = noise_mul_sum_op(grad, seed, offset, dist, inner, channels, segments);
      } else {
        grad_scale = noise_mul_op(grad.to(acc).contiguous(), seed, offset, dist, segments)
                         .reshape({-1, channels, inner})
                         .sum(at::IntArrayRef{0, 2});  // a bare {0, 2} is ambiguous (DimnameList) in torch 2.11
      }
    }
    return {grad_x, grad_scale, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  }
};

// The backward of a call whose scale takes no gradient and that clips nothing (every fixed-scale
// noise layer): grad_x is grad, summed over the replicas. A plain autograd Node rather than a
// torch::autograd::Function: the Function's node (saved state, output wrapping) cost about 10 us of a
// small layer's forward and backward, a quarter of the eager composite x + s * randn_like(x).
struct NoiseAddBackward : public torch::autograd::Node {
  NoiseAddBackward(int64_t replicas, std::vector<c10::SymInt> x_shape)
      : replicas(replicas), x_shape(std::move(x_shape)) {}

  variable_list apply(variable_list&& grads) override {
    const at::Tensor& grad = grads[0];
    if (!grad.defined() || replicas == 1) return {grad};
    auto shape = x_shape;
    shape.insert(shape.begin(), c10::SymInt(replicas));
    return {grad.reshape_symint(shape).sum(0)};
  }

  std::string name() const override { return "NoiseAddBackward"; }

  const int64_t replicas;
  const std::vector<c10::SymInt> x_shape;  // sym_sizes: sizes() would specialize torch.compile's dynamic sizes
};

// Autograd nodes are held by c10::intrusive_ptr from torch 2.13 on, by std::shared_ptr before (the
// supported range starts at 2.11).
template <typename T, typename... Args>
auto make_node(Args&&... args) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, T>) {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  } else {
    return std::make_shared<T>(std::forward<Args>(args)...);
  }
}

at::Tensor noise_add_autograd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& seed,
                              const at::Tensor& offset, int64_t dist, int64_t inner, int64_t channels,
                              int64_t replicas, std::optional<double> lo, std::optional<double> hi,
                              int64_t segments) {
  for (const auto* t : {&x, &scale}) {  // torch's C++ Functions would say only "jvp is not implemented"
    TORCH_CHECK(!t->_fw_grad(/*level=*/0).defined(), "noisekernels::noise_add has no forward-mode derivative ",
                "(torch.func.jvp, torch.autograd.forward_ad); differentiate it in reverse mode (backward, ",
                "torch.autograd.grad)");
  }
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || scale.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView below;
    return noise_add_op(x, scale, seed, offset, dist, inner, channels, replicas, lo, hi, segments);
  }
  if (scale.requires_grad() || lo.has_value()) {
    return NoiseAdd::apply(x, scale, seed, offset, dist, inner, channels, replicas, lo, hi, segments);
  }
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = noise_add_op(x, scale, seed, offset, dist, inner, channels, replicas, lo, hi, segments);
  }
  auto node = make_node<NoiseAddBackward>(replicas,
                                          replicas == 1 ? std::vector<c10::SymInt>{} : x.sym_sizes().vec());
  node->set_next_edges(torch::autograd::collect_next_edges(x));
  torch::autograd::set_history(out, node);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(noisekernels, Autograd, m) {
  m.impl("noise_add", &noise_add_autograd);
}

}  // namespace noisekernels
