// PatternConv on the CPU: the data the driver (cpu/pattern_conv_op.cc) hands to the ISA kernels (pattern_conv_{generic,
// avx2,avx512}.cc). Plain structs and pointers only: the ISA files are compiled with other target flags and must not
// share inline code with the rest of the library.
//
// Shapes: X (N, C, H, W), Y (N, O, OH, OW), compact weights (K, 4), NCHW float32.
//
// The "flat" layout. Each input channel is packed once per call into a zero-padded plane whose rows are `flat_row`
// floats apart, and the output of a filter is computed over the flat index p = y * flat_row + x, x < flat_row: the
// columns x >= OW are garbage and never stored. Every tap (ky, kx) of every output pixel then reads the packed plane
// at p + tap_offset[ky*3+kx], one constant per tap, for stride 1 and 2 alike:
// - stride 1: the plane is the padded image with each row's right pad shared as the next row's left pad
//   (flat_row = W + max(pad_left, pad_right), at least OW), tap offset ky * flat_row + kx;
// - stride 2: the plane holds four phase planes, padded[2i+py][2j+px] at phase (py, px), so output (y, x) reads
//   phase (ky&1, kx&1) at (y + ky/2, x + kx/2): tap offset = phase_index * phase + (ky>>1) * flat_row + (kx>>1).
// A register tile is `vectors` consecutive vectors of that flat index; every vector lane is useful except the few
// garbage columns, whatever the width (no per-row tails), and a kept kernel costs one weight broadcast per tap and
// one fused load-multiply-add per tap and vector. The offset of each kept kernel's tap in the packed input of an image
// (channel * plane + tap offset) is precomputed per input size, so the inner loop does no address arithmetic.
//
// Filter blocks. kBlockFilters consecutive filter positions whose kernel lists coincide entry by entry (same channel,
// same pattern, same order; pattern_conv_plan.h finds them) are computed together in the broadcast form: a block tile
// is T::kBlockPixels consecutive flat positions x kBlockFilters filters, the sums held as one 16-float row per pixel
// (two ymm, one zmm). Per tap, one load of the block's 16 weights for that tap (regrouped once: one aligned 16-float
// vector per kernel and tap) and per pixel one scalar broadcast of the input feeding every vector of the row: each
// input load feeds 16 multiply-adds instead of one. A block with fewer filters (a run's remainder) runs with zero
// weights in its unused lanes, whose outputs are never stored. The taps are applied in chunks of kBlockTapChunk over a
// strip of tiles (the chunk's input rows and weights stay in cache while every tile of the strip uses them; the
// partial sums wait in a pixel-major scratch), then the strip is written to Y through LxL transposes, each group of L
// flat positions compacted to its valid outputs (garbage columns dropped) with one permutation shared by 16 filters.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ctprune {
namespace cpu {

struct ConvGeometry {
  int C, O, H, W;
  int OH, OW;
  int stride;          // 1 or 2
  int pad_top, pad_left;
  int flat_row;        // floats between output rows in the flat index (and between packed rows of a plane/phase)
  int phase_rows;      // stride 2: rows of each phase plane
  size_t phase;        // stride 2: floats per phase plane
  size_t plane;        // floats per packed channel, enough for every tile's reads (a multiple of 16)
  int tap_offset[9];   // tap ky*3+kx: offset of its read from the output's flat index
  int vectors;         // vectors per register tile
  int tiles;           // tiles per filter: tiles * vectors * lanes >= OH * flat_row
  // The direct form (stride 1, every pad 1, no filter block: MakeDirectGeometry): nothing is packed; the kernels read
  // X itself (plane = H * W, tap_offset[ky*3+kx] = (ky - 1) * W + kx - 1 from the output's y * W + x) through lane
  // masks at the image's borders, and write Y's rows directly. A tile is tile_rows whole output rows of row_vectors
  // vectors each (vectors = tile_rows * row_vectors); tile t starts at row min(t * tile_rows, OH - tile_rows), so the
  // last tile may recompute rows of the one before it (same values) rather than need a smaller tile kernel.
  bool direct;
  int row_vectors;
  int tile_rows;
};

constexpr int kBlockFilters = 16;      // filters per block
constexpr int kBlockTapChunk = 96;     // taps per pass over a strip
constexpr int kBlockStripPixels = 384;  // largest strip (a multiple of every tier's block tile and lanes)

// Everything one image needs, read-only for the kernels except `out`. Filter positions index `filters`; position f
// owns the kept kernels [kernel_begin[f], kernel_begin[f + 1]) in storage order (empty filters last).
struct ImageJob {
  const float* packed;          // C packed planes of this image
  const int32_t* offsets;       // (K, 4): channel * plane + tap offset of each kept kernel's taps
  const float* weights;         // (K, 4): the kept kernels' taps in ascending tap order
  const int32_t* kernel_begin;  // (O + 1)
  const int32_t* filters;       // (O): output channel of each filter position
  const float* bias;            // (O) or nullptr
  float offset;                 // added to every output (a one-element Z)
  const float* residual;        // (O, OH, OW) of this image, added before the activation (a fused Add), or nullptr
  float act_min, act_max;
  bool clamp;                   // apply [act_min, act_max]
  float* out;                   // (O, OH, OW) of this image
  // Filter blocks (pattern_conv_plan.h): block b is filter positions [block_first[b], + block_count[b]), whose
  // kernels are those of its first filter; tap t of the block (kernel t / 4, its t % 4-th tap) has the block's
  // kBlockFilters weights at block_weights + (block_weight_begin[b] + t) * kBlockFilters (64-byte aligned, zero in
  // the lanes past block_count[b]).
  const int32_t* block_first;
  const int32_t* block_count;
  const int32_t* block_weight_begin;
  const float* block_weights;
  // The direct form: (K, 4) each kept tap's index ky * 3 + kx (ImageJob::offsets order), and the lane masks of every
  // tap for every kind of tile (DirectMasksFn), in the tier's mask type.
  const int8_t* taps;
  const void* direct_masks;
};

// Computes tiles [tile_begin, tile_end) of filter positions [filter_begin, filter_end).
using FilterTilesFn = void (*)(const ConvGeometry& g, const ImageJob& job, int filter_begin, int filter_end,
                               int tile_begin, int tile_end);

// Computes flat positions [pixel_begin, pixel_end) of filter block `block` (pixel_begin a multiple of the tier's block
// tile, pixel_end - pixel_begin at most kBlockStripPixels) and writes their valid outputs.
using BlockStripFn = void (*)(const ConvGeometry& g, const ImageJob& job, int block, int pixel_begin, int pixel_end);

// Writes one packed plane (g.plane floats) for input channel `x` (H x W), and nothing outside it. Returns whether it
// met a NaN or +-Inf (then the op mends the outputs a dense Conv would make NaN: pattern_conv_nonfinite.h).
using PackChannelFn = bool (*)(const ConvGeometry& g, const float* x, float* packed);

// The direct form's lane masks for a geometry: for each kind of tile (its first row the image's first: +1, its last
// row the image's last: +2), each tap ky * 3 + kx and each place in a tile (kDirectMaskSlots: the first, middle
// and last vector of the tile's first row, of its inner rows and of its last row), the lanes that tap reads there.
// Written once per call into `out` (kDirectMaskBytes, 64-byte aligned), so the tile loop only loads them.
using DirectMasksFn = void (*)(const ConvGeometry& g, void* out);
constexpr int kDirectMaskSlots = 8;
constexpr int kDirectMaskCount = 4 * 9 * kDirectMaskSlots;
constexpr size_t kDirectMaskBytes = kDirectMaskCount * 32;  // the widest mask type (AVX2: a vector)

// The direct-form tile kernel for rows of `row_vectors` vectors and tiles of `rows` rows, or nullptr.
using SelectDirectFn = FilterTilesFn (*)(int row_vectors, int rows);
constexpr int kDirectRowVectors = 4;  // the widest row the direct form takes, in vectors
constexpr int kDirectRows = 16;       // the tallest direct tile

}  // namespace cpu
}  // namespace ctprune
