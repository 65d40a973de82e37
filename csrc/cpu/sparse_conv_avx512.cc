// AVX-512 tier of the SparseConv kernels (AVX-512F, 16 lanes, 32 zmm registers, so tiles of up to 8 vectors for
// small blocks and 3 vectors x 8 channels for blocks of 8). Compiled for that ISA by the pragma below only;
// dispatch.cc hands it out only when CPUID and XCR0 say it can run.
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
  static constexpr int kTileVectors[4] = {8, 8, 6, 3};
  static constexpr bool kSplitBlock8 = false;
  static constexpr int kPrefetchRows = 0;
  static V Zero() { return _mm512_setzero_ps(); }
  static V Set1(float x) { return _mm512_set1_ps(x); }
  static V Broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static V Load(const float* p) { return _mm512_loadu_ps(p); }
  static void StoreU(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void Stream(float* p, V v) { _mm512_stream_ps(p, v); }
  static void Fence() { _mm_sfence(); }
  using M = __mmask16;
  static M Mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static M MaskRange(int lo, int hi) { return static_cast<__mmask16>(Mask(hi) & ~Mask(lo)); }  // lanes lo .. hi - 1
  static V MaskLoad(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static void StoreFirst(float* p, V v, int n) { _mm512_mask_storeu_ps(p, Mask(n), v); }
  // even = p[0], p[2], ..., p[30]; odd = p[1], p[3], ..., p[31].
  static void Deinterleave(const float* p, V& even, V& odd) {
    const V a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
    const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    even = _mm512_permutex2var_ps(a, evens, b);
    odd = _mm512_permutex2var_ps(a, _mm512_add_epi32(evens, _mm512_set1_epi32(1)), b);
  }
  static V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V Add(V a, V b) { return _mm512_add_ps(a, b); }
  static V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V Div(V a, V b) { return _mm512_div_ps(a, b); }
  static V Max(V a, V b) { return _mm512_max_ps(a, b); }
  static V Min(V a, V b) { return _mm512_min_ps(a, b); }
  static V Round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V Pow2(V n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static __m512i Indices16(const uint16_t* cols) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols)));
  }
  static __m512i Indices16(const int32_t* cols) { return _mm512_loadu_si512(cols); }
  static __m256i Indices8(const uint16_t* cols) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cols)));
  }
  static __m256i Indices8(const int32_t* cols) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols)); }
  // Lane k*B + b = x[cols[k]].
  template <int B, class Idx>
  static V Expand(const float* x, const Idx* cols) {
    if constexpr (B == 8) {
      const __m512d lo = _mm512_castps_pd(_mm512_set1_ps(x[cols[0]]));
      return _mm512_castpd_ps(_mm512_insertf64x4(lo, _mm256_castps_pd(_mm256_set1_ps(x[cols[1]])), 1));
    } else if constexpr (B == 4) {
      const __m128 four = _mm_setr_ps(x[cols[0]], x[cols[1]], x[cols[2]], x[cols[3]]);
      const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
      return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(four));
    } else if constexpr (B == 2) {
      const __m512i spread = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
      const __m512i idx = _mm512_permutexvar_epi32(spread, _mm512_castsi256_si512(Indices8(cols)));
      return _mm512_i32gather_ps(idx, x, 4);
    } else {
      return _mm512_i32gather_ps(Indices16(cols), x, 4);
    }
  }
};

#include "cpu/sparse_conv_kernels.inc"

}  // namespace

SparseKernels SparseTable() { return SparseKernelsFor<Zmm>(); }

}  // namespace avx512
}  // namespace cpu
}  // namespace ctprune

#pragma GCC diagnostic pop
#pragma GCC pop_options
