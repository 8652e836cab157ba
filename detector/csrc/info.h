#pragma once
#include <cstdint>

namespace detector {
#ifdef WITH_CUDA
// CUDA_VERSION the CUDA sources were compiled against (defined in cuda/info.cu).
int64_t cuda_runtime_version();
#endif
}  // namespace detector
