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

#include "cpu/pattern_conv_ymm.inc"

struct Avx2 : YmmBasics {
  // 12 sums + the broadcast weight; the tap loads are fused into the multiply-adds and need no register.
  static constexpr int kMaxVectors = 14;
  static V EvensOf(V a, V b) {
    // [a0 a2 b0 b2 | a4 a6 b4 b6], then its 64-bit quarters in the order 0 2 1 3.
    const V pairs = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(pairs), _MM_SHUFFLE(3, 1, 2, 0)));
  }
  static V Evens(const float* p) { return EvensOf(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)); }
  static __m256i First(int n) {  // lanes below n all ones
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V EvensFirst(const float* p, int n) {  // masked loads read p[0 .. 2n - 2] only
    const int floats = 2 * n - 1;
    const V evens = EvensOf(_mm256_maskload_ps(p, First(floats)), _mm256_maskload_ps(p + 8, First(floats - 8)));
    return _mm256_and_ps(evens, _mm256_castsi256_ps(First(n)));
  }
  static void StoreFirst(float* p, V v, int n) { _mm256_maskstore_ps(p, First(n), v); }
  static V KeepFirst(V v, int n) { return _mm256_and_ps(v, _mm256_castsi256_ps(First(n))); }
  static constexpr bool kSlowMaskedMemory = true;  // vmaskmovps: microcoded on AMD (its store, tens of cycles)

  // The direct form: lane masks as vectors (all ones or zero per lane); vmaskmovps neither reads (no fault) nor
  // writes the lanes a mask leaves out, and reads them as 0. 10 sums, + the weight and the masks in 16 registers.
  static constexpr int kDirectVectors = 10;
  using K = __m256i;
  static K MaskRange(int lo, int hi) { return _mm256_andnot_si256(First(lo), First(hi)); }  // none when hi <= lo
  static K MaskAnd(K a, K b) { return _mm256_and_si256(a, b); }
  static V LoadMasked(K m, const float* p) { return _mm256_maskload_ps(p, m); }
  static void StoreMasked(float* p, K m, V v) { _mm256_maskstore_ps(p, m, v); }
  static V FmaMasked(V w, const float* p, V acc, K m) { return _mm256_fmadd_ps(w, LoadMasked(m, p), acc); }

  // Filter blocks: 6 pixels x 16 filters = 12 sums, + 2 weight vectors and the broadcast input.
  static constexpr int kBlockPixels = 6;
  using Index = __m256i;
  static Index LoadIndex(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static V Permute(V v, Index i) { return _mm256_permutevar8x32_ps(v, i); }
  static void Columns(const float* src, int stride, V (&r)[8]) {
    V t[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_load_ps(src + i * stride);
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // r[i][0] r[i+1][0] r[i][1] r[i+1][1] | same for 4, 5
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // lanes 2, 3 | 6, 7
    }
    for (int i = 0; i < 8; i += 4) {
      u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));          // column 0 of rows i..i+3 | 4
      u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));      // column 1 | 5
      u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));  // column 2 | 6
      u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));  // column 3 | 7
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
      r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
  }
};

#include "cpu/pattern_conv_tiles.inc"

}  // namespace

KernelTable Table() {
  return {"avx2",          Avx2::L,
          Avx2::kMaxVectors, &SelectFilterTilesFor<Avx2>,
          &PackChannel<Avx2>, Avx2::kBlockPixels,
          &BlockStrip<Avx2>,  {},
          Avx2::kDirectVectors, &SelectDirectTilesFor<Avx2>, &DirectMasks<Avx2>};
}

}  // namespace avx2
}  // namespace cpu
}  // namespace ctprune

#pragma GCC pop_options
