// SparseConv GPU kernels: the launch parameters and the per-thread steps (layout: sparse_conv_layout.h).
//
// Conv. A thread block of 256 threads takes one stored block position (`block` output channels that keep the same
// columns) and 256 consecutive output pixels (images x rows x columns flattened); each thread owns one pixel and
// `block` sums. The block's rows are walked in storage order (columns increasing: the input in memory order): per row,
// one input load (consecutive threads read consecutive columns: coalesced for stride 1), zero outside the image, and
// `block` fused multiply-adds with the row's weights, which every thread of the block reads alike (broadcast). Grid
// blocks are position-major within a pixel tile, so neighbouring blocks read the same input tile from L2.
//
// FC. A warp takes one (position, image): its lanes split the rows (lane l takes rows l, l + 32, ...), each keeping
// `block` partial sums, then add them in a fixed tree (offsets 16, 8, 4, 2, 1: deterministic), and lane 0 finishes.
//
// Both end in the same epilogue: + bias, + Z (a full Z has Y's layout), the clip (NaN-keeping compares, as Clip), the
// gate (c * HardSigmoid(c) or c * Sigmoid(c)). NaN and +-Inf: the sums see only kept weights, so a second pass
// (NonFiniteInput) looks at every input element and, for a NaN or +-Inf one, makes NaN of each output whose dense
// product would multiply it by a pruned zero (0 * Inf = NaN), as onnxruntime's dense op does.
//
// Plain C++ callable from host or device: sparse_conv_impl.cu composes the steps into the CUDA kernels,
// sparse_conv_emulate.cc runs them thread by thread on the CPU (how the indexing is tested without a GPU).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "cuda/sparse_conv_layout.h"

#ifdef __CUDACC__
#define CTS_HD __host__ __device__ __forceinline__
#define CTS_UNROLL _Pragma("unroll")
#else
#define CTS_HD inline
#define CTS_UNROLL
#endif

