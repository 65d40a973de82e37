// Which instruction-set tier runs PatternConv on this CPU: a table of tier entry points chosen (MLAS-style) from CPUID
// and XCR0 (the OS must save the wider register state too), probed once. CTPRUNE_FORCE_ISA=generic|avx2|avx512, read
// when a kernel is created, pins a tier so the tests can cover each one on a single machine (generic16 runs the
// portable code with 16 lanes and 24-vector tiles: the AVX-512 tiling logic on any CPU).
#pragma once

#include <string>

#include "cpu/pattern_conv.h"
#include "cpu/sparse_conv.h"

namespace ctprune {
namespace cpu {

// Picks the tile kernel for tiles of `vectors` vectors (1..max_vectors).
using SelectTilesFn = FilterTilesFn (*)(int vectors);

struct KernelTable {
  const char* isa;  // "generic", "generic16", "avx2" or "avx512"
  int lanes;        // floats per vector
  int max_vectors;  // largest tile, in vectors
  SelectTilesFn select_tiles;
  PackChannelFn pack;  // the input packing, in the same instruction set
  int block_pixels;    // flat positions per filter-block tile (pattern_conv.h)
  BlockStripFn block_strip;  // the filter-block kernel
  SparseKernels sparse;  // SparseConv's kernels in the same tier (sparse_conv_<tier>.cc)
  // PatternConv's direct form (pattern_conv.h, ConvGeometry::direct): the largest tile in vectors (0: the tier has
  // no direct form and packs every input), its kernels and its lane masks. (Its NaN/Inf report, which the packing
  // makes otherwise, is sparse.all_finite's.)
  int direct_vectors = 0;
  SelectDirectFn select_direct = nullptr;
  DirectMasksFn direct_masks = nullptr;
};

// The table for this process. If CTPRUNE_FORCE_ISA names a tier this CPU cannot run or an unknown tier, `error` is
// set (and the table is the best supported tier), so the caller can fail with a clear message instead of crashing.
KernelTable Kernels(std::string* error);

// The table for narrow output planes, whose rows one 8-float vector holds (PatternConv: a flat row of at most
// kNarrowRowFloats floats; SparseConv's depthwise kernel: rows of at most that many outputs; 7x7 outputs in both),
// when the tier was chosen from the CPU: on AVX-512 the AVX2 tier's 8-float vectors. A 7x7 PatternConv's 56 flat
// positions fill 7 of them but 4 16-float vectors (64 lanes): a Zen 4 ran 64@7 and 512@7 at 8x 7-15% faster so;
// wider planes were faster with 16 floats (14x14: 3.75x vs 3.42x). `chosen` itself otherwise, and whenever
// CTPRUNE_FORCE_ISA pins a tier (the tests cover each tier's own kernels on every plane size). On AVX-512 the direct
// form (pattern_conv.h) there is AVX-512's, in 8-float vectors (avx512::NarrowTable).
KernelTable NarrowPlaneKernels(const KernelTable& chosen);
constexpr int kNarrowRowFloats = 8;

// Tier entry points (one per ISA file): each tier's table, its lanes and tile size taken from its own traits.
namespace generic {
KernelTable Table();
KernelTable Table16();
SparseKernels SparseTable();
SparseKernels SparseTable16();
}  // namespace generic
namespace avx2 {
KernelTable Table();
SparseKernels SparseTable();
}  // namespace avx2
namespace avx512 {
KernelTable Table();
KernelTable NarrowTable(KernelTable avx2);  // avx2's table with the direct form in 8-float vectors and mask registers
SparseKernels SparseTable();
}  // namespace avx512

}  // namespace cpu
}  // namespace ctprune
