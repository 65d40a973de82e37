// AVX2 + FMA tier of the SparseConv kernels (8 lanes, 16 ymm registers: a tile holds block x vectors sums, the tile's
// input vectors and one broadcast weight; 4 channels x 3 vectors fill them, and a block of 8 runs as two of those). Compiled for that ISA by the pragma below only, so the library still loads
// on any x86-64; dispatch.cc hands it out only when CPUID and XCR0 say it can run.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cpu/sparse_conv.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace ctprune {
namespace cpu {
namespace avx2 {
namespace {

struct Avx2 {
  using V = __m256;
  static constexpr int L = 8;
  static constexpr int kTileVectors[4] = {6, 4, 3, 3};
  static constexpr bool kSplitBlock8 = true;
  static constexpr int kPrefetchRows = 8;
  static V Zero() { return _mm256_setzero_ps(); }
  static V Set1(float x) { return _mm256_set1_ps(x); }
  static V Broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static void StoreU(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void Stream(float* p, V v) { _mm256_stream_ps(p, v); }
  static void Fence() { _mm_sfence(); }
  using M = __m256i;
  static M Mask(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
  static M MaskRange(int lo, int hi) {  // lanes lo .. hi - 1
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(lo), lane),
                               _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), lane));
  }
  static V MaskLoad(const float* p, M m) { return _mm256_maskload_ps(p, m); }
  // Lanes [0, n) through 4-, 2- and 1-lane stores: vmaskmovps to memory measured ~15 cycles on Zen 3.
  static void StoreFirst(float* p, V v, int n) {
    __m128 part = _mm256_castps256_ps128(v);
    if (n >= 4) {
      _mm_storeu_ps(p, part);
      part = _mm256_extractf128_ps(v, 1);
      p += 4;
      n -= 4;
    }
    if (n >= 2) {
      _mm_storel_pi(reinterpret_cast<__m64*>(p), part);
      part = _mm_movehl_ps(part, part);
      p += 2;
      n -= 2;
    }
    if (n >= 1) _mm_store_ss(p, part);
  }
  // even = p[0], p[2], ..., p[14]; odd = p[1], p[3], ..., p[15].
  static void Deinterleave(const float* p, V& even, V& odd) {
    const V a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
    // Within each 128-bit half: a0 a2 b0 b2 | a4 a6 b4 b6; the 64-bit quarters reordered 0 2 1 3.
    even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
    odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
  }
  static V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V Add(V a, V b) { return _mm256_add_ps(a, b); }
  static V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V Div(V a, V b) { return _mm256_div_ps(a, b); }
  static V Max(V a, V b) { return _mm256_max_ps(a, b); }
  static V Min(V a, V b) { return _mm256_min_ps(a, b); }
  static V Round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V Pow2(V n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static __m256i Indices(const uint16_t* cols) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cols)));
  }
  static __m256i Indices(const int32_t* cols) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols)); }
  // Lane k*B + b = x[cols[k]].
  template <int B, class Idx>
  static V Expand(const float* x, const Idx* cols) {
    if constexpr (B == 8) {
      return _mm256_broadcast_ss(x + cols[0]);
    } else if constexpr (B == 4) {
      return _mm256_setr_m128(_mm_broadcast_ss(x + cols[0]), _mm_broadcast_ss(x + cols[1]));
    } else if constexpr (B == 2) {
      const __m128 four = _mm_setr_ps(x[cols[0]], x[cols[1]], x[cols[2]], x[cols[3]]);
      return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(four), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    } else {
      return _mm256_i32gather_ps(x, Indices(cols), 4);
    }
  }
};

#include "cpu/sparse_conv_kernels.inc"

}  // namespace

SparseKernels SparseTable() { return SparseKernelsFor<Avx2>(); }

}  // namespace avx2
}  // namespace cpu
}  // namespace ctprune

#pragma GCC pop_options
