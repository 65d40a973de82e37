#include "cpu/pattern_conv_plan.h"

#include <algorithm>
#include <cmath>
#include <cstring>

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

// Rows per register tile: fewest "loads" counting the garbage rows of the last tile and the 2 extra input rows a
// 3-row kernel needs per tile (about S*R + 2.5 vector loads per tap column per tile).
int ChooseRowsPerTile(int out_height, int stride, int max_rows) {
  int best = 1;
  double best_cost = 1e300;
  for (int r = 1; r <= max_rows; ++r) {
    const int tiles = (out_height + r - 1) / r;
    const double cost = tiles * (stride * r + 2.5);
    if (cost <= best_cost) best = r, best_cost = cost;
  }
  return best;
}

KernelRun MakeRun(int shape, int32_t begin) {
  KernelRun run{};
  run.shape = shape;
  run.begin = begin;
  run.count = 1;
  int position = 0;
  for (int tap = 0; tap < 9; ++tap) {
    if (!((shape >> tap) & 1)) continue;
    run.column[tap % 3] |= static_cast<uint8_t>(1 << (tap / 3));
    run.weight[tap] = static_cast<uint8_t>(position++);
  }
  return run;
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

    FilterPlan fp{static_cast<int32_t>(f), static_cast<int32_t>(p.runs.size()), 0};
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
      // Runs are split by tap shape (two library patterns with the same taps may share one run).
      if (p.runs.size() > static_cast<size_t>(fp.run_begin) && p.runs.back().shape == shape[q]) {
        ++p.runs.back().count;
      } else {
        p.runs.push_back(MakeRun(shape[q], static_cast<int32_t>(i)));
      }
    }
    for (size_t i = k; i < end; ++i) channel_used[a.kernel_channels[i]] = 0;
    fp.run_end = static_cast<int32_t>(p.runs.size());
    p.filters.push_back(fp);
    k = end;
  }
  for (int f = 0; f < p.O; ++f) {
    if (!filter_seen[f]) p.filters.push_back({f, 0, 0});
  }

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

int64_t OutputWidth(const PatternConvPlan& p, int64_t W) {
  return (W + p.pad_left + p.pad_right - 3) / p.stride + 1;
}

ConvGeometry MakeGeometry(const PatternConvPlan& p, int64_t H, int64_t W, int max_rows) {
  const int64_t Hp = H + p.pad_top + p.pad_bottom, Wp = W + p.pad_left + p.pad_right;
  Require(H >= 1 && W >= 1 && Hp >= 3 && Wp >= 3,
          "input height and width plus pads must be at least 3, got " + std::to_string(H) + "x" + std::to_string(W));
  Require(H < (1 << 20) && W < (1 << 20), "input is too large");
  ConvGeometry g{};
  g.C = p.C;
  g.O = p.O;
  g.H = static_cast<int>(H);
  g.W = static_cast<int>(W);
  g.stride = p.stride;
  g.OH = static_cast<int>((Hp - 3) / p.stride + 1);
  g.OW = static_cast<int>((Wp - 3) / p.stride + 1);
  g.pad_top = p.pad_top;
  g.pad_left = p.pad_left;
  g.row = static_cast<int>(Wp);
  g.odd = p.stride == 2 ? static_cast<int>((Wp + 1) / 2) : 0;
  g.rows_per_tile = ChooseRowsPerTile(g.OH, p.stride, std::max(1, std::min(max_rows, kMaxRowsPerTile)));
  g.row_tiles = (g.OH + g.rows_per_tile - 1) / g.rows_per_tile;
  g.plane_rows = p.stride * (g.row_tiles * g.rows_per_tile - 1) + 3;
  const size_t plane = static_cast<size_t>(g.plane_rows) * g.row + kPlaneSlack;
  g.plane = (plane + 15) / 16 * 16;  // keep every plane 64-byte aligned
  return g;
}

