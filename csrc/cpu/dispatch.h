// Which instruction-set tier runs PatternConv on this CPU: a table of tier entry points chosen (MLAS-style) from CPUID
// and XCR0 (the OS must save the wider register state too), probed once. CTPRUNE_FORCE_ISA=generic|avx2|avx512, read
// when a kernel is created, pins a tier so the tests can cover each one on a single machine (generic16 runs the
// portable code with 16 lanes: the AVX-512 tiling logic on any CPU).
#pragma once

#include <string>

#include "cpu/pattern_conv.h"

namespace ctprune {
namespace cpu {

// Picks the tile kernel for a layer: rows per register tile (1..kMaxRowsPerTile), stride (1 or 2), output width.
using SelectTilesFn = FilterTilesFn (*)(int rows_per_tile, int stride, int out_width);

// Picks the two-vectors-per-row tile kernel (rows_per_tile <= kWideMaxRows) for a stride, or nullptr.
using SelectWideTilesFn = FilterTilesFn (*)(int rows_per_tile, int stride);

struct KernelTable {
  const char* isa;  // "generic", "generic16", "avx2" or "avx512"
  SelectTilesFn select_tiles;
  SelectWideTilesFn select_wide = nullptr;  // tiers with a two-vector kernel
  int wide_min_width = 0;                   // output width from which the two-vector kernel is used
};

// Rows per register tile the two-vector kernels take at most.
constexpr int kWideMaxRows = 4;

// The table for this process. If CTPRUNE_FORCE_ISA names a tier this CPU cannot run or an unknown tier, `error` is
// set (and the table is the best supported tier), so the caller can fail with a clear message instead of crashing.
KernelTable Kernels(std::string* error);

// Tier entry points (one per ISA file).
namespace generic {
FilterTilesFn SelectFilterTiles(int rows_per_tile, int stride, int out_width);
FilterTilesFn SelectFilterTiles16(int rows_per_tile, int stride, int out_width);
}  // namespace generic
namespace avx2 {
FilterTilesFn SelectFilterTiles(int rows_per_tile, int stride, int out_width);
FilterTilesFn SelectWideFilterTiles(int rows_per_tile, int stride);
}  // namespace avx2
namespace avx512 {
FilterTilesFn SelectFilterTiles(int rows_per_tile, int stride, int out_width);
}  // namespace avx512

}  // namespace cpu
}  // namespace ctprune
