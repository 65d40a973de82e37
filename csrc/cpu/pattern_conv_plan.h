// PatternConv attributes turned into what the kernels walk (validated once, when onnxruntime creates the kernel),
// the per-call geometry, and the packing of one input channel into the zero-padded workspace layout.
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
  std::vector<int32_t> channels;    // (K) input channel of each kept kernel
  std::vector<int32_t> shapes;      // (K) tap mask of each kept kernel (bit ky*3+kx)
  std::vector<KernelRun> runs;      // runs of one tap shape inside one filter, in storage order
  std::vector<FilterPlan> filters;  // every output channel: filters with kernels in storage order, then empty ones
};

// The plan's kernels re-ordered for one channel block size (see ImageJob in pattern_conv.h): filter by filter in
// plan order, then by channel block, then by tap shape and channel. The ONNX storage order is untouched: each
// scheduled kernel points at its weights through weight_offset.
struct BlockSchedule {
  int block_channels = 0, blocks = 0;
  std::vector<int32_t> channels, weight_offset;
  std::vector<KernelRun> runs;
  std::vector<int32_t> segments;                // filters.size() * (blocks + 1) run indices
  std::vector<int32_t> first_block, last_block; // per filter position; -1 when it keeps no kernel
};

// Checks every invariant of ops/PatternConv.md and builds the plan; throws InvalidNode.
PatternConvPlan BuildPlan(const PatternConvAttributes& attrs);

// Output width of a call (what the kernel table needs before the geometry is made).
int64_t OutputWidth(const PatternConvPlan& plan, int64_t W);

// Geometry of a call with input height H and width W, register tiles of at most max_rows rows; throws InvalidNode
// when the padded input is smaller than 3x3.
ConvGeometry MakeGeometry(const PatternConvPlan& plan, int64_t H, int64_t W, int max_rows = kMaxRowsPerTile);

// Channels per block so that one row tile of a block (g.stride*(R-1)+3 packed rows per channel) fits in about
// `budget_bytes`; at least 1, at most C, blocks balanced.
int ChooseBlockChannels(const ConvGeometry& g, int budget_bytes);

BlockSchedule MakeSchedule(const PatternConvPlan& plan, int block_channels);

// Writes one packed plane (g.plane floats) for input channel `x` (H x W).
void PackChannel(const ConvGeometry& g, const float* x, float* packed);

}  // namespace cpu
}  // namespace ctprune