int ChooseBlockChannels(const ConvGeometry& g, int budget_bytes) {
  const long per_channel = static_cast<long>(g.stride * (g.rows_per_tile - 1) + 3) * g.row * sizeof(float);
  long wanted = std::max<long>(1, budget_bytes / std::max<long>(1, per_channel));
  if (wanted >= g.C) return g.C;
  const long blocks = (g.C + wanted - 1) / wanted;
  return static_cast<int>((g.C + blocks - 1) / blocks);
}

BlockSchedule MakeSchedule(const PatternConvPlan& p, int block_channels) {
  BlockSchedule s;
  s.block_channels = std::max(1, std::min(block_channels, p.C));
  s.blocks = (p.C + s.block_channels - 1) / s.block_channels;
  const int B = s.blocks;
  s.channels.reserve(p.K);
  s.weight_offset.reserve(p.K);
  s.segments.reserve(p.filters.size() * (B + 1));
  std::vector<int32_t> order;
  for (const FilterPlan& f : p.filters) {
    // The plan's kernels of this filter, in storage order.
    order.clear();
    for (int r = f.run_begin; r < f.run_end; ++r) {
      for (int k = p.runs[r].begin; k < p.runs[r].begin + p.runs[r].count; ++k) order.push_back(k);
    }
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      const int ba = p.channels[a] / s.block_channels, bb = p.channels[b] / s.block_channels;
      if (ba != bb) return ba < bb;
      if (p.shapes[a] != p.shapes[b]) return p.shapes[a] < p.shapes[b];
      return p.channels[a] < p.channels[b];
    });
    int first = -1, last = -1;
    size_t i = 0;
    for (int b = 0; b < B; ++b) {
      s.segments.push_back(static_cast<int32_t>(s.runs.size()));
      const size_t run_start = s.runs.size();
      for (; i < order.size() && p.channels[order[i]] / s.block_channels == b; ++i) {
        const int32_t k = order[i];
        const int32_t at = static_cast<int32_t>(s.channels.size());
        s.channels.push_back(p.channels[k]);
        s.weight_offset.push_back(4 * k);
        if (s.runs.size() > run_start && s.runs.back().shape == p.shapes[k]) {
          ++s.runs.back().count;
        } else {
          s.runs.push_back(MakeRun(p.shapes[k], at));
        }
      }
      if (s.runs.size() > run_start) {
        if (first < 0) first = b;
        last = b;
      }
    }
    s.segments.push_back(static_cast<int32_t>(s.runs.size()));
    s.first_block.push_back(first);
    s.last_block.push_back(last);
  }
  return s;
}

void PackChannel(const ConvGeometry& g, const float* x, float* packed) {
  const int W = g.W;
  for (int r = 0; r < g.plane_rows; ++r) {
    float* dst = packed + static_cast<size_t>(r) * g.row;
    const int iy = r - g.pad_top;
    if (iy < 0 || iy >= g.H) {
      std::memset(dst, 0, sizeof(float) * g.row);
      continue;
    }
    const float* src = x + static_cast<size_t>(iy) * W;
    if (g.stride == 1) {
      const int right = g.row - g.pad_left - W;  // may be negative only if pads are negative, which are rejected
      std::memset(dst, 0, sizeof(float) * g.pad_left);
      std::memcpy(dst + g.pad_left, src, sizeof(float) * W);
      if (right > 0) std::memset(dst + g.pad_left + W, 0, sizeof(float) * right);
    } else {
      // Padded column c goes to the even phase at c/2 or to the odd phase at odd + c/2.
      for (int c = 0; c < g.row; ++c) {
        const int ix = c - g.pad_left;
        const float v = (ix >= 0 && ix < W) ? src[ix] : 0.0f;
        dst[(c & 1) ? g.odd + (c >> 1) : (c >> 1)] = v;
      }
    }
  }
  const size_t used = static_cast<size_t>(g.plane_rows) * g.row;
  std::memset(packed + used, 0, sizeof(float) * (g.plane - used));
}

}  // namespace cpu
}  // namespace ctprune
