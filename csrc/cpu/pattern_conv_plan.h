// A checked PatternConv spec (ops/pattern_conv_spec.h) turned into what the CPU kernels walk, once, when onnxruntime
// creates the kernel; and the per-call geometry (the packing itself is per instruction set: pattern_conv_tiles.inc).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/pattern_conv.h"
#include "ops/pattern_conv_spec.h"

namespace ctprune {
namespace cpu {

using ops::InvalidNode;

struct PatternConvPlan {
  int O = 0, C = 0, K = 0;
  int stride = 1;
  int pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
  float act_min = 0, act_max = 0;
  bool clamp = false;
  std::vector<int32_t> channels;      // (K) input channel of each kept kernel, storage order
  std::vector<int32_t> shapes;        // (K) tap mask of each kept kernel (bit ky*3+kx)
  std::vector<int32_t> filters;       // (O) output channel of each filter position: filters with kernels in
                                      // storage order (heaviest first), then empty ones
  std::vector<int32_t> kernel_begin;  // (O + 1) first kept kernel of each filter position
};

// The plan of a spec that CheckPatternConv accepted; throws InvalidNode for what the CPU kernel cannot run (strides
// other than [1, 1] and [2, 2]).
PatternConvPlan BuildPlan(const ops::PatternConvSpec& spec);

// Geometry of a call with input height H and width W for a tier with `lanes`-float vectors and tiles of at most
// `max_vectors` vectors; throws InvalidNode when the padded input is smaller than 3x3 or too large to index.
ConvGeometry MakeGeometry(const PatternConvPlan& plan, int64_t H, int64_t W, int lanes, int max_vectors);

// (K, 4): channel * g.plane + g.tap_offset[tap] for each kept kernel's taps in ascending order (ImageJob::offsets).
std::vector<int32_t> TapOffsets(const PatternConvPlan& plan, const ConvGeometry& g);

}  // namespace cpu
}  // namespace ctprune
