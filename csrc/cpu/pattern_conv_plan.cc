#include "cpu/pattern_conv_plan.h"

#include <algorithm>
#include <string>

namespace ctprune {
namespace cpu {
namespace {

void Require(bool ok, const std::string& message) {
  if (!ok) throw InvalidNode(message);
}

// The per-call geometry's errors, their messages built only when thrown (a call's checks run on every call).
[[noreturn]] void InputTooSmall(int64_t H, int64_t W) {
  throw InvalidNode("input height and width plus pads must be at least 3, got " + std::to_string(H) + "x" +
                    std::to_string(W));
}

[[noreturn]] void InputTooLarge(int C, int64_t H, int64_t W) {  // tap offsets and per-image addresses are 32-bit
  throw InvalidNode("input is too large for the kernel (" + std::to_string(C) + " channels of " + std::to_string(H) +
                    "x" + std::to_string(W) + ")");
}

}  // namespace

PatternConvPlan BuildPlan(const ops::PatternConvSpec& s, const BlockOptions& options) {
  Require(s.stride_h == s.stride_w && (s.stride_h == 1 || s.stride_h == 2),
          "strides " + ops::ListStr({s.stride_h, s.stride_w}) +
              " are not supported by the CPU kernel (it runs [1, 1] and [2, 2])");
  PatternConvPlan p;
  p.O = static_cast<int>(s.out_channels);
  p.C = static_cast<int>(s.in_channels);
  p.K = static_cast<int>(s.num_kernels());
  p.stride = static_cast<int>(s.stride_h);
  p.pad_top = static_cast<int>(s.pad_top);
  p.pad_left = static_cast<int>(s.pad_left);
  p.pad_bottom = static_cast<int>(s.pad_bottom);
  p.pad_right = static_cast<int>(s.pad_right);
  p.act_min = s.activation_min;
  p.act_max = s.activation_max;
  p.clamp = s.has_activation();

  std::vector<int32_t> shape(static_cast<size_t>(s.num_patterns()), 0);  // tap mask of each pattern
  for (size_t q = 0; q < shape.size(); ++q) {
    for (int j = 0; j < 4; ++j) shape[q] |= 1 << s.patterns[4 * q + j];
  }
  p.channels.resize(static_cast<size_t>(p.K));
  p.shapes.resize(static_cast<size_t>(p.K));
  std::vector<char> has_kernels(static_cast<size_t>(p.O), 0);
  for (int k = 0; k < p.K; ++k) {
    p.channels[k] = static_cast<int32_t>(s.kernel_channels[k]);
    p.shapes[k] = shape[static_cast<size_t>(s.kernel_patterns[k])];
    const int32_t f = static_cast<int32_t>(s.kernel_filters[k]);
    if (k == 0 || s.kernel_filters[k - 1] != f) {  // a filter's run starts (runs are contiguous: checked)
      p.filters.push_back(f);
      p.kernel_begin.push_back(k);
      has_kernels[f] = 1;
    }
  }
  for (int f = 0; f < p.O; ++f) {
    if (has_kernels[f]) continue;
    p.filters.push_back(f);
    p.kernel_begin.push_back(p.K);
  }
  p.kernel_begin.push_back(p.K);
  p.taps.reserve(static_cast<size_t>(p.K) * 4);
  for (int k = 0; k < p.K; ++k) {  // ascending taps, as TapOffsets orders them
    for (int tap = 0; tap < 9; ++tap) {
      if ((p.shapes[k] >> tap) & 1) p.taps.push_back(static_cast<int8_t>(tap));
    }
  }

  // Runs of identical kernel lists, cut into blocks; the positions left over stay per filter.
  const auto same_kernels = [&](int a, int b) {
    const int ka = p.kernel_begin[a], kb = p.kernel_begin[b], n = p.kernel_begin[a + 1] - ka;
    if (n == 0 || p.kernel_begin[b + 1] - kb != n) return false;
    for (int i = 0; i < n; ++i) {
      if (s.kernel_channels[ka + i] != s.kernel_channels[kb + i] || s.kernel_patterns[ka + i] != s.kernel_patterns[kb + i])
        return false;
    }
    return true;
  };
  std::vector<char> in_block(static_cast<size_t>(p.O), 0);
  p.block_weight_begin.push_back(0);
  for (int run = 0; options.enabled && run < p.O;) {
    int end = run + 1;
    if (p.kernel_begin[run + 1] == p.kernel_begin[run]) {  // empty filters (all at the end) stay per filter
      run = end;
      continue;
    }
    while (end < p.O && same_kernels(run, end)) ++end;
    for (int first = run; first < end; first += kBlockFilters) {
      const int count = std::min(kBlockFilters, end - first);
      if (count < kBlockFilters && count < std::max(1, options.pad_min)) break;
      p.block_first.push_back(first);
      p.block_count.push_back(count);
      const int64_t vectors = p.block_weight_begin.back() + 4 * int64_t{p.kernel_begin[first + 1] - p.kernel_begin[first]};
      Require(vectors < (int64_t{1} << 31), "too many kernels for the CPU kernel");
      p.block_weight_begin.push_back(static_cast<int32_t>(vectors));
      std::fill(in_block.begin() + first, in_block.begin() + first + count, 1);
    }
    run = end;
  }

  // Per-filter work items: up to 16 consecutive positions (fewer for small layers, so 2+ threads get several items),
  // never across a block.
  int singles = 0;
  for (int f = 0; f < p.O; ++f) singles += !in_block[f];
  const int per_item = std::max(1, std::min(16, singles / 16));
  for (int f = 0; f < p.O;) {
    if (in_block[f]) {
      ++f;
      continue;
    }
    int end = f + 1;
    while (end < p.O && !in_block[end] && end - f < per_item) ++end;
    p.group_begin.push_back(f);
    p.group_end.push_back(end);
    f = end;
  }
  return p;
}

void RegroupBlockWeights(const PatternConvPlan& p, const float* W, float* out) {
  for (int b = 0; b < p.blocks(); ++b) {
    const int first = p.block_first[b], count = p.block_count[b];
    const int kernels = p.kernel_begin[first + 1] - p.kernel_begin[first];
    float* dst = out + static_cast<size_t>(p.block_weight_begin[b]) * kBlockFilters;
    for (int k = 0; k < kernels; ++k) {
      for (int j = 0; j < 4; ++j, dst += kBlockFilters) {
        for (int n = 0; n < kBlockFilters; ++n) {
          dst[n] = n < count ? W[4 * static_cast<size_t>(p.kernel_begin[first + n] + k) + j] : 0.0f;
        }
      }
    }
  }
}

int64_t FlatRow(const PatternConvPlan& p, int64_t W) {
  // Stride 1: image rows with zero columns between them, where one zero column is both the right pad of a row and
  // the left pad of the next: W + max(pad_left, pad_right) floats apart (at least OW), not W + both pads, so fewer
  // garbage lanes (7x7: 8 instead of 9 per row, and rows 32-byte aligned). Stride 2: OW + 1 columns per phase.
  const int64_t OW = (W + p.pad_left + p.pad_right - 3) / p.stride + 1;
  return p.stride == 1 ? std::max(W + std::max(p.pad_left, p.pad_right), OW) : OW + 1;
}

ConvGeometry MakeGeometry(const PatternConvPlan& p, int64_t H, int64_t W, int lanes, int max_vectors,
                          int block_pixels) {
  const int64_t Hp = H + p.pad_top + p.pad_bottom, Wp = W + p.pad_left + p.pad_right;
  if (!(H >= 1 && W >= 1 && Hp >= 3 && Wp >= 3)) InputTooSmall(H, W);
  ConvGeometry g{};
  g.C = p.C;
  g.O = p.O;
  g.H = static_cast<int>(std::min<int64_t>(H, 1 << 30));
  g.W = static_cast<int>(std::min<int64_t>(W, 1 << 30));
  g.stride = p.stride;
  const int64_t OH = (Hp - 3) / p.stride + 1, OW = (Wp - 3) / p.stride + 1;
  g.pad_top = p.pad_top;
  g.pad_left = p.pad_left;
  // Stride 2: OW + 1 columns (FlatRow) and OH + 1 rows per phase cover every tap.
  const int64_t flat_row = FlatRow(p, W);
  const int64_t phase_rows = p.stride == 1 ? Hp : OH + 1;

  // Tiles: as few as the largest tile allows, then as small as that many tiles allow (least garbage).
  const int64_t total_vectors = (OH * flat_row + lanes - 1) / lanes;
  const int64_t tiles = (total_vectors + max_vectors - 1) / max_vectors;
  const int64_t vectors = (total_vectors + tiles - 1) / tiles;
  // Flat outputs computed, garbage included: by the per-filter tiles, and by the filter blocks' tiles.
  const int64_t covered =
      std::max(tiles * vectors * lanes, (OH * flat_row + block_pixels - 1) / block_pixels * block_pixels);

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
  if (!(static_cast<double>(plane) * p.C < 2.0e9)) InputTooLarge(p.C, H, W);
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

bool DirectFits(const PatternConvPlan& p, int64_t H, int64_t W, int lanes, int direct_vectors, bool any_size) {
  const int64_t row_vectors = (W + lanes - 1) / lanes;
  const double macs = static_cast<double>(p.K) * 4 * H * W, values = static_cast<double>(p.C + p.O) * H * W;
  const bool pays = macs <= kDirectMaxMacs && macs <= kDirectMacsPerValue * values;
  const bool pads_one = p.pad_top == 1 && p.pad_left == 1 && p.pad_bottom == 1 && p.pad_right == 1;
  return direct_vectors > 0 && (any_size || pays) && p.stride == 1 && pads_one && p.blocks() == 0 && W >= 1 &&
         row_vectors <= kDirectRowVectors && row_vectors <= direct_vectors;
}

ConvGeometry MakeDirectGeometry(const PatternConvPlan& p, int64_t H, int64_t W, int lanes, int direct_vectors) {
  if (!(H >= 1 && W >= 1)) InputTooSmall(H, W);  // the pads are 1
  if (!(static_cast<double>(H) * W * p.C < 2.0e9)) InputTooLarge(p.C, H, W);
  ConvGeometry g{};
  g.C = p.C;
  g.O = p.O;
  g.H = g.OH = static_cast<int>(H);
  g.W = g.OW = static_cast<int>(W);
  g.stride = 1;
  g.pad_top = g.pad_left = 1;
  g.flat_row = g.W;
  g.plane = static_cast<size_t>(H) * static_cast<size_t>(W);
  g.direct = true;
  g.row_vectors = static_cast<int>((W + lanes - 1) / lanes);
  // The tile height with the fewest rows computed (the last tile recomputes its overlap with the one before), each
  // tile counted as one row more (its per-tap costs); the taller on a tie. 28 rows: 4 tiles of 7, not 3 of 10.
  const int max_rows = std::min(kDirectRows, direct_vectors / g.row_vectors);
  int best_cost = -1;
  for (int rows = std::min(max_rows, g.H); rows >= 1; --rows) {
    const int tiles = (g.H + rows - 1) / rows, cost = tiles * (rows + 1);
    if (best_cost < 0 || cost < best_cost) best_cost = cost, g.tile_rows = rows, g.tiles = tiles;
  }
  g.vectors = g.tile_rows * g.row_vectors;
  for (int ky = 0; ky < 3; ++ky) {
    for (int kx = 0; kx < 3; ++kx) g.tap_offset[ky * 3 + kx] = (ky - 1) * g.W + (kx - 1);
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
