// PatternConv GPU kernel: the launch parameters and the per-thread steps of one thread block (plan: pattern_conv_plan.h).
//
// Work split. A block of 256 threads (8 warps) computes FG = 8 * FT filters (consecutive slots of the packed layout,
// see pattern_conv_layout.h) for a tile of 32 * PX output pixels: `nimg` images x TR rows x TC columns. Warp w owns
// slots w, w + 8, ... (FT of them: similar work, as slots are sorted by kernel count); lane l owns the tile's pixels
// l, l + 32, ... (PX of them), so a warp walks one kernel list in lock step (uniform branches, broadcast loads of
// the compact weights) and its 32 lanes read neighbouring pixels: conflict-free shared memory, coalesced writes.
//
// Channel chunks. The input tile plus its 3x3 halo is staged in shared memory CC channels at a time, zero-filled
// outside the image, so the inner loop has no bounds checks. Each warp then advances its filters' channel-sorted
// kernel lists through the chunk: per kept kernel, one (meta, row) load, one float4 load of its 4 weights, and per
// pixel 4 shared loads and 4 FMAs at the pattern's tap offsets. The tap offsets (ky * row pitch + kx) of every
// pattern are resolved once per launch for the tile's row pitch and live in the kernel parameters (constant bank),
// so each pattern is a fixed 4-offset stencil with no per-tap index arithmetic.
//
// Everything here is plain C++ callable from host or device: pattern_conv_impl.cu composes the steps into the CUDA
// kernel with __syncthreads() between them; pattern_conv_emulate.cc runs the same steps block by block on the CPU,
// which is how the indexing is tested on machines without a GPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "cuda/pattern_conv_layout.h"

#ifdef __CUDACC__
#define CTP_HD __host__ __device__ __forceinline__
#define CTP_HD_COLD __host__ __device__ __noinline__  // a rare path kept out of the hot loop's registers
#define CTP_UNROLL _Pragma("unroll")
#else
#define CTP_HD inline
#define CTP_HD_COLD inline
#define CTP_UNROLL
#endif

namespace ctprune {
namespace cuda {

constexpr int kBlockThreads = 256;
constexpr int kWarps = kBlockThreads / 32;
constexpr int kSmemBudgetBytes = 32 * 1024;  // per block: leaves room for several blocks per SM

// Unsigned division by a divisor fixed per launch, as a multiply-high and a shift (for the staging loop's div/mods).
// Exact for every n < 2^31: with s = ceil(log2 d) and m = floor(2^32 * (2^s - d) / d) + 1, n / d = (umulhi(n, m) + n) >> s.
struct FastDivmod {
  uint32_t divisor = 1, multiplier = 1, shift = 0;
  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    shift = 0;
    while ((uint64_t{1} << shift) < d) ++shift;
    multiplier = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  CTP_HD uint32_t div(uint32_t n) const {
#ifdef __CUDA_ARCH__
    const uint32_t hi = __umulhi(n, multiplier);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * multiplier) >> 32);
#endif
    return (hi + n) >> shift;
  }
  CTP_HD void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = div(n);
    r = n - q * divisor;
  }
};

struct Quad {
  float x, y, z, w;
};

CTP_HD Quad load_quad(const float* p) {  // p is 16-byte aligned (W rows of 4 floats; onnxruntime aligns buffers)
#ifdef __CUDA_ARCH__
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  return Quad{v.x, v.y, v.z, v.w};
#else
  return Quad{p[0], p[1], p[2], p[3]};
#endif
}

