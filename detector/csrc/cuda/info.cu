#include <cuda.h>

#include "../info.h"

namespace detector {
int64_t cuda_runtime_version() { return CUDA_VERSION; }
}  // namespace detector
