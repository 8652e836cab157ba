// Declarations shared by the RoIAlign backends: argument checks and typed calls through the dispatcher.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace detector {

// Dtype and device rules, shared by the real and the meta kernels.
inline void check_roi_align_types(const at::Tensor& input, const at::Tensor& rois) {
  TORCH_CHECK(input.dim() == 4, "roi_align: input must be a 4-D (N, C, H, W) tensor, got ", input.dim(),
              " dimensions");
  TORCH_CHECK(rois.dim() == 2, "roi_align: rois must have shape (K, 5) [batch_index, x1, y1, x2, y2], got ",
              rois.dim(), " dimensions");
  TORCH_CHECK(input.device() == rois.device(), "roi_align: input is on ", input.device(),
              " but rois are on ", rois.device());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "roi_align: input must be floating point, got ",
              input.scalar_type());
  const bool low_precision = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  TORCH_CHECK(rois.scalar_type() == input.scalar_type() || (low_precision && rois.scalar_type() == at::kFloat),
              "roi_align: rois dtype ", rois.scalar_type(), " does not match input dtype ", input.scalar_type(),
              " (rois must have the input's dtype, or float32 when the input is float16/bfloat16)");
}

// Checks that need no data access (shapes, dtypes, devices, output size); both backends run them, so a
// direct `torch.ops.detector.roi_align` call gets the same clear message as the Python wrapper.
inline void check_roi_align_args(const at::Tensor& input, const at::Tensor& rois, int64_t pooled_h,
                                 int64_t pooled_w) {
  check_roi_align_types(input, rois);
  TORCH_CHECK(rois.size(1) == 5, "roi_align: rois must have shape (K, 5) [batch_index, x1, y1, x2, y2], got ",
              rois.sizes());
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, "roi_align: output size must be positive, got (", pooled_h,
              ", ", pooled_w, ")");
  TORCH_CHECK(input.size(2) > 0 && input.size(3) > 0, "roi_align: input feature map is empty, shape ",
              input.sizes());
  TORCH_CHECK(input.size(2) * input.size(3) <= INT32_MAX, "roi_align: feature map plane ", input.size(2), "x",
              input.size(3), " is too large");
}

// Rois as contiguous values of the accumulation type (exact: float16/bfloat16 -> float is lossless).
inline at::Tensor rois_in_acc_type(const at::Tensor& rois, const at::Tensor& input) {
  return rois.to(input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

inline at::Tensor roi_align_call(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                 c10::SymInt pooled_h, c10::SymInt pooled_w, int64_t sampling_ratio,
                                 bool aligned) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("detector::roi_align", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, c10::SymInt,
                                         c10::SymInt, int64_t, bool)>();
  return op.call(input, rois, spatial_scale, std::move(pooled_h), std::move(pooled_w), sampling_ratio, aligned);
}

inline at::Tensor roi_align_backward_call(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                          c10::SymInt pooled_h, c10::SymInt pooled_w, c10::SymInt batch_size,
                                          c10::SymInt channels, c10::SymInt height, c10::SymInt width,
                                          int64_t sampling_ratio, bool aligned, bool deterministic) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("detector::_roi_align_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, c10::SymInt,
                                         c10::SymInt, c10::SymInt, c10::SymInt, c10::SymInt, c10::SymInt,
                                         int64_t, bool, bool)>();
  return op.call(grad, rois, spatial_scale, std::move(pooled_h), std::move(pooled_w), std::move(batch_size),
                 std::move(channels), std::move(height), std::move(width), sampling_ratio, aligned,
                 deterministic);
}

}  // namespace detector
