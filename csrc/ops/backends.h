// The backends' registration functions, called by RegisterCustomOps (register.cc): each backend (csrc/cpu, csrc/cuda)
// defines its own and adds its ops to the ai.ctprune domain. Declared here so that csrc/ops, the layer every op builds
// on (attribute specs, the status boundary), includes neither backend; the backends include it.
#pragma once

#include "ops/ort_api.h"

namespace ctprune {

constexpr const char* kDomain = "ai.ctprune";

namespace cpu {
void RegisterOps(Ort::CustomOpDomain& domain);  // csrc/cpu/cpu_ops.cc
}  // namespace cpu

namespace cuda {
#ifdef CTPRUNE_WITH_CUDA
void RegisterOps(Ort::CustomOpDomain& domain);  // csrc/cuda/cuda_ops.cc
#else
inline void RegisterOps(Ort::CustomOpDomain&) {}  // a CPU-only build: the call site needs no #ifdef
#endif
}  // namespace cuda

}  // namespace ctprune
