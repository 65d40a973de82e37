// A checked PatternConv spec (ops/pattern_conv_spec.h) turned into what the CPU kernels walk, once, when onnxruntime
// creates the kernel; and the per-call geometry (the packing itself is per instruction set: pattern_conv_tiles.inc).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/pattern_conv.h"
#include "ops/pattern_conv_spec.h"

namespace ctprune {
namespace cpu {

using ops::InvalidNode;

struct PatternConvPlan {
  int O = 0, C = 0, K = 0;
  int stride = 1;
  int pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
  float act_min = 0, act_max = 0;
  bool clamp = false;
  std::vector<int32_t> channels;      // (K) input channel of each kept kernel, storage order
  std::vector<int32_t> shapes;        // (K) tap mask of each kept kernel (bit ky*3+kx)
  std::vector<int32_t> filters;       // (O) output channel of each filter position: filters with kernels in
                                      // storage order (heaviest first), then empty ones
  std::vector<int32_t> kernel_begin;  // (O + 1) first kept kernel of each filter position
  std::vector<int8_t> taps;           // (K, 4) ky * 3 + kx of each kept tap, ascending (ImageJob::taps)
  // Filter blocks (pattern_conv.h, ImageJob): block b is filter positions [block_first[b], + block_count[b]); its
  // regrouped weights are vectors [block_weight_begin[b], block_weight_begin[b + 1]) of kBlockFilters floats.
  std::vector<int32_t> block_first, block_count;
  std::vector<int32_t> block_weight_begin;  // (blocks + 1)
  // The filter positions outside every block, computed one filter at a time, as work items of consecutive positions
  // [group_begin[i], group_end[i]) (filters by decreasing work: the items that start first are the heaviest).
  std::vector<int32_t> group_begin, group_end;

  int blocks() const { return static_cast<int>(block_first.size()); }
};

// A run's remainder of at least this many filters (fewer than kBlockFilters) runs as a block padded with zero-weight
// lanes, a shorter one filter by filter. Measured on AVX2 Zen 3 (BENCHMARKS.md, "PatternConv block path"): runs of
// 16 + R filters, padded vs per filter, break even at R = 9 (R = 8: per filter 4% faster, R = 10: padded 5% faster).
constexpr int kBlockPadMin = 9;

struct BlockOptions {
  bool enabled = true;         // false: every filter one at a time
  int pad_min = kBlockPadMin;  // see kBlockPadMin
};

// The plan of a spec that CheckPatternConv accepted; throws InvalidNode for what the CPU kernel cannot run (strides
// other than [1, 1] and [2, 2]). Filter blocks: maximal runs of consecutive filter positions with at least one kernel
// whose kernel lists coincide entry by entry (channel, pattern id, order), cut into blocks of kBlockFilters from the
// run's start; the remainder is a padded block or per-filter positions (BlockOptions::pad_min).
PatternConvPlan BuildPlan(const ops::PatternConvSpec& spec, const BlockOptions& blocks = BlockOptions());

// Writes the blocks' weights regrouped (ImageJob::block_weights) from W (K, 4) into `out`, which holds
// plan.block_weight_begin.back() * kBlockFilters floats.
void RegroupBlockWeights(const PatternConvPlan& plan, const float* W, float* out);

// Floats between output rows in the flat index for an input W wide (ConvGeometry::flat_row), before any check.
int64_t FlatRow(const PatternConvPlan& plan, int64_t W);

// Geometry of a call with input height H and width W for a tier with `lanes`-float vectors, tiles of at most
// `max_vectors` vectors and filter-block tiles of `block_pixels` flat positions; throws InvalidNode when the padded
// input is smaller than 3x3 or too large to index.
ConvGeometry MakeGeometry(const PatternConvPlan& plan, int64_t H, int64_t W, int lanes, int max_vectors,
                          int block_pixels);

// The direct form saves a cost per input value (the packing) and per output value (the tiles' copy into Y) but runs
// its multiply-adds slower (rows of whole vectors waste lanes, 28 outputs in 32; a tap's masks are loaded), so it
// pays on small layers with few kept multiply-adds per input and output value. Measured on a Zen 4 (AVX-512; 7x7
// planes in 8-float vectors), 1 thread, per layer, session times against the packed form (kept multiply-adds per
// image; per input and output value): 16@28 at 8x and 16x (0.19 M, 7.7; 0.10 M, 3.9) 9% and 17% faster, 32@14 at 8x
// and 16x (0.23 M, 18; 0.11 M, 9) 9% and 16%, 64@7 at 16x (0.11 M, 18) 6%; but 64@7 at 8x (0.23 M, 36) 2-5% slower,
// at 4x (0.45 M) even; 32@28 at 8x (0.9 M, 18) 4% slower, 64@56 at 16x (7.2 M, 18) 10% slower.
constexpr double kDirectMaxMacs = 320e3;
constexpr double kDirectMacsPerValue = 24;

// Whether a call with an H x W input takes the direct form (pattern_conv.h) in a tier with `lanes`-float vectors and
// direct tiles of at most `direct_vectors` vectors (0: none): stride 1, every pad 1, no filter block, rows of at most
// kDirectRowVectors vectors, at most kDirectMacsPerValue kept multiply-adds per input and output value (any_size:
// however many).
bool DirectFits(const PatternConvPlan& plan, int64_t H, int64_t W, int lanes, int direct_vectors, bool any_size);

// The direct form's geometry (ConvGeometry::direct) for a call that DirectFits.
ConvGeometry MakeDirectGeometry(const PatternConvPlan& plan, int64_t H, int64_t W, int lanes, int direct_vectors);

// (K, 4): channel * g.plane + g.tap_offset[tap] for each kept kernel's taps in ascending order (ImageJob::offsets).
std::vector<int32_t> TapOffsets(const PatternConvPlan& plan, const ConvGeometry& g);

}  // namespace cpu
}  // namespace ctprune
