// AVX2 + FMA tier of the PatternConv tile kernel (8 lanes, 16 ymm registers). Compiled for that ISA by the pragma
// below only, so the library still loads on any x86-64; dispatch.cc calls it only when CPUID and XCR0 say it can run.
#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
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

struct Avx2 {
  using V = __m256;
  static constexpr int L = 8;
  // 12 sums + the broadcast weight; the tap loads are fused into the multiply-adds and need no register.
  static constexpr int kMaxVectors = 14;
  static V Set1(float x) { return _mm256_set1_ps(x); }
  static V Broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V Add(V a, V b) { return _mm256_add_ps(a, b); }
  static V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V Or(V a, V b) { return _mm256_or_ps(a, b); }
  static V Max(V a, V b) { return _mm256_max_ps(a, b); }
  static V Min(V a, V b) { return _mm256_min_ps(a, b); }
  static void Store(float* p, V v) { _mm256_store_ps(p, v); }
  static void StoreU(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V Evens(const float* p) {
    // [a0 a2 b0 b2 | a4 a6 b4 b6], then its 64-bit quarters in the order 0 2 1 3.
    const V pairs = _mm256_shuffle_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8), _MM_SHUFFLE(2, 0, 2, 0));
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(pairs), _MM_SHUFFLE(3, 1, 2, 0)));
  }
};

#include "cpu/pattern_conv_tiles.inc"

}  // namespace

KernelTable Table() {
  return {"avx2", Avx2::L, Avx2::kMaxVectors, &SelectFilterTilesFor<Avx2>, &PackChannel<Avx2>};
}

}  // namespace avx2
}  // namespace cpu
}  // namespace ctprune

#pragma GCC pop_options
