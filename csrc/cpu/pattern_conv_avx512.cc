// AVX-512 tier of the PatternConv tile kernel (AVX-512F, 16 lanes, 32 vector registers, so tiles of up to 24 vectors).
// Compiled for that ISA by the pragma below only; dispatch.cc calls it only when CPUID and XCR0 say it can run.
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
  static constexpr int kMaxVectors = 24;
  static V Set1(float x) { return _mm512_set1_ps(x); }
  static V Broadcast(const float* p) { return _mm512_broadcastss_ps(_mm_load_ss(p)); }
  static V Load(const float* p) { return _mm512_loadu_ps(p); }
  static V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V Add(V a, V b) { return _mm512_add_ps(a, b); }
  static V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V Or(V a, V b) {  // vorps needs AVX-512DQ; the integer OR is AVX-512F
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  }
  static V Max(V a, V b) { return _mm512_max_ps(a, b); }
  static V Min(V a, V b) { return _mm512_min_ps(a, b); }
  static void Store(float* p, V v) { _mm512_store_ps(p, v); }
  static void StoreU(float* p, V v) { _mm512_storeu_ps(p, v); }
  static __m512i EvenLanes() {  // lanes of the concatenated pair (a, b): 0, 2, ..., 30
    return _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  }
  static V Evens(const float* p) {
    return _mm512_permutex2var_ps(_mm512_loadu_ps(p), EvenLanes(), _mm512_loadu_ps(p + 16));
  }
  static V EvensFirst(const float* p, int n) {  // masked loads read p[0 .. 2n - 2] only
    const int floats = 2 * n - 1;
    const __mmask16 lo = floats >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << floats) - 1);
    const __mmask16 hi = floats > 16 ? static_cast<__mmask16>((1u << (floats - 16)) - 1) : 0;
    const V pairs =
        _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(lo, p), EvenLanes(), _mm512_maskz_loadu_ps(hi, p + 16));
    return _mm512_maskz_mov_ps(static_cast<__mmask16>((1u << n) - 1), pairs);
  }
  static void StoreFirst(float* p, V v, int n) { _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v); }
  static V KeepFirst(V v, int n) { return _mm512_maskz_mov_ps(static_cast<__mmask16>((1u << n) - 1), v); }
  static constexpr bool kSlowMaskedMemory = false;  // mask registers: masked loads and stores at full speed

  // Filter blocks: 24 pixels x 16 filters = 24 sums, + the weight vector; the broadcast input is the multiply-add's
  // embedded-broadcast operand.
  static constexpr int kBlockPixels = 24;
  using Index = __m512i;
  static Index LoadIndex(const int32_t* p) { return _mm512_loadu_si512(p); }
  static V Permute(V v, Index i) { return _mm512_permutexvar_ps(i, v); }
  static void Columns(const float* src, int stride, V (&r)[16]) {
    // Column j is every stride-th float from src + j: one gather each.
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(stride));
    for (int j = 0; j < 16; ++j) r[j] = _mm512_i32gather_ps(rows, src + j, 4);
  }

  // The direct form: lane masks in mask registers; masked-off lanes are neither read (no fault) nor written.
  static constexpr int kDirectVectors = 24;
  using K = __mmask16;
  static K MaskRange(int lo, int hi) {  // lanes lo .. hi - 1 (none when hi <= lo)
    return hi <= lo ? 0 : static_cast<K>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
  }
  static K MaskAnd(K a, K b) { return static_cast<K>(a & b); }
  static V LoadMasked(K m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void StoreMasked(float* p, K m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  // acc + w * p[lane] in the lanes of m, acc elsewhere: one multiply-add with its load folded in, whose lanes m
  // leaves out are not read (they cannot fault). Written out: in C++ the folded load would be an unmasked read past
  // the tensor's edges (undefined, and what AddressSanitizer instruments and a compiler that does not fold it does).
  static V FmaMasked(V w, const float* p, V acc, K m) {
    asm("vfmadd231ps %[x], %[w], %[acc]%{%[m]%}"
        : [acc] "+v"(acc)
        : [w] "v"(w), [x] "m"(*reinterpret_cast<const __m512_u*>(p)), [m] "Yk"(m));
    return acc;
  }
};

// 8-float vectors with AVX-512's mask registers and 32 vector registers, for the direct form on planes whose rows
// one 8-float vector holds (dispatch.h, NarrowPlaneKernels): the AVX2 tier's masked loads (vmaskmovps) cannot be
// folded into the multiply-adds, these can.
#include "cpu/pattern_conv_ymm.inc"

struct Ymm : YmmBasics {
  static constexpr int kDirectVectors = 24;
  using K = __mmask8;
  static K MaskRange(int lo, int hi) {
    return hi <= lo ? 0 : static_cast<K>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
  }
  static K MaskAnd(K a, K b) { return static_cast<K>(a & b); }
  static V LoadMasked(K m, const float* p) { return _mm256_maskz_loadu_ps(m, p); }
  static void StoreMasked(float* p, K m, V v) { _mm256_mask_storeu_ps(p, m, v); }
  static V FmaMasked(V w, const float* p, V acc, K m) {  // as Zmm's
    asm("vfmadd231ps %[x], %[w], %[acc]%{%[m]%}"
        : [acc] "+v"(acc)
        : [w] "v"(w), [x] "m"(*reinterpret_cast<const __m256_u*>(p)), [m] "Yk"(m));
    return acc;
  }
};

#include "cpu/pattern_conv_tiles.inc"

}  // namespace

KernelTable Table() {
  return {"avx512",         Zmm::L,          Zmm::kMaxVectors,           &SelectFilterTilesFor<Zmm>,
          &PackChannel<Zmm>, Zmm::kBlockPixels, &BlockStrip<Zmm>,          {},
          Zmm::kDirectVectors, &SelectDirectTilesFor<Zmm>, &DirectMasks<Zmm>};
}

KernelTable NarrowTable(KernelTable avx2) {
  avx2.direct_vectors = Ymm::kDirectVectors;
  avx2.select_direct = &SelectDirectTilesFor<Ymm>;
  avx2.direct_masks = &DirectMasks<Ymm>;
  return avx2;
}

}  // namespace avx512
}  // namespace cpu
}  // namespace ctprune

#pragma GCC diagnostic pop
#pragma GCC pop_options
