// SparseConv on the CPU (ops/SparseConv.md): the data the driver (ops/sparse_conv_op.cc) hands to the ISA kernels
// (sparse_conv_{generic,avx2,avx512}.cc, one template in sparse_conv_kernels.inc). Plain structs and pointers only:
// the ISA files are compiled with other target flags and must not share inline code with the rest of the library.
//
// Conv form. Every kept column of a block (input channel c, tap ky, kx) reads the packed input at one offset from the
// output's "flat" index p = oy * flat_row + ox, as for PatternConv (cpu/pattern_conv.h): the input of each channel is
// packed (when it has to be) into a plane where output pixel p of tap (ky, kx) reads plane[p + tap_offset]. A stride
// s > 1 splits the padded input into s_h * s_w phase planes; a tap reads phase ((ky*d_h) % s_h, (kx*d_w) % s_w). A
// 1x1 Conv without pads has flat_row = OW and one phase, so its flat index is the output index and an aligned plane
// stride makes every input load aligned; when X's planes already are (H*W a multiple of the lanes), X is read in
// place, and on the 8-lane tiers whatever X's alignment and plane size (its loads then cross cache lines; the plane's
// partial last vector is read through a lane mask). A register tile is `block` output channels x `vectors` consecutive vectors of the flat index: each loaded
// input vector feeds the block's channels (weights broadcast).
//
// FC form. X (N, I), Y (N, O): a block's rows stream once; one vector holds lanes / block rows of the block (their
// x values expanded to match), so one load of weights feeds one multiply-add.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ctprune {
namespace cpu {

// The fused epilogue: y = gate(clip(sum + bias + z)).
struct SparseEpilogue {
  const float* bias;      // (O) or nullptr
  float offset;           // a one-element Z, added to every output
  float act_min, act_max;
  bool clamp;             // apply [act_min, act_max]
  int gate;               // 0 none, 1 c * HardSigmoid(c), 2 c * Sigmoid(c)
  float alpha, beta;      // HardSigmoid's
};

// One image of a Conv, read-only except `out`. Stored block position p owns rows [row_begin[p], row_begin[p + 1]) of
// `values` (block floats per row) and `offsets` (each row's read offset in `packed`: channel * plane + tap offset).
struct SparseConvJob {
  const float* packed;        // this image's input planes (packed, or X itself)
  const int32_t* offsets;     // (K)
  const float* values;        // (K, block)
  const int32_t* row_begin;   // (NB + 1)
  const int32_t* first;       // (NB) first output channel of the block at each position
  const int32_t* channels;    // (NB) its channels (< block for a partial block)
  int block;
  int flat_row;               // output row length in the flat index (>= OW)
  int OH, OW;
  int vectors;                // flat vectors that hold OH * flat_row outputs
  int tile_vectors;           // vectors per tile (the last tiles may be one vector shorter)
  int tiles;
  // Tiles per pass: each block runs over a pass's tiles before the next block starts, so that a block's weights stay in
  // L1 and each output plane is written in runs of a pass's width rather than a tile's (1: every block per tile).
  int pass_tiles;
  // The plane's last vector holds only `tail` outputs (0: every vector is whole); flat_row == OW only. That vector is
  // read and written through a lane mask, so that X can be read in place whatever its plane size.
  int tail;
  const float* residual;      // (O, OH, OW) of this image, or nullptr
  SparseEpilogue epilogue;
  float* out;                 // (O, OH, OW) of this image
  // Streaming (non-temporal) stores for Y: set when Y is much larger than L2 (it would only evict the input) and every
  // full vector of every output plane is aligned (plane a multiple of the lanes, Y aligned).
  bool stream;
  // Prefetch each row's input a few rows ahead (tiers with T::kPrefetchRows > 0): set when a tile's input of all
  // channels is well past L1, so that the rows come from L2.
  bool prefetch;
  // The non-finite check fused into the tile loop (X read in place: a separate pass over X would read it from memory
  // once more): when check_channels > 0, the call that starts at position 0 reads every channel's span of each tile
  // (channel c at packed + c * check_plane) before the blocks do, and sets *nonfinite when one holds NaN or +-inf.
  int check_channels;
  size_t check_plane;
  int* nonfinite;
};

// Blocks at positions [position_begin, position_end) over tiles [tile_begin, tile_end) of one image.
using SparseConvTilesFn = void (*)(const SparseConvJob& job, int position_begin, int position_end, int tile_begin,
                                   int tile_end);

// An FC: images [n_begin, n_end) of X (N, I) through blocks at positions [position_begin, position_end).
struct SparseFcJob {
  const float* x;             // (N, I)
  int inputs;                 // I
  int outputs;                // O
  const void* columns;        // (K) uint16 or int32, per `wide`
  bool wide;                  // int32 columns
  const float* values;        // (K, block)
  const int32_t* row_begin;   // (NB + 1)
  const int32_t* first;       // (NB)
  const int32_t* channels;    // (NB)
  int block;
  const float* residual;      // (N, O) or nullptr
  SparseEpilogue epilogue;
  float* out;                 // (N, O)
};

using SparseFcFn = void (*)(const SparseFcJob& job, int position_begin, int position_end, int n_begin, int n_end);

// A depthwise Conv (group == C, one input and one output channel per group, dilation 1, stride_h == stride_w in
// {1, 2}): per channel, the input rows an output row strip reads are copied into `scratch` with the pads as zeros, so
// that every output row is `ow_vectors` full vector loads per tap with no bounds tests. A stride of 2 splits each
// padded row into its even and odd columns (phase 0 then phase 1, `row_floats` each), so that tap kx of output column
// ox reads phase kx % 2 at ox + kx / 2 and the loads stay contiguous. Scratch row r holds padded input row
// oy_begin * stride + r; each output step computes several output rows, so that each loaded input vector feeds one
// multiply-add per output row whose window holds that input row.
struct SparseDepthwiseJob {
  const float* x;           // (N, C, H, W)
  const float* weights;     // (C, kh * kw): the dense weights of each channel (0 where the node keeps no tap)
  int C, H, W, OH, OW;
  int kh, kw, stride, pad_top, pad_left;
  int row_floats;           // floats of one phase of one scratch row (>= the columns any load reads)
  const float* residual;    // (N, C, OH, OW) or nullptr
  SparseEpilogue epilogue;
  float* out;               // (N, C, OH, OW)
};

// Channels [c_begin, c_end) of image n, output rows [oy_begin, oy_end); `scratch` holds
// ((oy_end - oy_begin - 1) * stride + kh) * stride * row_floats floats, 64-byte aligned.
using SparseDepthwiseFn = void (*)(const SparseDepthwiseJob& job, float* scratch, int n, int c_begin, int c_end,
                                   int oy_begin, int oy_end);

// One tier's SparseConv kernels.
struct SparseKernels {
  int lanes;                  // floats per vector
  int tile_vectors[4];        // largest tile, per block 1, 2, 4, 8
  SparseConvTilesFn conv[4];  // per block 1, 2, 4, 8
  SparseFcFn fc;
  SparseDepthwiseFn depthwise;
  bool (*all_finite)(const float* x, size_t n);  // no NaN or +-inf among x[0..n)
};

// Index of a block size (1, 2, 4, 8) in the tables above; -1 for any other.
inline int BlockIndex(int block) { return block == 1 ? 0 : block == 2 ? 1 : block == 4 ? 2 : block == 8 ? 3 : -1; }

}  // namespace cpu
}  // namespace ctprune