CTP_HD int load_int(const int* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

CTP_HD float load_float(const float* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

CTP_HD float load_coherent(const float* p) {  // written by other blocks of this launch: skip L1
#ifdef __CUDA_ARCH__
  return __ldcg(p);
#else
  return *p;
#endif
}

// One launch's parameters, passed by value (__grid_constant__: read through the constant cache, never copied).
struct PatternConvParams {
  const float* x;
  const float* w;
  const float* b;  // may be null
  const float* z;  // the residual: null, one value (z_full 0) or Y's layout (z_full 1)
  int z_full;
  float* y;
  const int* entries;       // [K * 2]
  const int* filter_begin;  // [O + 1]
  const int* slot_filter;   // [O]
  int N, C, H, W, O, OH, OW;
  int stride_h, stride_w, pad_top, pad_left;
  int has_activation;
  float activation_min, activation_max;
  // Tile plan.
  int ft, px;               // filters and pixels per thread (the template instance)
  int nimg, TR, TC;         // tile: images x output rows x output columns
  int IR, IWs;              // staged rows and columns per image and channel: (TR - 1) * s + 3, (TC - 1) * s + 3
  int img_stride, chan_stride;  // IR * IWs, nimg * IR * IWs floats
  int CC;                   // channels per staged chunk
  int filter_groups;        // ceil(O / (8 * ft))
  int tiles_w, tiles_per_group;  // ceil(OW / TC), ceil(OH / TR) * tiles_w
  long long blocks;         // filter_groups * tiles * splits
  // Split over input channels (small grids, e.g. batch 1 with 512 channels): split s of `splits` blocks per output
  // tile takes channels [s * split_channels, (s + 1) * split_channels), stores its partial sums, and the block that
  // arrives last (a ticket per output tile) adds them up in split order (deterministic), then the epilogue.
  int splits, split_channels;
  long long y_size;         // N * O * OH * OW
  float* partial;           // [splits][y_size] (splits > 1)
  int* tickets;             // [filter_groups * tiles], zero between launches (splits > 1)
  FastDivmod div_iws, div_ir, div_nimg;
  int tap_offset[kMaxPatterns * 4];  // ky * IWs + kx for each pattern's taps
};

// Which tile and filter group a block computes.
struct BlockCoord {
  int filter_group, n0, oy0, ox0;
  int split, c_begin, c_end;  // input channels of this block's split
  long long ticket;           // index of this block's output tile in p.tickets
};

CTP_HD BlockCoord DecodeBlock(const PatternConvParams& p, long long block) {
  BlockCoord bc;
  bc.filter_group = static_cast<int>(block % p.filter_groups);  // neighbouring blocks share the input tile (L2)
  const long long rest = block / p.filter_groups;
  bc.split = static_cast<int>(rest % p.splits);
  const long long tile = rest / p.splits;
  bc.ticket = tile * p.filter_groups + bc.filter_group;
  bc.c_begin = bc.split * p.split_channels;
  bc.c_end = bc.c_begin + p.split_channels < p.C ? bc.c_begin + p.split_channels : p.C;
  const int in_group = static_cast<int>(tile % p.tiles_per_group);
  bc.n0 = static_cast<int>(tile / p.tiles_per_group) * p.nimg;
  bc.oy0 = (in_group / p.tiles_w) * p.TR;
  bc.ox0 = (in_group % p.tiles_w) * p.TC;
  return bc;
}

template <int FT, int PX>
struct ThreadState {
  int next[FT], end[FT], filter[FT];  // kernel-list cursor, end and output channel (-1: no filter) per owned slot
  int pixel_smem[PX];                 // offset of each owned pixel's top-left tap in a channel's staged tile
  long long pixel_out[PX];            // offset of each owned pixel in Y for filter 0, or -1 outside the output
  static constexpr int kSplit = FT * PX <= 4 ? 2 : 1;  // accumulator sets (summed at the end)
  float acc[kSplit][FT][PX];
};

template <int FT, int PX>
CTP_HD void InitThread(ThreadState<FT, PX>& st, const PatternConvParams& p, const BlockCoord& bc, int tid) {
  const int warp = tid / 32, lane = tid % 32;
CTP_UNROLL
  for (int i = 0; i < FT; ++i) {
    const int slot = bc.filter_group * (kWarps * FT) + warp + kWarps * i;
    if (slot < p.O) {
      st.filter[i] = load_int(p.slot_filter + slot);
      int lo = load_int(p.filter_begin + slot), hi = load_int(p.filter_begin + slot + 1);
      st.end[i] = hi;
      while (bc.c_begin > 0 && lo < hi) {  // first kernel on a channel >= c_begin (lists are channel-sorted)
        const int mid = (lo + hi) / 2;
        if ((load_int(p.entries + 2 * mid) >> 8) < bc.c_begin) lo = mid + 1;
        else hi = mid;
      }
      st.next[i] = lo;
    } else {
      st.filter[i] = -1;
      st.next[i] = st.end[i] = 0;
    }
CTP_UNROLL
    for (int j = 0; j < PX; ++j) {
      st.acc[0][i][j] = 0.0f;
      st.acc[ThreadState<FT, PX>::kSplit - 1][i][j] = 0.0f;
    }
  }
  const int tile_pixels = p.TR * p.TC;
  const long long out_plane = static_cast<long long>(p.OH) * p.OW;
CTP_UNROLL
  for (int j = 0; j < PX; ++j) {
    const int q = lane + 32 * j;
    st.pixel_smem[j] = 0;
    st.pixel_out[j] = -1;
    if (q < p.nimg * tile_pixels) {
      const int img = q / tile_pixels, r = (q % tile_pixels) / p.TC, col = q % p.TC;
      const int n = bc.n0 + img, oy = bc.oy0 + r, ox = bc.ox0 + col;
      if (n < p.N && oy < p.OH && ox < p.OW) {
        st.pixel_smem[j] = img * p.img_stride + r * p.stride_h * p.IWs + col * p.stride_w;
        st.pixel_out[j] = static_cast<long long>(n) * p.O * out_plane + static_cast<long long>(oy) * p.OW + ox;
      }
    }
  }
}

CTP_HD float QuietNaN() {
#ifdef __CUDA_ARCH__
  return __int_as_float(0x7fc00000);
#else
  return std::numeric_limits<float>::quiet_NaN();
#endif
}

CTP_HD bool IsFinite(float v) {
#ifdef __CUDA_ARCH__
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

// Stages channels [c0, c0 + count) of the block's input tile (with halo, zeros outside the image) into smem,
// laid out [channel][image][row][column]; thread tid of nthreads copies every nthreads-th element. Returns whether
// this thread staged a NaN or +-Inf (then the block runs NonFiniteOutputs).
CTP_HD bool StageChunk(const PatternConvParams& p, const BlockCoord& bc, int c0, int count, int tid, int nthreads,
                       float* smem) {
  const int total = count * p.chan_stride;
  const int iy0 = bc.oy0 * p.stride_h - p.pad_top, ix0 = bc.ox0 * p.stride_w - p.pad_left;
  bool non_finite = false;
  for (int e = tid; e < total; e += nthreads) {
    uint32_t t, col, t2, row, c, img;
    p.div_iws.divmod(static_cast<uint32_t>(e), t, col);
    p.div_ir.divmod(t, t2, row);
    p.div_nimg.divmod(t2, c, img);
    const int n = bc.n0 + static_cast<int>(img), iy = iy0 + static_cast<int>(row), ix = ix0 + static_cast<int>(col);
    float v = 0.0f;
    if (n < p.N && iy >= 0 && iy < p.H && ix >= 0 && ix < p.W)
      v = load_float(p.x + ((static_cast<long long>(n) * p.C + c0 + static_cast<int>(c)) * p.H + iy) * p.W + ix);
    non_finite |= !IsFinite(v);
    smem[e] = v;
  }
  return non_finite;
}

// Applies every owned filter's kernels on channels [c0, c1) (all staged in smem) to the owned pixels. The kernel
// list is software-pipelined: entry k + 2's (meta, row) and entry k + 1's weights are in flight while entry k
// computes, so a warp does not wait on two dependent loads per kernel (matters at batch 1, where few warps run).
// Loads past the chunk's last entry are harmless (the list continues or a sentinel ends it) and are redone later.
template <int FT, int PX>
CTP_HD void ComputeChunk(ThreadState<FT, PX>& st, const PatternConvParams& p, int c0, int c1, const float* smem) {
  constexpr int kSentinel = 0x7fffffff;  // channel 2^23 - 1 >= any c1
  constexpr int S = ThreadState<FT, PX>::kSplit;
CTP_UNROLL
  for (int i = 0; i < FT; ++i) {
    int k = st.next[i];
    const int end = st.end[i];
    if (k >= end) continue;
    int meta = load_int(p.entries + 2 * k);
    Quad w = load_quad(p.w + 4 * static_cast<long long>(load_int(p.entries + 2 * k + 1)));
    int next_meta = kSentinel, next_row = 0;
    if (k + 1 < end) {
      next_meta = load_int(p.entries + 2 * k + 2);
      next_row = load_int(p.entries + 2 * k + 3);
    }
    while ((meta >> 8) < c1) {  // lists are channel-sorted: the rest belongs to later chunks
      Quad next_w = Quad{0.0f, 0.0f, 0.0f, 0.0f};
      if (k + 1 < end) next_w = load_quad(p.w + 4 * static_cast<long long>(next_row));
      int after_meta = kSentinel, after_row = 0;
      if (k + 2 < end) {
        after_meta = load_int(p.entries + 2 * k + 4);
        after_row = load_int(p.entries + 2 * k + 5);
      }
      const int pattern = meta & 0xff;
      const float* s = smem + ((meta >> 8) - c0) * p.chan_stride;
      const int o0 = p.tap_offset[4 * pattern], o1 = p.tap_offset[4 * pattern + 1];
      const int o2 = p.tap_offset[4 * pattern + 2], o3 = p.tap_offset[4 * pattern + 3];
CTP_UNROLL
      for (int j = 0; j < PX; ++j) {
        const float* sp = s + st.pixel_smem[j];
        // Two accumulators per output when a thread owns few outputs: shorter FMA chains (latency, accuracy).
        st.acc[0][i][j] = fmaf(w.y, sp[o1], fmaf(w.x, sp[o0], st.acc[0][i][j]));
        st.acc[S - 1][i][j] = fmaf(w.w, sp[o3], fmaf(w.z, sp[o2], st.acc[S - 1][i][j]));
      }
      ++k;
      meta = next_meta;
      w = next_w;
      next_meta = after_meta;
      next_row = after_row;
    }
    st.next[i] = k;
  }
}

// NaN and +-Inf the ONNX way: a dense Conv multiplies every input of a window by its weight, the pruned taps' zeros
// included, so a NaN or +-Inf input makes NaN of every output whose window holds it at a tap the output's filter does
// not keep (0 * Inf = NaN); the kernel reads kept taps only. Returns the bit i * PX + j set for each owned output
// (filter slot i, pixel slot j) that a non-finite input of this block's channels [c_begin, c_end) reaches that way; the
// caller makes its sum NaN, which the epilogue (and a split's reduction) keeps. Called only by blocks whose staging met
// such a value (a model fed a broken image): it rereads the window from global memory, slow and simple. Kept taps
// need nothing: the sum already holds w * Inf (or 0 * Inf = NaN).
template <int FT, int PX>
CTP_HD_COLD uint32_t NonFiniteOutputs(const PatternConvParams& p, const BlockCoord bc, int tid) {
  const int warp = tid / 32, lane = tid % 32;
  const int tile_pixels = p.TR * p.TC;
  uint32_t marked = 0;
  for (int i = 0; i < FT; ++i) {
    const int slot = bc.filter_group * (kWarps * FT) + warp + kWarps * i;
    if (slot >= p.O) continue;
    const int first = load_int(p.filter_begin + slot), last = load_int(p.filter_begin + slot + 1);
    for (int j = 0; j < PX; ++j) {
      const int q = lane + 32 * j;
      if (q >= p.nimg * tile_pixels) continue;
      const int n = bc.n0 + q / tile_pixels, oy = bc.oy0 + (q % tile_pixels) / p.TC, ox = bc.ox0 + q % p.TC;
      if (n >= p.N || oy >= p.OH || ox >= p.OW) continue;
      int k = first;  // the filter's kernels are channel-sorted: walk them beside c
      for (int c = bc.c_begin; c < bc.c_end && !((marked >> (i * PX + j)) & 1); ++c) {
        while (k < last && (load_int(p.entries + 2 * k) >> 8) < c) ++k;
        int kept = 0;  // tap mask of the filter's kernel on channel c (0: no kernel there)
        if (k < last && (load_int(p.entries + 2 * k) >> 8) == c) {
          const int pattern = load_int(p.entries + 2 * k) & 0xff;
          for (int t = 0; t < 4; ++t) {  // tap_offset = ky * IWs + kx, kx <= 2 < IWs
            const int offset = p.tap_offset[4 * pattern + t];
            kept |= 1 << ((offset / p.IWs) * 3 + offset % p.IWs);
          }
        }
        const float* plane = p.x + (static_cast<long long>(n) * p.C + c) * p.H * p.W;
        for (int tap = 0; tap < 9; ++tap) {
          const int iy = oy * p.stride_h - p.pad_top + tap / 3, ix = ox * p.stride_w - p.pad_left + tap % 3;
          if (((kept >> tap) & 1) || iy < 0 || iy >= p.H || ix < 0 || ix >= p.W) continue;
          if (!IsFinite(load_float(plane + static_cast<long long>(iy) * p.W + ix))) {
            marked |= 1u << (i * PX + j);
            break;
          }
        }
      }
    }
  }
  return marked;
}

template <int FT, int PX>
CTP_HD void MarkNonFinite(ThreadState<FT, PX>& st, uint32_t marked) {
  const float nan = QuietNaN();
CTP_UNROLL
  for (int i = 0; i < FT; ++i) {
CTP_UNROLL
    for (int j = 0; j < PX; ++j) {
      if ((marked >> (i * PX + j)) & 1) st.acc[0][i][j] = nan;
    }
  }
}

// Bias, residual, activation (clamp that keeps NaN, like Clip). `at` is the output's offset in Y, and a full Z has
// Y's layout, so it indexes Z too.
CTP_HD float Epilogue(const PatternConvParams& p, float v, float bias, long long at) {
  v += bias;
  if (p.z) v += load_float(p.z + (p.z_full ? at : 0));
  if (p.has_activation) {
    v = v < p.activation_min ? p.activation_min : v;
    v = v > p.activation_max ? p.activation_max : v;
  }
  return v;
}

template <int FT, int PX>
CTP_HD float Total(const ThreadState<FT, PX>& st, int i, int j) {
  float v = st.acc[0][i][j];
  if (ThreadState<FT, PX>::kSplit > 1) v += st.acc[ThreadState<FT, PX>::kSplit - 1][i][j];
  return v;
}

// Calls f(i, j, at, bias) for every output element this thread owns: filter slot i, pixel slot j, `at` its offset in
// Y, `bias` its filter's bias (0 without B). The three ways a thread ends (below) differ only in what f stores.
template <int FT, int PX, class F>
CTP_HD void ForEachOutput(const ThreadState<FT, PX>& st, const PatternConvParams& p, F f) {
  const long long out_plane = static_cast<long long>(p.OH) * p.OW;
CTP_UNROLL
  for (int i = 0; i < FT; ++i) {
    if (st.filter[i] < 0) continue;
    const float bias = p.b ? load_float(p.b + st.filter[i]) : 0.0f;
CTP_UNROLL
    for (int j = 0; j < PX; ++j) {
      if (st.pixel_out[j] >= 0) f(i, j, st.pixel_out[j] + st.filter[i] * out_plane, bias);
    }
  }
}

// splits == 1: the finished outputs.
template <int FT, int PX>
CTP_HD void FinishThread(const ThreadState<FT, PX>& st, const PatternConvParams& p) {
  ForEachOutput(st, p, [&](int i, int j, long long at, float bias) {
    p.y[at] = Epilogue(p, Total(st, i, j), bias, at);
  });
}

// splits > 1, every block: its partial sums, laid out like Y in the split's slice of p.partial.
template <int FT, int PX>
CTP_HD void StorePartial(const ThreadState<FT, PX>& st, const PatternConvParams& p, int split) {
  float* slice = p.partial + split * p.y_size;
  ForEachOutput(st, p, [&](int i, int j, long long at, float) { slice[at] = Total(st, i, j); });
}

// splits > 1, the tile's last block: sums every split's partial (in split order), then the epilogue, store.
template <int FT, int PX>
CTP_HD void ReducePartials(const ThreadState<FT, PX>& st, const PatternConvParams& p) {
  ForEachOutput(st, p, [&](int, int, long long at, float bias) {
    float v = 0.0f;
    for (int s = 0; s < p.splits; ++s) v += load_coherent(p.partial + s * p.y_size + at);
    p.y[at] = Epilogue(p, v, bias, at);
  });
}

}  // namespace cuda
}  // namespace ctprune
