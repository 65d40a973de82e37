// PatternConv for the GPU: packing a checked spec (ops/pattern_conv_spec.h) for the kernel (host code only).
//
// The operator stores kernels filter by filter, each filter's kernels by (pattern, channel) -- the order the CPU kernel
// wants (ops/PatternConv.md). The GPU kernel stages input channels in chunks through shared memory, so it wants each
// filter's kernels by channel instead. The packed layout therefore keeps, per kept kernel, one entry
//     meta = channel << 8 | pattern,   row = the kernel's row in W (K, 4)
// with each filter's entries sorted by channel, and a slot table: slot s (0..O-1) computes filter slot_filter[s] from
// entries [filter_begin[s], filter_begin[s + 1]). Slots follow the stored filter order (decreasing work, so a block of
// consecutive slots gets similar work); filters with no kernel left come last with empty ranges (bias, activation).
//
// Header-only and free of CUDA so that the launcher (nvcc), the onnxruntime op (g++) and the CPU emulator share it;
// whoever includes it links ops/pattern_conv_spec.cc and ops/op_spec.cc (the spec checks).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "cuda/pattern_conv_cuda.h"
#include "ops/pattern_conv_spec.h"

namespace ctprune {
namespace cuda {

constexpr int kMaxPatterns = static_cast<int>(ops::kMaxPatterns);  // the tap table lives in the kernel parameters
static_assert(ops::kMaxConvChannels < (1 << 23), "a channel shares an int with the pattern id (8 bits)");

// What the kernel needs from the attributes, validated and in the kernel's order.
struct PackedPatternConv {
  int out_channels = 0;
  int in_channels = 0;
  int num_patterns = 0;
  int num_kernels = 0;
  std::vector<int> taps;          // [P * 4] tap index ky * 3 + kx of each pattern's 4 taps
  std::vector<int> entries;       // [K * 2] (meta, row) per kernel, each filter's entries by channel
  std::vector<int> filter_begin;  // [O + 1] entry range of each slot
  std::vector<int> slot_filter;   // [O] output channel computed by each slot
  int stride_h = 1, stride_w = 1;
  int pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
  float activation_min = -INFINITY, activation_max = INFINITY;
  bool has_activation = false;
};

// Packs a spec that ops::CheckPatternConv accepted (the GPU runs every stride and pad the spec allows).
inline PackedPatternConv PackPatternConv(const ops::PatternConvSpec& s) {
  PackedPatternConv out;
  out.out_channels = static_cast<int>(s.out_channels);
  out.in_channels = static_cast<int>(s.in_channels);
  out.num_patterns = static_cast<int>(s.num_patterns());
  out.num_kernels = static_cast<int>(s.num_kernels());
  out.stride_h = static_cast<int>(s.stride_h);
  out.stride_w = static_cast<int>(s.stride_w);
  out.pad_top = static_cast<int>(s.pad_top);
  out.pad_left = static_cast<int>(s.pad_left);
  out.pad_bottom = static_cast<int>(s.pad_bottom);
  out.pad_right = static_cast<int>(s.pad_right);
  out.activation_min = s.activation_min;
  out.activation_max = s.activation_max;
  out.has_activation = s.has_activation();
  out.taps.assign(s.patterns.begin(), s.patterns.end());

  // Filters in stored order (runs of kernel_filters), each run's kernels sorted by channel for the channel-chunk walk.
  std::vector<char> has_kernels(s.out_channels, 0);
  out.entries.reserve(static_cast<size_t>(out.num_kernels) * 2);
  out.filter_begin.push_back(0);
  for (int run = 0; run < out.num_kernels;) {
    int end = run;
    while (end < out.num_kernels && s.kernel_filters[end] == s.kernel_filters[run]) ++end;
    std::vector<std::pair<int, int>> by_channel;  // (channel, row)
    for (int k = run; k < end; ++k) by_channel.emplace_back(static_cast<int>(s.kernel_channels[k]), k);
    std::sort(by_channel.begin(), by_channel.end());
    for (const auto& cr : by_channel) {
      out.entries.push_back(cr.first << 8 | static_cast<int>(s.kernel_patterns[cr.second]));
      out.entries.push_back(cr.second);
    }
    const int f = static_cast<int>(s.kernel_filters[run]);
    out.slot_filter.push_back(f);
    has_kernels[f] = 1;
    out.filter_begin.push_back(static_cast<int>(out.entries.size() / 2));
    run = end;
  }
  // Filters with no kernel left: bias and activation only.
  for (int f = 0; f < out.out_channels; ++f) {
    if (has_kernels[f]) continue;
    out.slot_filter.push_back(f);
    out.filter_begin.push_back(out.filter_begin.back());
  }
  return out;
}

// The C ABI's descriptor as a spec (pattern_conv_cuda.h).
inline ops::PatternConvSpec SpecFromDesc(const CtprunePatternConvDesc& d) {
  if (d.num_patterns < 0 || d.num_kernels < 0 || d.num_patterns > ops::kMaxPatterns ||
      (d.num_patterns > 0 && !d.patterns) ||
      (d.num_kernels > 0 && (!d.kernel_filters || !d.kernel_channels || !d.kernel_patterns)))
    throw ops::InvalidNode("the descriptor's pattern or kernel lists are missing or have a bad length");
  ops::PatternConvSpec s;
  s.out_channels = d.out_channels;
  s.in_channels = d.in_channels;
  if (d.num_patterns > 0) s.patterns.assign(d.patterns, d.patterns + d.num_patterns * 4);
  if (d.num_kernels > 0) {
    s.kernel_filters.assign(d.kernel_filters, d.kernel_filters + d.num_kernels);
    s.kernel_channels.assign(d.kernel_channels, d.kernel_channels + d.num_kernels);
    s.kernel_patterns.assign(d.kernel_patterns, d.kernel_patterns + d.num_kernels);
  }
  s.stride_h = d.stride_h;
  s.stride_w = d.stride_w;
  s.pad_top = d.pad_top;
  s.pad_left = d.pad_left;
  s.pad_bottom = d.pad_bottom;
  s.pad_right = d.pad_right;
  s.activation_min = d.activation_min;
  s.activation_max = d.activation_max;
  return s;
}

// The C ABI's check and pack: "" on success, else the spec's one-sentence reason (nothing may throw across the ABI).
inline std::string PackPatternConv(const CtprunePatternConvDesc& d, PackedPatternConv& out) {
  try {
    const ops::PatternConvSpec spec = SpecFromDesc(d);
    ops::CheckPatternConv(spec);
    out = PackPatternConv(spec);
    return "";
  } catch (const ops::InvalidNode& e) {
    return e.what();
  } catch (const std::bad_alloc&) {
    return "out of memory while packing the layer";
  }
}

}  // namespace cuda
}  // namespace ctprune
