// Schema and registration of the detector's native ops: the one place they are declared.
// Backends register their kernels in cpu/, cuda/ and autograd/ with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

#include "info.h"

namespace detector {

int64_t cuda_version() {
#ifdef WITH_CUDA
  return cuda_runtime_version();
#else
  return -1;
#endif
}

TORCH_LIBRARY(detector, m) {
  m.def("_cuda_version() -> int", &cuda_version);
  // RoIAlign (torchvision.ops.roi_align semantics). rois: (K, 5) [batch_index, x1, y1, x2, y2].
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
      "int sampling_ratio, bool aligned) -> Tensor");
  // Gradient w.r.t. the input; `deterministic` picks the atomics-free CUDA kernel (the CPU one always is).
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
      "int sampling_ratio, bool aligned, bool deterministic) -> Tensor");
}

}  // namespace detector
