// Portable tier of the PatternConv tile kernel: the same register-tile code as the SIMD tiers over a plain array of
// lanes, which the compiler vectorises with whatever the baseline target allows. Also instantiated at 16 lanes so the
// tests can check the AVX-512 tiling logic on machines without AVX-512.
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

template <int N>
struct Lanes {
  struct V {
    float v[N];
  };
  static constexpr int L = N;
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
  static V LoadFirst(const float* p, int n) {
    V r = Set1(0.0f);
    std::memcpy(r.v, p, sizeof(float) * n);
    return r;
  }
  static V Fma(V a, V b, V c) {
    for (int i = 0; i < N; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static V Max(V a, V b) {
    for (int i = 0; i < N; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return a;
  }
  static V Min(V a, V b) {
    for (int i = 0; i < N; ++i) a.v[i] = a.v[i] < b.v[i] ? a.v[i] : b.v[i];
    return a;
  }
  static void Pin(V&) {}
  static void Store(float* p, V v) { std::memcpy(p, v.v, sizeof(v.v)); }
  static void StoreFirst(float* p, V v, int n) { std::memcpy(p, v.v, sizeof(float) * n); }
};

#include "cpu/pattern_conv_tiles.inc"

}  // namespace

FilterTilesFn SelectFilterTiles(int rows_per_tile, int stride, int /*out_width*/) {
  return SelectFilterTilesFor<Lanes<8>>(rows_per_tile, stride);
}

FilterTilesFn SelectFilterTiles16(int rows_per_tile, int stride, int /*out_width*/) {
  return SelectFilterTilesFor<Lanes<16>>(rows_per_tile, stride);
}

}  // namespace generic
}  // namespace cpu
}  // namespace ctprune
