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
}

}  // namespace detector
