// NaN and +-Inf inputs, the ONNX way. A dense Conv multiplies every input of a window by its weight, the pruned taps'
// zeros included, so a NaN or +-Inf input makes NaN of every output whose window holds it at a tap the output's filter
// does not keep (0 * Inf = NaN, 0 * NaN = NaN); the kernel reads kept taps only, so those outputs come out finite.
// When the packing met such a value (PackChannelFn's result), the op marks those outputs NaN after the fact: NaN
// stays NaN through the bias, Z and the clamp, so marking the final output equals marking the sum. Outputs whose
// window holds the value at a kept tap were computed with it already (w * Inf = +-Inf, 0 * Inf = NaN) and are left.
// Rare by nature (a model fed a broken image), so serial and simple.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/pattern_conv.h"
#include "cpu/pattern_conv_plan.h"

namespace ctprune {
namespace cpu {

// For each input channel, the filters that keep a kernel on it and that kernel's tap mask, by filter.
struct ChannelKernels {
  std::vector<int32_t> begin;  // (C + 1)
  std::vector<int32_t> filter;  // (K) sorted by filter inside a channel
  std::vector<int32_t> taps;    // (K) tap mask (bit ky*3+kx)
};

ChannelKernels ChannelKernelsOf(const PatternConvPlan& plan);

// Marks NaN every output of one image that a dense Conv makes NaN through a non-finite value of input channel c
// (x_channel: H x W) met at a tap its filter does not keep. out_image: (O, OH, OW).
void MarkNonFiniteChannel(const PatternConvPlan& plan, const ChannelKernels& kernels, const ConvGeometry& g, int c,
                          const float* x_channel, float* out_image);

}  // namespace cpu
}  // namespace ctprune
