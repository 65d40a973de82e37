// PatternConv on the CPU: the data the driver (pattern_conv.cc) hands to the ISA kernels (pattern_conv_{generic,avx2,
// avx512}.cc). Plain structs and pointers only: the ISA files are compiled with other target flags and must not share
// inline code with the rest of the library.
//
// Shapes: X (N, C, H, W), Y (N, O, OH, OW), compact weights (K, 4), NCHW float32.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ctprune {
namespace cpu {

// Kernels [begin, begin + count) of one filter that share one tap shape (a 9-bit mask, bit ky*3+kx). The kernels
// walk a shape column by column: `column[kx]` is the set of rows ky (bit ky) the shape keeps in column kx, and
// `weight[ky*3+kx]` the position of that tap among the kernel's 4 weights (taps are stored in ascending order).
struct KernelRun {
  int32_t shape;
  int32_t begin;
  int32_t count;
  uint8_t column[3];
  uint8_t weight[9];
};

// One output channel: its runs of kernels (a filter with no kernel left has none: its output is bias then activation).
struct FilterPlan {
  int32_t filter;
  int32_t run_begin;
  int32_t run_end;
};

// Geometry of one call, including the layout of the packed input ("workspace") the driver builds per image:
// each input channel becomes a zero-padded plane of `plane_rows` rows of `row` floats (+ slack), so every tap is a
// plain vector load at a fixed offset. For stride 2 each padded row is split into its even columns followed by its odd
// columns (at `odd`), which turns the stride-2 access into contiguous loads.
struct ConvGeometry {
  int C, O, H, W;
  int OH, OW;
  int stride;          // 1 or 2
  int pad_top, pad_left;
  int row;             // floats between packed rows
  int odd;             // stride 2: offset of the odd-column phase inside a packed row
  int plane_rows;      // packed rows per channel, enough for every row tile including its garbage rows
  size_t plane;        // floats per packed channel (plane_rows * row + slack)
  int rows_per_tile;   // R: output rows a register tile covers
  int row_tiles;       // ceil(OH / R)
};

// Everything one image needs, read-only for the kernels except `out`.
struct ImageJob {
  const float* packed;          // C packed planes of this image
  const float* weights;         // (K, 4): the kept kernels' taps in ascending tap order
  const int32_t* channels;      // (K): input channel of each kernel
  const KernelRun* runs;
  const float* bias;            // (O) or nullptr
  float act_min, act_max;
  bool clamp;                   // apply [act_min, act_max]
  float* out;                   // (O, OH, OW) of this image
};

// Computes output row tiles [tile_begin, tile_end) of the given filters.
using FilterTilesFn = void (*)(const ConvGeometry& g, const ImageJob& job, const FilterPlan* filters, int filter_count,
                               int tile_begin, int tile_end);

// The slack floats after every packed plane: vectors of the last tile may read up to two vector widths past a row.
constexpr int kPlaneSlack = 80;
// Largest number of output rows a register tile holds.
constexpr int kMaxRowsPerTile = 8;

}  // namespace cpu
}  // namespace ctprune
