// Portable tier of the PatternConv tile kernel: the same tile code as the SIMD tiers over a plain array of lanes, which
// the compiler vectorises with whatever the baseline target allows. Also instantiated at 16 lanes and 24-vector tiles
// so the tests can check the AVX-512 tiling logic (filter blocks of 24-pixel tiles included) on machines without
// AVX-512.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu/dispatch.h"
#include "cpu/pattern_conv.h"

namespace ctprune {
namespace cpu {
namespace generic {
namespace {

// kPixels: flat positions per filter-block tile, as the SIMD tier of the same width has.
template <int N, int kTileVectors, int kPixels>
struct Lanes {
  struct V {
    float v[N];
  };
  static constexpr int L = N;
  static constexpr int kMaxVectors = kTileVectors;
  static V Set1(float x) {
    V r;
    for (int i = 0; i < N; ++i) r.v[i] = x;
    return r;
  }
  static V Broadcast(const float* p) { return Set1(*p); }
  static V Load(const float* p) {
    V r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static V Fma(V a, V b, V c) {
    for (int i = 0; i < N; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static V Add(V a, V b) {
    for (int i = 0; i < N; ++i) a.v[i] += b.v[i];
    return a;
  }
  static V Mul(V a, V b) {
    for (int i = 0; i < N; ++i) a.v[i] *= b.v[i];
    return a;
  }
  static V Or(V a, V b) {
    for (int i = 0; i < N; ++i) {
      uint32_t x, y;
      std::memcpy(&x, &a.v[i], 4);
      std::memcpy(&y, &b.v[i], 4);
      x |= y;
      std::memcpy(&a.v[i], &x, 4);
    }
    return a;
  }
  // a > b ? a : b, like maxps: b when either is NaN (the clamp relies on it).
  static V Max(V a, V b) {
    for (int i = 0; i < N; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return a;
  }
  // a < b ? a : b, like minps.
  static V Min(V a, V b) {
    for (int i = 0; i < N; ++i) a.v[i] = a.v[i] < b.v[i] ? a.v[i] : b.v[i];
    return a;
  }
  static void Store(float* p, V v) { std::memcpy(p, v.v, sizeof(v.v)); }
  static void StoreU(float* p, V v) { std::memcpy(p, v.v, sizeof(v.v)); }
  static V Evens(const float* p) {
    V r;
    for (int i = 0; i < N; ++i) r.v[i] = p[2 * i];
    return r;
  }
  static V EvensFirst(const float* p, int n) {
    V r = Set1(0.0f);
    for (int i = 0; i < n; ++i) r.v[i] = p[2 * i];
    return r;
  }
  static void StoreFirst(float* p, V v, int n) { std::memcpy(p, v.v, sizeof(float) * static_cast<size_t>(n)); }
  static V KeepFirst(V v, int n) {
    for (int i = n; i < N; ++i) v.v[i] = 0.0f;
    return v;
  }
  static constexpr bool kSlowMaskedMemory = true;  // as the AVX2 tier, whose packing this tier checks

  static constexpr int kBlockPixels = kPixels;
  struct Index {
    int32_t i[N];
  };
  static Index LoadIndex(const int32_t* p) {
    Index r;
    std::memcpy(r.i, p, sizeof(r.i));
    return r;
  }
  static V Permute(V v, Index i) {
    V r;
    for (int k = 0; k < N; ++k) r.v[k] = v.v[i.i[k]];
    return r;
  }
  static void Columns(const float* src, int stride, V (&r)[N]) {
    for (int j = 0; j < N; ++j) {
      for (int i = 0; i < N; ++i) r[j].v[i] = src[i * stride + j];
    }
  }
};

#include "cpu/pattern_conv_tiles.inc"

}  // namespace

KernelTable Table() {
  using T = Lanes<8, 8, 6>;
  return {"generic", T::L, T::kMaxVectors, &SelectFilterTilesFor<T>, &PackChannel<T>, T::kBlockPixels,
          &BlockStrip<T>, {}};
}

KernelTable Table16() {
  using T = Lanes<16, 24, 24>;
  return {"generic16", T::L, T::kMaxVectors, &SelectFilterTilesFor<T>, &PackChannel<T>, T::kBlockPixels,
          &BlockStrip<T>, {}};
}

}  // namespace generic
}  // namespace cpu
}  // namespace ctprune
