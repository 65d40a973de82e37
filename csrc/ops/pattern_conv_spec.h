// ai.ctprune.PatternConv's attributes (ops/PatternConv.md), read and checked once for every backend: the CPU op builds
// its plan (cpu/pattern_conv_plan.h) and the CUDA op its packed layout (cuda/pattern_conv_layout.h) from a spec that
// already holds every invariant of the operator. What a backend cannot run (the CPU kernel's strides, the GPU's channel
// limit) is that backend's own check. Free of onnxruntime (see op_spec.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "ops/op_spec.h"

namespace ctprune {
namespace ops {

constexpr const char* kPatternConvName = "PatternConv";
constexpr int64_t kMaxConvChannels = (int64_t{1} << 23) - 1;  // O and C (kernel indices stay 32-bit; the GPU's limit)
constexpr int64_t kMaxPatterns = 128;                          // 126 distinct 4-of-9 shapes exist
constexpr int64_t kMaxStride = 1024, kMaxPad = 1024;

struct PatternConvSpec {
  int64_t out_channels = 0, in_channels = 0;  // weight_shape [O, C, 3, 3]
  std::vector<int64_t> patterns;              // [P * 4]: pattern p keeps taps patterns[4p..4p+3], ascending, 0..8
  std::vector<int64_t> kernel_filters, kernel_channels, kernel_patterns;  // [K] each, in storage order
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
  float activation_min = -INFINITY, activation_max = INFINITY;

  int64_t num_patterns() const { return static_cast<int64_t>(patterns.size() / 4); }
  int64_t num_kernels() const { return static_cast<int64_t>(kernel_filters.size()); }
  // False for (-inf, inf): no clamp to apply.
  bool has_activation() const {
    return !(std::isinf(activation_min) && activation_min < 0 && std::isinf(activation_max) && activation_max > 0);
  }
};

// The attribute names PatternConv reads (for ReadAttributes).
const std::vector<const char*>& PatternConvAttributeNames();

// Reads every attribute with the function's types (ops/reference.py) and checks the whole spec; throws InvalidNode.
PatternConvSpec ParsePatternConv(const NodeAttributes& attributes);

// Every invariant of ops/PatternConv.md: sizes, ranges, the pattern library and the storage order (filters
// contiguous, by non-increasing kernel count; inside a filter by (pattern, channel) strictly increasing, no input
// channel twice). Throws InvalidNode naming the attribute or the kernel.
void CheckPatternConv(const PatternConvSpec& spec);

}  // namespace ops
}  // namespace ctprune
