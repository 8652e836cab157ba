// Autograd for RoIAlign. The forward saves only the rois and sizes (not the feature map); the
// backward picks the deterministic kernel when torch.use_deterministic_algorithms(True) is set.
// The backward op is itself differentiable: it is linear in `grad` and its adjoint is the forward,
// so double backward (gradgradcheck, gradient penalties) works.
#include <ATen/Context.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../roi_align.h"

namespace detector {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

class RoIAlignFunction : public torch::autograd::Function<RoIAlignFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& input, const Variable& rois,
                               double spatial_scale, const c10::SymInt& pooled_h, const c10::SymInt& pooled_w,
                               int64_t sampling_ratio, bool aligned) {
    ctx->saved_data["spatial_scale"] = spatial_scale;
    ctx->saved_data["pooled_h"] = pooled_h;
    ctx->saved_data["pooled_w"] = pooled_w;
    ctx->saved_data["sampling_ratio"] = sampling_ratio;
    ctx->saved_data["aligned"] = aligned;
    ctx->saved_data["input_shape"] = input.sym_sizes();
    ctx->save_for_backward({rois});
    at::AutoDispatchBelowADInplaceOrView guard;
    return {roi_align_call(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned)};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const Variable rois = ctx->get_saved_variables()[0];
    const auto shape = ctx->saved_data["input_shape"].toList();
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    Variable grad_input = roi_align_backward_call(
        grads[0], rois, ctx->saved_data["spatial_scale"].toDouble(), ctx->saved_data["pooled_h"].toSymInt(),
        ctx->saved_data["pooled_w"].toSymInt(), shape.get(0).toSymInt(), shape.get(1).toSymInt(),
        shape.get(2).toSymInt(), shape.get(3).toSymInt(), ctx->saved_data["sampling_ratio"].toInt(),
        ctx->saved_data["aligned"].toBool(), deterministic);
    // No gradient for the boxes (as in torchvision) nor for the scalar arguments.
    return {grad_input, Variable(), Variable(), Variable(), Variable(), Variable(), Variable()};
  }
};

class RoIAlignBackwardFunction : public torch::autograd::Function<RoIAlignBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& grad, const Variable& rois,
                               double spatial_scale, const c10::SymInt& pooled_h, const c10::SymInt& pooled_w,
                               const c10::SymInt& batch_size, const c10::SymInt& channels,
                               const c10::SymInt& height, const c10::SymInt& width, int64_t sampling_ratio,
                               bool aligned, bool deterministic) {
    ctx->saved_data["spatial_scale"] = spatial_scale;
    ctx->saved_data["pooled_h"] = pooled_h;
    ctx->saved_data["pooled_w"] = pooled_w;
    ctx->saved_data["sampling_ratio"] = sampling_ratio;
    ctx->saved_data["aligned"] = aligned;
    ctx->save_for_backward({rois});
    at::AutoDispatchBelowADInplaceOrView guard;
    return {roi_align_backward_call(grad, rois, spatial_scale, pooled_h, pooled_w, batch_size, channels, height,
                                    width, sampling_ratio, aligned, deterministic)};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const Variable rois = ctx->get_saved_variables()[0];
    Variable grad_grad = roi_align_call(grads[0], rois, ctx->saved_data["spatial_scale"].toDouble(),
                                        ctx->saved_data["pooled_h"].toSymInt(), ctx->saved_data["pooled_w"].toSymInt(),
                                        ctx->saved_data["sampling_ratio"].toInt(), ctx->saved_data["aligned"].toBool());
    variable_list out(12);
    out[0] = grad_grad;
    return out;
  }
};

at::Tensor roi_align_autograd(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                              c10::SymInt pooled_h, c10::SymInt pooled_w, int64_t sampling_ratio, bool aligned) {
  return RoIAlignFunction::apply(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned)[0];
}

at::Tensor roi_align_backward_autograd(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                       c10::SymInt pooled_h, c10::SymInt pooled_w, c10::SymInt batch_size,
                                       c10::SymInt channels, c10::SymInt height, c10::SymInt width,
                                       int64_t sampling_ratio, bool aligned, bool deterministic) {
  return RoIAlignBackwardFunction::apply(grad, rois, spatial_scale, pooled_h, pooled_w, batch_size, channels,
                                         height, width, sampling_ratio, aligned, deterministic)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(detector, Autograd, m) {
  m.impl("roi_align", TORCH_FN(roi_align_autograd));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_autograd));
}

}  // namespace detector
