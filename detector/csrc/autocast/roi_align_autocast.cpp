// Autocast for RoIAlign: the feature map runs in the dtype it arrives in (float16/bfloat16 natively, with
// float32 accumulation inside the kernels) instead of being upcast to float32 and back as torchvision
// does. Pooling is bandwidth-bound, so a cast of the whole map would cost more than the op itself.
// Only the boxes are normalised: they stay float32 (exact coordinates) or take the input's dtype.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "../roi_align.h"

namespace detector {
namespace {

template <c10::DispatchKey kAutocastKey>
at::Tensor roi_align_autocast(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                              c10::SymInt pooled_h, c10::SymInt pooled_w, int64_t sampling_ratio, bool aligned) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  const auto in_type = input.scalar_type();
  const bool low_precision = in_type == at::kHalf || in_type == at::kBFloat16;
  at::Tensor r = rois;
  if (at::isFloatingType(in_type) && rois.scalar_type() != in_type &&
      !(low_precision && rois.scalar_type() == at::kFloat)) {
    r = rois.to(low_precision ? at::kFloat : in_type);
  }
  return roi_align_call(input, r, spatial_scale, std::move(pooled_h), std::move(pooled_w), sampling_ratio,
                        aligned);
}

}  // namespace

TORCH_LIBRARY_IMPL(detector, AutocastCPU, m) {
  m.impl("roi_align", TORCH_FN(roi_align_autocast<c10::DispatchKey::AutocastCPU>));
}

TORCH_LIBRARY_IMPL(detector, AutocastCUDA, m) {
  m.impl("roi_align", TORCH_FN(roi_align_autocast<c10::DispatchKey::AutocastCUDA>));
}

}  // namespace detector