namespace ctprune {
namespace cuda {
namespace sparse {

constexpr int kThreads = 256;       // per thread block
constexpr int kWarpsPerBlock = kThreads / 32;

struct Params {
  const float* x;
  const float* w;        // (K, block)
  const float* b;        // (O) or null
  const float* z;        // null, one value (z_full 0) or Y's layout (z_full 1)
  int z_full;
  float* y;
  const int* rows;       // (K * 3): input channel or feature, dy, dx
  const int* row_begin;  // (NB + 1)
  const int* first;      // (NB)
  const int* channels;   // (NB)
  const int* group_of;   // (NB)
  const int* columns;    // (K): I
  int fc;
  int N, C, H, W, O, OH, OW;
  int block, num_blocks;
  int group_channels, kernel_h, kernel_w;
  int stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;
  int has_clamp;
  float activation_min, activation_max;
  int gate;  // 0 none, 1 c * HardSigmoid(c), 2 c * Sigmoid(c)
  float alpha, beta;
  long long pixels;      // N * OH * OW (Conv)
  long long pixel_tiles; // ceil(pixels / kThreads)
  long long x_size;      // N * C * H * W (Conv) or N * I (FC)
};

CTS_HD float LoadF(const float* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

CTS_HD int LoadI(const int* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

CTS_HD bool Finite(float v) {
#ifdef __CUDA_ARCH__
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

CTS_HD float Nan() {
#ifdef __CUDA_ARCH__
  return __int_as_float(0x7fc00000);
#else
  return std::numeric_limits<float>::quiet_NaN();
#endif
}

CTS_HD float Exp(float v) {
#ifdef __CUDA_ARCH__
  return expf(v);
#else
  return std::exp(v);
#endif
}

// + bias + Z, the clip (a NaN compares false and stays), the gate. `at`: the output's offset in Y (and in a full Z).
CTS_HD float Epilogue(const Params& p, float v, int o, long long at) {
  if (p.b) v += LoadF(p.b + o);
  if (p.z) v += LoadF(p.z + (p.z_full ? at : 0));
  if (p.has_clamp) {
    v = v < p.activation_min ? p.activation_min : v;
    v = v > p.activation_max ? p.activation_max : v;
  }
  if (p.gate == 1) {
    float h = p.alpha * v + p.beta;
    h = h < 0.0f ? 0.0f : (h > 1.0f ? 1.0f : h);
    v = v * h;
  } else if (p.gate == 2) {
    v = v / (1.0f + Exp(-v));  // -inf: -inf / inf = NaN, as -inf * Sigmoid(-inf) = -inf * 0
  }
  return v;
}

// Conv, one thread: output pixel `pixel` (flattened n, oy, ox) of the block at stored `position`.
template <int BLOCK>
CTS_HD void ConvPixel(const Params& p, int position, long long pixel) {
  if (pixel >= p.pixels) return;
  const long long plane = static_cast<long long>(p.OH) * p.OW;
  const int n = static_cast<int>(pixel / plane);
  const int rest = static_cast<int>(pixel % plane);
  const int oy = rest / p.OW, ox = rest % p.OW;
  const int iy0 = oy * p.stride_h - p.pad_top, ix0 = ox * p.stride_w - p.pad_left;
  const float* image = p.x + static_cast<long long>(n) * p.C * p.H * p.W;
  float acc[BLOCK];
CTS_UNROLL
  for (int b = 0; b < BLOCK; ++b) acc[b] = 0.0f;
  const int r1 = LoadI(p.row_begin + position + 1);
  for (int r = LoadI(p.row_begin + position); r < r1; ++r) {
    const int c = LoadI(p.rows + 3 * r), iy = iy0 + LoadI(p.rows + 3 * r + 1), ix = ix0 + LoadI(p.rows + 3 * r + 2);
    float v = 0.0f;  // a padded position: the dense product is weight * 0
    if (iy >= 0 && iy < p.H && ix >= 0 && ix < p.W)
      v = LoadF(image + (static_cast<long long>(c) * p.H + iy) * p.W + ix);
    const float* w = p.w + static_cast<long long>(r) * BLOCK;
CTS_UNROLL
    for (int b = 0; b < BLOCK; ++b) acc[b] = fmaf(LoadF(w + b), v, acc[b]);
  }
  const int first = LoadI(p.first + position), count = LoadI(p.channels + position);
CTS_UNROLL
  for (int b = 0; b < BLOCK; ++b) {
    if (b >= count) break;
    const long long at = (static_cast<long long>(n) * p.O + first + b) * plane + rest;
    p.y[at] = Epilogue(p, acc[b], first + b, at);
  }
}

// FC, one lane: its partial sums over rows lane, lane + 32, ... of `position` for image n.
template <int BLOCK>
CTS_HD void FcLane(const Params& p, int position, int n, int lane, float (&acc)[BLOCK]) {
CTS_UNROLL
  for (int b = 0; b < BLOCK; ++b) acc[b] = 0.0f;
  const float* x = p.x + static_cast<long long>(n) * p.C;
  const int r1 = LoadI(p.row_begin + position + 1);
  for (int r = LoadI(p.row_begin + position) + lane; r < r1; r += 32) {
    const float v = LoadF(x + LoadI(p.rows + 3 * r));
    const float* w = p.w + static_cast<long long>(r) * BLOCK;
CTS_UNROLL
    for (int b = 0; b < BLOCK; ++b) acc[b] = fmaf(LoadF(w + b), v, acc[b]);
  }
}

// FC, lane 0 after the reduction: the block's outputs for image n.
template <int BLOCK>
CTS_HD void FcFinish(const Params& p, int position, int n, const float (&acc)[BLOCK]) {
  const int first = LoadI(p.first + position), count = LoadI(p.channels + position);
CTS_UNROLL
  for (int b = 0; b < BLOCK; ++b) {
    if (b >= count) break;
    const long long at = static_cast<long long>(n) * p.O + first + b;
    p.y[at] = Epilogue(p, acc[b], first + b, at);
  }
}

// Whether stored `position` keeps `column` (its columns are strictly increasing).
CTS_HD bool Kept(const Params& p, int position, int column) {
  int lo = LoadI(p.row_begin + position), hi = LoadI(p.row_begin + position + 1);
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    const int c = LoadI(p.columns + mid);
    if (c == column) return true;
    if (c < column) lo = mid + 1;
    else hi = mid;
  }
  return false;
}

// The non-finite pass for input element `index` of X: if it is NaN or +-Inf, every output whose dense product meets it
// through a pruned weight becomes NaN (outputs meeting it through a kept weight already hold w * it). Several threads
// may write the same NaN: harmless.
CTS_HD void NonFiniteInput(const Params& p, long long index) {
  if (index >= p.x_size || Finite(LoadF(p.x + index))) return;
  const float nan = Nan();
  if (p.fc) {
    const int n = static_cast<int>(index / p.C), column = static_cast<int>(index % p.C);
    for (int position = 0; position < p.num_blocks; ++position) {
      if (Kept(p, position, column)) continue;
      const int first = LoadI(p.first + position), count = LoadI(p.channels + position);
      for (int b = 0; b < count; ++b) p.y[static_cast<long long>(n) * p.O + first + b] = nan;
    }
    return;
  }
  const long long image = static_cast<long long>(p.C) * p.H * p.W;
  const int n = static_cast<int>(index / image);
  const int c = static_cast<int>(index % image / (static_cast<long long>(p.H) * p.W));
  const int iy = static_cast<int>(index % (static_cast<long long>(p.H) * p.W) / p.W);
  const int ix = static_cast<int>(index % p.W);
  const int group = c / p.group_channels, local = c % p.group_channels;
  const long long plane = static_cast<long long>(p.OH) * p.OW;
  for (int ky = 0; ky < p.kernel_h; ++ky) {
    const int ty = iy + p.pad_top - ky * p.dilation_h;  // = oy * stride_h
    if (ty < 0 || ty % p.stride_h != 0 || ty / p.stride_h >= p.OH) continue;
    for (int kx = 0; kx < p.kernel_w; ++kx) {
      const int tx = ix + p.pad_left - kx * p.dilation_w;
      if (tx < 0 || tx % p.stride_w != 0 || tx / p.stride_w >= p.OW) continue;
      const int column = (local * p.kernel_h + ky) * p.kernel_w + kx;
      const long long pixel = static_cast<long long>(ty / p.stride_h) * p.OW + tx / p.stride_w;
      for (int position = 0; position < p.num_blocks; ++position) {
        if (LoadI(p.group_of + position) != group || Kept(p, position, column)) continue;
        const int first = LoadI(p.first + position), count = LoadI(p.channels + position);
        for (int b = 0; b < count; ++b) p.y[(static_cast<long long>(n) * p.O + first + b) * plane + pixel] = nan;
      }
    }
  }
}

// The launch parameters of one call; false when the shapes are out of the kernel's range (see the C ABI).
inline bool PlanSparse(Params& p, const PackedSparseConv& packed, long long n, long long c, long long h, long long w) {
  const ops::SparseConvSpec& s = packed.spec;
  if (n < 1 || n > (1 << 30)) return false;
  p.fc = s.fc ? 1 : 0;
  p.N = static_cast<int>(n);
  p.O = static_cast<int>(s.out_channels);
  p.block = static_cast<int>(s.block);
  p.num_blocks = packed.num_blocks;
  p.group_channels = static_cast<int>(s.group_channels);
  p.kernel_h = static_cast<int>(s.kernel_h);
  p.kernel_w = static_cast<int>(s.kernel_w);
  p.stride_h = static_cast<int>(s.stride_h);
  p.stride_w = static_cast<int>(s.stride_w);
  p.pad_top = static_cast<int>(s.pad_top);
  p.pad_left = static_cast<int>(s.pad_left);
  p.dilation_h = static_cast<int>(s.dilation_h);
  p.dilation_w = static_cast<int>(s.dilation_w);
  p.has_clamp = s.has_clamp() ? 1 : 0;
  p.activation_min = s.activation_min;
  p.activation_max = s.activation_max;
  p.gate = static_cast<int>(s.activation);
  p.alpha = s.activation_alpha;
  p.beta = s.activation_beta;
  if (s.fc) {
    if (c != s.group_channels || h != 1 || w != 1) return false;
    p.C = static_cast<int>(c);
    p.H = p.W = p.OH = p.OW = 1;
  } else {
    if (c != s.group * s.group_channels || h < 1 || w < 1 || h > (1 << 30) || w > (1 << 30)) return false;
    const long long hp = h + s.pad_top + s.pad_bottom, wp = w + s.pad_left + s.pad_right;
    const long long span_h = s.dilation_h * (s.kernel_h - 1) + 1, span_w = s.dilation_w * (s.kernel_w - 1) + 1;
    if (hp < span_h || wp < span_w) return false;
    p.C = static_cast<int>(c);
    p.H = static_cast<int>(h);
    p.W = static_cast<int>(w);
    p.OH = static_cast<int>((hp - span_h) / s.stride_h + 1);
    p.OW = static_cast<int>((wp - span_w) / s.stride_w + 1);
  }
  p.pixels = n * p.OH * p.OW;
  p.x_size = n * c * p.H * p.W;
  const double y_size = static_cast<double>(p.pixels) * p.O;
  if (y_size >= 9.0e18 || static_cast<double>(p.C) * p.H * p.W >= 2147483647.0) return false;
  p.pixel_tiles = (p.pixels + kThreads - 1) / kThreads;
  return true;
}

}  // namespace sparse
}  // namespace cuda
}  // namespace ctprune
