// PatternConv attributes turned into what the kernels walk (validated once, when onnxruntime creates the kernel),
// and the per-call geometry (the packing itself is per instruction set: pattern_conv_tiles.inc).
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/pattern_conv.h"

namespace ctprune {
namespace cpu {

// A malformed node: the message says which attribute and why (the op adds the node name).
struct InvalidNode : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct PatternConvAttributes {
  std::vector<int64_t> weight_shape, patterns, kernel_filters, kernel_channels, kernel_patterns;
  std::vector<int64_t> strides{1, 1}, pads{0, 0, 0, 0}, dilations{1, 1};
  int64_t group = 1;
  float activation_min = -INFINITY, activation_max = INFINITY;
};

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

// Checks every invariant of ops/PatternConv.md and builds the plan; throws InvalidNode.
PatternConvPlan BuildPlan(const PatternConvAttributes& attrs);

// Geometry of a call with input height H and width W for a tier with `lanes`-float vectors and tiles of at most
// `max_vectors` vectors; throws InvalidNode when the padded input is smaller than 3x3 or too large to index.
ConvGeometry MakeGeometry(const PatternConvPlan& plan, int64_t H, int64_t W, int lanes, int max_vectors);

// (K, 4): channel * g.plane + g.tap_offset[tap] for each kept kernel's taps in ascending order (ImageJob::offsets).
std::vector<int32_t> TapOffsets(const PatternConvPlan& plan, const ConvGeometry& g);

}  // namespace cpu
}  // namespace ctprune
