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
//
// The kernels walk a channel-blocked schedule (BlockSchedule in pattern_conv_plan.h): input channels are cut into
// `blocks` blocks small enough that one row tile of a block stays in L1 while every filter uses it; filter position fi
// (in `filters` order) has the runs [segments[fi*(blocks+1)+b], segments[fi*(blocks+1)+b+1]) in block b, and keeps
// its partial sums in `out` between blocks. first_block/last_block[fi] say where a filter's sums start (bias) and end
// (activation); -1 for a filter without kernels.
struct ImageJob {
  const float* packed;          // C packed planes of this image
  const float* weights;         // (K, 4): the kept kernels' taps in ascending tap order, in storage order
  const int32_t* channels;      // per scheduled kernel: its input channel
  const int32_t* weight_offset; // per scheduled kernel: offset of its 4 weights in `weights`
  const KernelRun* runs;        // begin/count index the scheduled kernels
  const FilterPlan* filters;    // every output channel (FilterPlan::filter), in schedule order
  const int32_t* segments;
  const int32_t* first_block;
  const int32_t* last_block;
  int blocks;
  const float* bias;            // (O) or nullptr
  float act_min, act_max;
  bool clamp;                   // apply [act_min, act_max]
  float* out;                   // (O, OH, OW) of this image
};

// Computes output row tiles [tile_begin, tile_end) of filter positions [filter_begin, filter_end).
using FilterTilesFn = void (*)(const ConvGeometry& g, const ImageJob& job, int filter_begin, int filter_end,
                               int tile_begin, int tile_end);

// The slack floats after every packed plane: vectors of the last tile may read up to two vector widths past a row.
constexpr int kPlaneSlack = 80;
// Largest number of output rows a register tile holds.
constexpr int kMaxRowsPerTile = 8;

}  // namespace cpu
}  // namespace ctprune
