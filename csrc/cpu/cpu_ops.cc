// The CPU backend's ops in the ai.ctprune domain (ops/backends.h).
#include "cpu/pattern_conv_op.h"
#include "cpu/sparse_conv_op.h"
#include "ops/backends.h"

namespace ctprune {
namespace cpu {

void RegisterOps(Ort::CustomOpDomain& domain) {
  static const PatternConvOp pattern_conv;  // must outlive every session: static
  domain.Add(&pattern_conv);
  static const SparseConvOp sparse_conv;
  domain.Add(&sparse_conv);
}

}  // namespace cpu
}  // namespace ctprune
