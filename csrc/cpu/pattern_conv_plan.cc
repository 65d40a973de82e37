#include "cpu/pattern_conv_plan.h"

#include <algorithm>
#include <cmath>

namespace ctprune {
namespace cpu {
namespace {

std::string Str(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

void Require(bool ok, const std::string& message) {
  if (!ok) throw InvalidNode(message);
}

}  // namespace

PatternConvPlan BuildPlan(const PatternConvAttributes& a) {
  PatternConvPlan p;
  Require(a.weight_shape.size() == 4, "weight_shape must be [O, C, 3, 3], got " + Str(a.weight_shape));
  Require(a.weight_shape[2] == 3 && a.weight_shape[3] == 3,
          "weight_shape must describe 3x3 kernels, got " + Str(a.weight_shape));
  Require(a.weight_shape[0] >= 1 && a.weight_shape[1] >= 1 && a.weight_shape[0] < (1 << 24) &&
              a.weight_shape[1] < (1 << 24),
          "weight_shape has a bad channel count: " + Str(a.weight_shape));
  p.O = static_cast<int>(a.weight_shape[0]);
  p.C = static_cast<int>(a.weight_shape[1]);

  // Pattern library: 4 distinct ascending taps in 0..8 each.
  Require(!a.patterns.empty() && a.patterns.size() % 4 == 0,
          "patterns must hold 4 taps per pattern, got " + std::to_string(a.patterns.size()) + " values");
  const int P = static_cast<int>(a.patterns.size() / 4);
  std::vector<int32_t> shape(P);
  for (int q = 0; q < P; ++q) {
    int mask = 0;
    for (int j = 0; j < 4; ++j) {
      const int64_t tap = a.patterns[4 * q + j];
      Require(tap >= 0 && tap <= 8, "pattern " + std::to_string(q) + " has tap " + std::to_string(tap) +
                                        " outside 0..8");
      Require(j == 0 || tap > a.patterns[4 * q + j - 1],
              "pattern " + std::to_string(q) + " must list 4 distinct taps in ascending order");
      mask |= 1 << tap;
    }
    shape[q] = mask;
  }

  const size_t K = a.kernel_filters.size();
  Require(a.kernel_channels.size() == K && a.kernel_patterns.size() == K,
          "kernel_filters, kernel_channels and kernel_patterns must have the same length, got " +
              std::to_string(K) + ", " + std::to_string(a.kernel_channels.size()) + ", " +
              std::to_string(a.kernel_patterns.size()));
  Require(K <= static_cast<size_t>(p.O) * static_cast<size_t>(p.C),
          "more kept kernels (" + std::to_string(K) + ") than O*C");
  p.K = static_cast<int>(K);
  p.channels.resize(K);
  p.shapes.resize(K);

  // Storage order: filter by filter (contiguous), filters by non-increasing kernel count, inside a filter by
  // (pattern, channel) strictly increasing, no input channel twice in one filter.
  std::vector<char> filter_seen(p.O, 0), channel_used(p.C, 0);
  size_t k = 0;
  int previous_count = -1;
  while (k < K) {
    const int64_t f = a.kernel_filters[k];
    Require(f >= 0 && f < p.O, "kernel " + std::to_string(k) + " has filter " + std::to_string(f) +
                                   " outside 0.." + std::to_string(p.O - 1));
    Require(!filter_seen[f], "the kernels of filter " + std::to_string(f) +
                                 " are not contiguous (kernels must be stored filter by filter)");
    filter_seen[f] = 1;
    size_t end = k;
    while (end < K && a.kernel_filters[end] == f) ++end;
    const int count = static_cast<int>(end - k);
    Require(previous_count < 0 || count <= previous_count,
            "filter " + std::to_string(f) + " keeps " + std::to_string(count) +
                " kernels, more than the filter before it (filters must be ordered by decreasing kernel count)");
    previous_count = count;

    p.filters.push_back(static_cast<int32_t>(f));
    p.kernel_begin.push_back(static_cast<int32_t>(k));
    for (size_t i = k; i < end; ++i) {
      const int64_t c = a.kernel_channels[i], q = a.kernel_patterns[i];
      Require(c >= 0 && c < p.C, "kernel " + std::to_string(i) + " has input channel " + std::to_string(c) +
                                     " outside 0.." + std::to_string(p.C - 1));
      Require(q >= 0 && q < P, "kernel " + std::to_string(i) + " has pattern id " + std::to_string(q) +
                                   " outside 0.." + std::to_string(P - 1));
      Require(!channel_used[c], "filter " + std::to_string(f) + " keeps input channel " + std::to_string(c) +
                                    " twice");
      channel_used[c] = 1;
      if (i > k) {
        const int64_t pq = a.kernel_patterns[i - 1], pc = a.kernel_channels[i - 1];
        Require(q > pq || (q == pq && c > pc), "the kernels of filter " + std::to_string(f) +
                                                   " must be ordered by pattern id, then input channel");
      }
      p.channels[i] = static_cast<int32_t>(c);
      p.shapes[i] = shape[q];
    }
    for (size_t i = k; i < end; ++i) channel_used[a.kernel_channels[i]] = 0;
    k = end;
  }
  for (int f = 0; f < p.O; ++f) {
    if (filter_seen[f]) continue;
    p.filters.push_back(f);
    p.kernel_begin.push_back(static_cast<int32_t>(K));
  }
  p.kernel_begin.push_back(static_cast<int32_t>(K));

  Require(a.strides.size() == 2, "strides must have 2 values, got " + Str(a.strides));
  Require(a.strides[0] == a.strides[1] && (a.strides[0] == 1 || a.strides[0] == 2),
          "strides " + Str(a.strides) + " are not supported (the kernel runs [1, 1] and [2, 2])");
  p.stride = static_cast<int>(a.strides[0]);
  Require(a.pads.size() == 4, "pads must have 4 values [top, left, bottom, right], got " + Str(a.pads));
  for (int64_t v : a.pads) Require(v >= 0 && v <= 1024, "pads must be between 0 and 1024, got " + Str(a.pads));
  p.pad_top = static_cast<int>(a.pads[0]);
  p.pad_left = static_cast<int>(a.pads[1]);
  p.pad_bottom = static_cast<int>(a.pads[2]);
  p.pad_right = static_cast<int>(a.pads[3]);
  Require(a.dilations.size() == 2 && a.dilations[0] == 1 && a.dilations[1] == 1,
          "dilations must be [1, 1], got " + Str(a.dilations));
  Require(a.group == 1, "group must be 1, got " + std::to_string(a.group));
  Require(!std::isnan(a.activation_min) && !std::isnan(a.activation_max) && a.activation_min <= a.activation_max,
          "activation_min must not exceed activation_max, got " + std::to_string(a.activation_min) + " and " +
              std::to_string(a.activation_max));
  p.act_min = a.activation_min;
  p.act_max = a.activation_max;
  p.clamp = !(std::isinf(a.activation_min) && a.activation_min < 0 && std::isinf(a.activation_max) &&
              a.activation_max > 0);
  return p;
}

ConvGeometry MakeGeometry(const PatternConvPlan& p, int64_t H, int64_t W, int lanes, int max_vectors) {
  const int64_t Hp = H + p.pad_top + p.pad_bottom, Wp = W + p.pad_left + p.pad_right;
  Require(H >= 1 && W >= 1 && Hp >= 3 && Wp >= 3,
          "input height and width plus pads must be at least 3, got " + std::to_string(H) + "x" + std::to_string(W));
  ConvGeometry g{};
  g.C = p.C;
  g.O = p.O;
  g.H = static_cast<int>(std::min<int64_t>(H, 1 << 30));
  g.W = static_cast<int>(std::min<int64_t>(W, 1 << 30));
  g.stride = p.stride;
  const int64_t OH = (Hp - 3) / p.stride + 1, OW = (Wp - 3) / p.stride + 1;
  g.pad_top = p.pad_top;
  g.pad_left = p.pad_left;
  // Stride 1: image rows with zero columns between them, where one zero column is both the right pad of a row and
  // the left pad of the next: W + max(pad_left, pad_right) floats apart (at least OW), not W + both pads, so fewer
  // garbage lanes (7x7: 8 instead of 9 per row, and rows 32-byte aligned). Stride 2: OW + 1 columns and OH + 1 rows
  // per phase cover every tap.
  const int64_t flat_row = p.stride == 1 ? std::max(W + std::max(p.pad_left, p.pad_right), OW) : OW + 1;
  const int64_t phase_rows = p.stride == 1 ? Hp : OH + 1;

  // Tiles: as few as the largest tile allows, then as small as that many tiles allow (least garbage).
  const int64_t total_vectors = (OH * flat_row + lanes - 1) / lanes;
  const int64_t tiles = (total_vectors + max_vectors - 1) / max_vectors;
  const int64_t vectors = (total_vectors + tiles - 1) / tiles;
  const int64_t covered = tiles * vectors * lanes;  // flat outputs computed, garbage included

  // Every read of a tile is at most covered + the largest tap offset inside one plane (stride 1) or the last phase
  // (stride 2); the slack keeps the garbage lanes of the last tile inside the buffer.
  const int64_t reach = covered + 2 * flat_row + 2 + lanes;
  int64_t phase = 0, plane = 0;
  if (p.stride == 1) {
    plane = std::max((Hp + 1) * flat_row, reach);  // the image starts pad_top rows + pad_left floats in
  } else {
    phase = (phase_rows * flat_row + 15) / 16 * 16;
    plane = 3 * phase + std::max(phase, reach);
  }
  plane = (plane + 15) / 16 * 16;  // keep every plane 64-byte aligned
  // Tap offsets and per-image addresses are 32-bit.
  Require(static_cast<double>(plane) * p.C < 2.0e9,
          "input is too large for the kernel (" + std::to_string(p.C) + " channels of " + std::to_string(H) + "x" +
              std::to_string(W) + ")");
  g.OH = static_cast<int>(OH);
  g.OW = static_cast<int>(OW);
  g.flat_row = static_cast<int>(flat_row);
  g.phase_rows = static_cast<int>(phase_rows);
  g.phase = static_cast<size_t>(phase);
  g.plane = static_cast<size_t>(plane);
  g.vectors = static_cast<int>(vectors);
  g.tiles = static_cast<int>(tiles);
  for (int ky = 0; ky < 3; ++ky) {
    for (int kx = 0; kx < 3; ++kx) {
      g.tap_offset[ky * 3 + kx] =
          p.stride == 1 ? ky * g.flat_row + kx
                        : static_cast<int>(((ky & 1) * 2 + (kx & 1)) * phase) + (ky >> 1) * g.flat_row + (kx >> 1);
    }
  }
  return g;
}

std::vector<int32_t> TapOffsets(const PatternConvPlan& p, const ConvGeometry& g) {
  std::vector<int32_t> offsets(static_cast<size_t>(p.K) * 4);
  for (int k = 0; k < p.K; ++k) {
    const int32_t channel = static_cast<int32_t>(static_cast<int64_t>(p.channels[k]) * g.plane);
    int j = 0;
    for (int tap = 0; tap < 9; ++tap) {
      if ((p.shapes[k] >> tap) & 1) offsets[4 * static_cast<size_t>(k) + j++] = channel + g.tap_offset[tap];
    }
  }
  return offsets;
}

}  // namespace cpu
}  // namespace ctprune
