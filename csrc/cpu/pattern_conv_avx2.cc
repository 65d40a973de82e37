// AVX2 + FMA tier of the PatternConv tile kernel (8 lanes, 16 ymm registers). Compiled for that ISA by the pragma
// below only, so the library still loads on any x86-64; dispatch.cc calls it only when CPUID and XCR0 say it can run.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cpu/dispatch.h"
#include "cpu/pattern_conv.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace ctprune {
namespace cpu {
namespace avx2 {
namespace {

// maskstore lane masks: StoreFirst(n) reads kTailMask + 8 - n, whose first n entries are all ones.
alignas(64) const int32_t kTailMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

struct Avx2 {
  using V = __m256;
  static constexpr int L = 8;
  static V Set1(float x) { return _mm256_set1_ps(x); }
  static V Broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static V LoadFirst(const float* p, int n) {
    return _mm256_maskload_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kTailMask + 8 - n)));
  }
  static V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V Max(V a, V b) { return _mm256_max_ps(a, b); }
  static V Min(V a, V b) { return _mm256_min_ps(a, b); }
  static void Pin(V& v) { __asm__("" : "+x"(v)); }
  static void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void StoreFirst(float* p, V v, int n) {
    _mm256_maskstore_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kTailMask + 8 - n)), v);
  }
};

#include "cpu/pattern_conv_tiles.inc"

}  // namespace

FilterTilesFn SelectFilterTiles(int rows_per_tile, int stride, int /*out_width*/) {
  return SelectFilterTilesFor<Avx2>(rows_per_tile, stride);
}

FilterTilesFn SelectWideFilterTiles(int rows_per_tile, int stride) {
  static_assert(kMaxRowsWide == kWideMaxRows, "dispatch.h and the tile kernels disagree on wide rows");
  return SelectWideFilterTilesFor<Avx2>(rows_per_tile, stride);
}

}  // namespace avx2
}  // namespace cpu
}  // namespace ctprune

#pragma GCC pop_options
