// The CUDA backend's ops in the ai.ctprune domain (ops/backends.h); built only with CTPRUNE_CUDA=1.
#include "cuda/pattern_conv_op.h"
#include "cuda/sparse_conv_op.h"
#include "ops/backends.h"

namespace ctprune {
namespace cuda {

void RegisterOps(Ort::CustomOpDomain& domain) {
  static const PatternConvCudaOp pattern_conv;  // must outlive every session: static
  static const SparseConvCudaOp sparse_conv;
  domain.Add(&pattern_conv);
  domain.Add(&sparse_conv);
}

}  // namespace cuda
}  // namespace ctprune
