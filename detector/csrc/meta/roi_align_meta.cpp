// Meta (shape-only) kernels: what FakeTensor and torch.compile use to trace through the op. The
// output strides follow the real kernels exactly (channels-last in, channels-last out).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../roi_align.h"

namespace detector {
namespace {

at::Tensor roi_align_meta(const at::Tensor& input, const at::Tensor& rois, double /*spatial_scale*/,
                          c10::SymInt pooled_h, c10::SymInt pooled_w, int64_t /*sampling_ratio*/,
                          bool /*aligned*/) {
  check_roi_align_types(input, rois);
  TORCH_CHECK(rois.sym_size(1) == 5, "roi_align: rois must have shape (K, 5), got ", rois.sym_sizes());
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, "roi_align: output size must be positive, got (", pooled_h, ", ",
              pooled_w, ")");
  return at::empty_symint({rois.sym_size(0), input.sym_size(1), std::move(pooled_h), std::move(pooled_w)},
                          input.options(), input.suggest_memory_format());
}

at::Tensor roi_align_backward_meta(const at::Tensor& grad, const at::Tensor& rois, double /*spatial_scale*/,
                                   c10::SymInt /*pooled_h*/, c10::SymInt /*pooled_w*/, c10::SymInt batch_size,
                                   c10::SymInt channels, c10::SymInt height, c10::SymInt width,
                                   int64_t /*sampling_ratio*/, bool /*aligned*/, bool /*deterministic*/) {
  check_roi_align_types(grad, rois);
  return at::empty_symint({std::move(batch_size), std::move(channels), std::move(height), std::move(width)},
                          grad.options(), grad.suggest_memory_format());
}

}  // namespace

TORCH_LIBRARY_IMPL(detector, Meta, m) {
  m.impl("roi_align", TORCH_FN(roi_align_meta));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_meta));
}

}  // namespace detector
