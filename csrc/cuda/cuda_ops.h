// The CUDA kernels' registration boundary, called by RegisterCustomOps (csrc/ops/register.cc) in a CUDA build.
// Without CTPRUNE_WITH_CUDA it is an inline no-op, so a call site needs no #ifdef of its own.
#pragma once

#include "ops/ort_api.h"

namespace ctprune {
namespace cuda {

#ifdef CTPRUNE_WITH_CUDA
// Adds ai.ctprune PatternConv for onnxruntime's CUDAExecutionProvider to `domain`.
void RegisterOps(Ort::CustomOpDomain& domain);
#else
inline void RegisterOps(Ort::CustomOpDomain&) {}
#endif

}  // namespace cuda
}  // namespace ctprune
