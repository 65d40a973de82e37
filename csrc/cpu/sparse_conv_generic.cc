// Portable tier of the SparseConv kernels (sparse_conv_kernels.inc) over a plain array of lanes, which the compiler
// vectorises with whatever the baseline target allows; also at 16 lanes with the AVX-512 tile sizes (generic16), so
// the tests can run the AVX-512 tiling on any machine. The 16-lane table is built from this file by
// sparse_conv_generic16.cc, a translation unit of its own: each instantiation of every tile shape takes GCC about a
// minute at -O3, and two files compile in parallel.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu/sparse_conv.h"

namespace ctprune {
namespace cpu {
namespace generic {
namespace {

template <int N, int T1, int T2, int T4, int T8>
struct Lanes {
  struct V {
    float v[N];
  };
  static constexpr int L = N;
  static constexpr int kTileVectors[4] = {T1, T2, T4, T8};
  static constexpr bool kSplitBlock8 = false;
  static constexpr int kPrefetchRows = 0;
  static V Set1(float x) {
    V r;
    for (int i = 0; i < N; ++i) r.v[i] = x;
    return r;
  }
  static V Zero() { return Set1(0.0f); }
  static V Broadcast(const float* p) { return Set1(*p); }
  static V Load(const float* p) {
    V r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static void StoreU(float* p, V v) { std::memcpy(p, v.v, sizeof(v.v)); }
  static void Stream(float* p, V v) { StoreU(p, v); }
  static void Fence() {}
  struct M {  // lanes lo .. n - 1
    int n;
    int lo;
  };
  static M Mask(int n) { return M{n, 0}; }
  static M MaskRange(int lo, int hi) { return M{hi, lo}; }
  static V MaskLoad(const float* p, M m) {
    V r = Zero();
    if (m.n > m.lo) std::memcpy(r.v + m.lo, p + m.lo, sizeof(float) * static_cast<size_t>(m.n - m.lo));
    return r;
  }
  static void StoreFirst(float* p, V v, int n) { std::memcpy(p, v.v, sizeof(float) * static_cast<size_t>(n)); }
  static void Deinterleave(const float* p, V& even, V& odd) {
    for (int i = 0; i < N; ++i) {
      even.v[i] = p[2 * i];
      odd.v[i] = p[2 * i + 1];
    }
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
  static V Div(V a, V b) {
    for (int i = 0; i < N; ++i) a.v[i] /= b.v[i];
    return a;
  }
  static V Max(V a, V b) {  // b when either is NaN, as x86 maxps
    for (int i = 0; i < N; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return a;
  }
  static V Min(V a, V b) {
    for (int i = 0; i < N; ++i) a.v[i] = a.v[i] < b.v[i] ? a.v[i] : b.v[i];
    return a;
  }
  static V Round(V a) {
    for (int i = 0; i < N; ++i) a.v[i] = std::nearbyint(a.v[i]);
    return a;
  }
  static V Pow2(V n) {
    for (int i = 0; i < N; ++i) n.v[i] = std::ldexp(1.0f, static_cast<int>(n.v[i]));
    return n;
  }
  template <int B, class Idx>
  static V Expand(const float* x, const Idx* cols) {
    V r;
    for (int i = 0; i < N; ++i) r.v[i] = x[cols[i / B]];
    return r;
  }
};

#include "cpu/sparse_conv_kernels.inc"

}  // namespace

#ifndef CTPRUNE_SPARSE_GENERIC16
SparseKernels SparseTable() { return SparseKernelsFor<Lanes<8, 6, 4, 2, 1>>(); }
#else
SparseKernels SparseTable16() { return SparseKernelsFor<Lanes<16, 8, 8, 6, 3>>(); }
#endif

}  // namespace generic
}  // namespace cpu
}  // namespace ctprune
