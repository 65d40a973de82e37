// PatternConv for the GPU: validating the operator's attributes and packing them for the kernel (host code only).
//
// The operator stores kernels filter by filter, each filter's kernels by (pattern, channel) -- the order the CPU kernel
// wants (ops/PatternConv.md). The GPU kernel stages input channels in chunks through shared memory, so it wants each
// filter's kernels by channel instead. The packed layout therefore keeps, per kept kernel, one entry
//     meta = channel << 8 | pattern,   row = the kernel's row in W (K, 4)
// with each filter's entries sorted by channel, and a slot table: slot s (0..O-1) computes filter slot_filter[s] from
// entries [filter_begin[s], filter_begin[s + 1]). Slots follow the stored filter order (decreasing work, so a block of
// consecutive slots gets similar work); filters with no kernel left come last with empty ranges (bias, activation).
//
// Header-only and free of CUDA so that the launcher (nvcc), the onnxruntime op (g++) and the CPU emulator share it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/pattern_conv_cuda.h"

namespace ctprune {
namespace cuda {

constexpr int kMaxPatterns = 128;             // 126 distinct 4-of-9 shapes exist; the tap table lives in kernel params
constexpr int64_t kMaxChannels = 1 << 23;     // channel shares an int with the pattern id (8 bits)

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

// Checks the attributes as the CPU op does and packs them. Returns "" on success, else one readable sentence.
inline std::string PackPatternConv(const CtprunePatternConvDesc& d, PackedPatternConv& out) {
  const int64_t O = d.out_channels, C = d.in_channels, P = d.num_patterns, K = d.num_kernels;
  if (O <= 0 || C <= 0) return "weight_shape must be [O, C, 3, 3] with O, C > 0";
  if (C >= kMaxChannels) return "the GPU kernel supports fewer than 8388608 input channels";
  if (P < 0 || P > kMaxPatterns) return "patterns must hold at most 128 patterns of 4 taps, got " + std::to_string(P);
  if (K < 0) return "kernel_filters must not be negative in length";
  if (K > 0 && (!d.kernel_filters || !d.kernel_channels || !d.kernel_patterns))
    return "kernel_filters, kernel_channels and kernel_patterns are required";
  if (d.stride_h < 1 || d.stride_w < 1 || d.stride_h > 1024 || d.stride_w > 1024)
    return "strides must be in 1..1024, got [" + std::to_string(d.stride_h) + ", " + std::to_string(d.stride_w) + "]";
  if (d.pad_top < 0 || d.pad_left < 0 || d.pad_bottom < 0 || d.pad_right < 0 || d.pad_top > 1024 ||
      d.pad_left > 1024 || d.pad_bottom > 1024 || d.pad_right > 1024)
    return "pads must be in 0..1024";
  if (std::isnan(d.activation_min) || std::isnan(d.activation_max) || d.activation_min > d.activation_max)
    return "activation_min must not exceed activation_max";

  out = PackedPatternConv{};
  out.out_channels = static_cast<int>(O);
  out.in_channels = static_cast<int>(C);
  out.num_patterns = static_cast<int>(P);
  out.num_kernels = static_cast<int>(K);
  out.stride_h = static_cast<int>(d.stride_h);
  out.stride_w = static_cast<int>(d.stride_w);
  out.pad_top = static_cast<int>(d.pad_top);
  out.pad_left = static_cast<int>(d.pad_left);
  out.pad_bottom = static_cast<int>(d.pad_bottom);
  out.pad_right = static_cast<int>(d.pad_right);
  out.activation_min = d.activation_min;
  out.activation_max = d.activation_max;
  out.has_activation = !(std::isinf(d.activation_min) && d.activation_min < 0 && std::isinf(d.activation_max) &&
                         d.activation_max > 0);

  out.taps.resize(static_cast<size_t>(P) * 4);
  for (int64_t p = 0; p < P; ++p) {
    for (int t = 0; t < 4; ++t) {
      const int64_t tap = d.patterns[p * 4 + t];
      if (tap < 0 || tap > 8 || (t > 0 && tap <= d.patterns[p * 4 + t - 1]))
        return "pattern " + std::to_string(p) + " must list 4 ascending taps in 0..8";
      out.taps[p * 4 + t] = static_cast<int>(tap);
    }
  }

  // Storage order: filters contiguous, by non-increasing kernel count; inside a filter by (pattern, channel) strictly.
  std::vector<char> filter_seen(O, 0), channel_seen(C, 0);
  std::vector<int> order;  // filters in stored order
  out.entries.reserve(static_cast<size_t>(K) * 2);
  out.filter_begin.push_back(0);
  int64_t run_start = 0, previous_count = INT64_MAX;
  for (int64_t k = 0; k <= K; ++k) {
    const bool run_ends = k == K || (k > run_start && d.kernel_filters[k] != d.kernel_filters[run_start]);
    if (run_ends && k > run_start) {
      const int64_t f = d.kernel_filters[run_start], count = k - run_start;
      if (count > previous_count)
        return "filter " + std::to_string(f) + " keeps " + std::to_string(count) +
               " kernels but follows a filter with fewer: filters must be stored by decreasing kernel count";
      previous_count = count;
      // Sort this filter's kernels by channel for the kernel's channel-chunk walk.
      std::vector<std::pair<int, int>> by_channel;  // (channel, row)
      for (int64_t j = run_start; j < k; ++j) by_channel.emplace_back(static_cast<int>(d.kernel_channels[j]), static_cast<int>(j));
      std::sort(by_channel.begin(), by_channel.end());
      for (const auto& cr : by_channel) {
        out.entries.push_back(cr.first << 8 | static_cast<int>(d.kernel_patterns[cr.second]));
        out.entries.push_back(cr.second);
      }
      for (const auto& cr : by_channel) channel_seen[cr.first] = 0;
      order.push_back(static_cast<int>(f));
      out.filter_begin.push_back(static_cast<int>(out.entries.size() / 2));
    }
    if (k == K) break;
    if (run_ends) run_start = k;
    const int64_t f = d.kernel_filters[k], c = d.kernel_channels[k], p = d.kernel_patterns[k];
    const std::string where = "kernel " + std::to_string(k) + " (filter " + std::to_string(f) + ", channel " +
                              std::to_string(c) + ", pattern " + std::to_string(p) + ")";
    if (f < 0 || f >= O) return where + ": filter out of range 0.." + std::to_string(O - 1);
    if (c < 0 || c >= C) return where + ": channel out of range 0.." + std::to_string(C - 1);
    if (p < 0 || p >= P) return where + ": pattern out of range 0.." + std::to_string(P - 1);
    if (k == run_start) {
      if (filter_seen[f]) return where + ": the filter's kernels are not contiguous";
      filter_seen[f] = 1;
    } else {
      const int64_t pp = d.kernel_patterns[k - 1], pc = d.kernel_channels[k - 1];
      if (p < pp || (p == pp && c <= pc))
        return where + ": kernels of a filter must be ordered by pattern, then by channel";
    }
    if (channel_seen[c]) return where + ": the filter already keeps a kernel on this channel";
    channel_seen[c] = 1;
  }
  // Filters with no kernel left: bias and activation only.
  for (int64_t f = 0; f < O; ++f) {
    if (!filter_seen[f]) {
      order.push_back(static_cast<int>(f));
      out.filter_begin.push_back(out.filter_begin.back());
    }
  }
  out.slot_filter = order;
  return "";
}

}  // namespace cuda
}  // namespace ctprune
