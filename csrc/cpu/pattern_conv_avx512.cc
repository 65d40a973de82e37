// AVX-512 tier of the PatternConv tile kernel (AVX-512F/VL, 32 vector registers, lane masks for tails). Rows of at
// most 8 outputs use 256-bit vectors (a 16-lane vector would be mostly empty); wider rows use 512-bit vectors.
// Compiled for that ISA by the pragma below only; dispatch.cc calls it only when CPUID and XCR0 say it can run.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cpu/dispatch.h"
#include "cpu/pattern_conv.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma")
// GCC 12's avx512fintrin.h seeds broadcasts with _mm512_undefined_ps(), which -Wmaybe-uninitialized misreports.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace ctprune {
namespace cpu {
namespace avx512 {
namespace {

struct Zmm {
  using V = __m512;
  static constexpr int L = 16;
  static V Set1(float x) { return _mm512_set1_ps(x); }
  static V Broadcast(const float* p) { return _mm512_broadcastss_ps(_mm_load_ss(p)); }
  static V Load(const float* p) { return _mm512_loadu_ps(p); }
  static V LoadFirst(const float* p, int n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
  }
  static V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V Max(V a, V b) { return _mm512_max_ps(a, b); }
  static V Min(V a, V b) { return _mm512_min_ps(a, b); }
  static void Pin(V& v) { __asm__("" : "+v"(v)); }
  static void Store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void StoreFirst(float* p, V v, int n) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), v);
  }
};

struct Ymm {
  using V = __m256;
  static constexpr int L = 8;
  static V Set1(float x) { return _mm256_set1_ps(x); }
  static V Broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static V LoadFirst(const float* p, int n) {
    return _mm256_maskz_loadu_ps(static_cast<__mmask8>((1u << n) - 1u), p);
  }
  static V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V Max(V a, V b) { return _mm256_max_ps(a, b); }
  static V Min(V a, V b) { return _mm256_min_ps(a, b); }
  static void Pin(V& v) { __asm__("" : "+v"(v)); }
  static void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void StoreFirst(float* p, V v, int n) {
    _mm256_mask_storeu_ps(p, static_cast<__mmask8>((1u << n) - 1u), v);
  }
};

#include "cpu/pattern_conv_tiles.inc"

}  // namespace

FilterTilesFn SelectFilterTiles(int rows_per_tile, int stride, int out_width) {
  // 16 lanes waste more than they gain when a row holds 8 outputs or fewer, or fills one 8-lane vector exactly.
  if (out_width <= 8) return SelectFilterTilesFor<Ymm>(rows_per_tile, stride);
  return SelectFilterTilesFor<Zmm>(rows_per_tile, stride);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace ctprune

#pragma GCC diagnostic pop
#pragma GCC pop_options
