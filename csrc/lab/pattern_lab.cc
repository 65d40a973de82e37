// PatternConv kernel lab (issue 16): candidate inner-loop designs for a 3x3, stride 1, pad 1 pattern convolution,
// built by ctprune/lab/pattern_lab.py with g++ -O3 -mavx2 -mfma into a temporary shared object and called through
// ctypes. NOT part of the product library: nothing here is compiled by setup.py.
//
// Every design runs on a "block program": the filters are cut into blocks of N (after any reordering the driver
// chose), and block b is a list of taps, each an (input channel, tap 0..8) pair with N weights (one per filter of the
// block, 0 where a filter lacks that tap). For a block-structured layer (the N filters keep the same channels with
// the same patterns) every weight is useful; for a padded layout (design b) the zeros are wasted multiply-adds.
//
// Input layout (as in the product kernel, csrc/cpu/pattern_conv.h): each channel packed into a zero-padded plane whose
// rows are `flat_row` floats apart; output pixel p = y * flat_row + x reads tap (ky, kx) at p + ky * flat_row + kx.
//
// Designs (N filters per block):
//  kBcast8  (a, broadcast form): a tile of 12 pixels x 8 filters; per tap one aligned vector load of the 8 filters'
//           weights, then per pixel one scalar broadcast of the input feeding one FMA. Loads/FMA = 13/12.
//  kBcast16 (a, broadcast form): 6 pixels x 16 filters (two vectors); each broadcast feeds 2 FMAs. Loads/FMA = 8/12.
//  kVec4    (a, vector form): 24 flat pixels (3 vectors) x 4 filters; per tap 3 input vector loads (misaligned) and
//           4 weight broadcasts feeding 12 FMAs. Loads/FMA = 7/12.
//  kZBcast16 (a, broadcast form, AVX-512 where the CPU has it): 24 pixels x 16 filters (one zmm); the broadcast is
//           the FMA's embedded-broadcast memory operand. Loads/FMA = 25/24.
//  kShift4  (c, in-register shifts): 16 flat pixels (2 vectors) x 4 filters with flat_row a multiple of 8: per
//           (channel, kernel row) 3 aligned loads; the column taps kx = 1, 2 made with vperm2f128 + vpalignr and
//           shared by the 4 filters; per tap 4 weight broadcasts feeding 8 FMAs.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Geo {
  int C, H, W, OH, OW, flat_row, plane, total;  // total: OH * flat_row flat outputs (garbage columns included)
};

void Pack(const Geo& g, const float* x, float* packed, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int c = 0; c < g.C; ++c) {
    float* plane = packed + static_cast<size_t>(c) * g.plane;
    std::memset(plane, 0, sizeof(float) * g.plane);
    for (int iy = 0; iy < g.H; ++iy)
      std::memcpy(plane + (iy + 1) * g.flat_row + 1, x + (static_cast<size_t>(c) * g.H + iy) * g.W,
                  sizeof(float) * g.W);
  }
}

// Writes flat outputs [p0, p0 + count) of one filter from `src` (one float per flat output, `stride` apart).
inline void StoreFlat(const Geo& g, const float* src, int stride, int p0, int count, float* out) {
  int y = p0 / g.flat_row, x = p0 - y * g.flat_row;
  for (int i = 0; i < count; ++i) {
    if (y < g.OH && x < g.OW) out[y * g.OW + x] = src[i * stride];
    if (++x == g.flat_row) x = 0, ++y;
  }
}

// Writes a tile of P flat outputs x N filters, pixel-major (tile[i * N + n]), into the N filters' (OH, OW) outputs:
// the output offset of each flat position is worked out once for all N filters.
template <int P, int N>
inline void StorePixelMajor(const Geo& g, const float* tile, int p0, const int* filters, float* y) {
  int dst[P], valid = 0, src[P];
  int yy = p0 / g.flat_row, xx = p0 - yy * g.flat_row;
  for (int i = 0; i < P; ++i) {
    if (yy < g.OH && xx < g.OW) dst[valid] = yy * g.OW + xx, src[valid++] = i * N;
    if (++xx == g.flat_row) xx = 0, ++yy;
  }
  for (int n = 0; n < N; ++n) {
    float* out = y + static_cast<size_t>(filters[n]) * g.OH * g.OW;
    for (int i = 0; i < valid; ++i) out[dst[i]] = tile[src[i] + n];
  }
}

// The 8x8 transpose of rows r[0..7] (AVX2: 24 shuffles per 64 floats).
inline void Transpose8x8(__m256 (&r)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Writes flat outputs [p0, p1) of N filters from a pixel-major scratch (scratch[(p - p0) * N + n]) into the filters'
// (OH, OW) outputs: 8 flat positions at a time, 8x8 transposes into vectors of one filter's 8 positions, stored with
// at most 3 masked stores (the row pieces those 8 positions fall into; garbage columns and positions past p1 skipped).
template <int N>
void StoreChunkTransposed(const Geo& g, const float* scratch, int p0, int p1, const int* filters, float* y) {
  static_assert(N % 8 == 0, "blocks of 8 filters");
  const int lanes_idx[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  const __m256i lane = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes_idx));
  for (int q = p0; q < p1; q += 8) {
    // Pieces: lanes [lo, hi) go to output offset at + lane (at may be negative; only the masked lanes are written).
    int lo[3], hi[3], at[3], pieces = 0;
    int yy = q / g.flat_row, xx = q - yy * g.flat_row;
    for (int i = 0; i < 8 && q + i < p1 && yy < g.OH;) {
      if (xx >= g.OW) {  // garbage columns: skip to the next row
        i += g.flat_row - xx, xx = 0, ++yy;
        continue;
      }
      const int n = std::min({8 - i, g.OW - xx, p1 - q - i});
      lo[pieces] = i, hi[pieces] = i + n, at[pieces] = yy * g.OW + xx - i, ++pieces;
      i += n, xx += n;
      if (xx == g.flat_row) xx = 0, ++yy;
    }
    __m256i mask[3];
    bool full = pieces == 1 && lo[0] == 0 && hi[0] == 8;
    for (int k = 0; k < pieces; ++k)
      mask[k] = _mm256_and_si256(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(lo[k] - 1)),
                                 _mm256_cmpgt_epi32(_mm256_set1_epi32(hi[k]), lane));
    const float* src = scratch + static_cast<size_t>(q - p0) * N;
    for (int n0 = 0; n0 < N; n0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_load_ps(src + i * N + n0);
      Transpose8x8(r);
      for (int j = 0; j < 8; ++j) {
        float* out = y + static_cast<size_t>(filters[n0 + j]) * g.OH * g.OW;
        if (full) {
          _mm256_storeu_ps(out + at[0], r[j]);
        } else {
          for (int k = 0; k < pieces; ++k) _mm256_maskstore_ps(out + at[k], mask[k], r[j]);
        }
      }
    }
  }
}

struct Program {
  int nblocks, N;
  const int* filters;    // (nblocks * N) output channel of each filter position
  const int* tap_begin;  // (nblocks + 1)
  const int* channel;    // (T) input channel of each tap
  const int* tap;        // (T) 0..8, ascending within one channel
  const float* weights;  // (T, N)
};

// Work items: (tile chunk, block), chunk outer so every block of filters reuses one chunk's input rows from L2.
template <class F>
void ForItems(const Geo& g, const Program& p, int tile_pixels, int threads, F&& body) {
  const int tiles = (g.total + tile_pixels - 1) / tile_pixels;
  const long rows_per_chunk = std::max(1L, (256L * 1024 / 4) / (static_cast<long>(g.C) * g.flat_row) - 2);
  const int chunk = std::max(1, static_cast<int>(rows_per_chunk * g.flat_row / tile_pixels));
  const int chunks = (tiles + chunk - 1) / chunk;
  const int items = chunks * p.nblocks;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int item = 0; item < items; ++item) {
    const int b = item % p.nblocks, ch = item / p.nblocks;
    body(b, ch * chunk, std::min(tiles, (ch + 1) * chunk));
  }
}

std::vector<int> TapOffsets(const Geo& g, const Program& p) {
  const int T = p.tap_begin[p.nblocks];
  std::vector<int> off(T);
  for (int t = 0; t < T; ++t) off[t] = p.channel[t] * g.plane + (p.tap[t] / 3) * g.flat_row + p.tap[t] % 3;
  return off;
}

// Taps per pass over a run of tiles: the input rows and weights of one pass stay in L1 while every tile of the run
// uses them; the tiles' partial sums wait in a pixel-major scratch between passes.
constexpr int kTapChunk = 96;

template <int NV, int P>
void Bcast(const Geo& g, const Program& p, const float* packed, float* y, int threads) {
  constexpr int N = NV * 8;
  const std::vector<int> off = TapOffsets(g, p);
  ForItems(g, p, P, threads, [&](int b, int t0, int t1) {
    thread_local std::vector<float> scratch_buffer;
    if (scratch_buffer.size() < static_cast<size_t>((t1 - t0) * P + 8) * N + 16) scratch_buffer.resize(((t1 - t0) * P + 8) * N + 16);
    float* scratch = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch_buffer.data()) + 63) & ~uintptr_t(63));
    const int tb = p.tap_begin[b], te = p.tap_begin[b + 1];
    for (int c0 = tb; c0 < te || c0 == tb; c0 += kTapChunk) {
      const int c1 = std::min(te, c0 + kTapChunk);
      for (int tt = t0; tt < t1; ++tt) {
        float* tile = scratch + (tt - t0) * P * N;
        __m256 acc[P][NV];
        for (int i = 0; i < P; ++i)
          for (int v = 0; v < NV; ++v) acc[i][v] = c0 == tb ? _mm256_setzero_ps() : _mm256_load_ps(tile + i * N + v * 8);
        const float* base = packed + tt * P;
        for (int t = c0; t < c1; ++t) {
          const float* in = base + off[t];
          __m256 w[NV];
          for (int v = 0; v < NV; ++v) w[v] = _mm256_load_ps(p.weights + static_cast<size_t>(t) * N + v * 8);
#pragma GCC unroll 16
          for (int i = 0; i < P; ++i) {
            const __m256 x = _mm256_broadcast_ss(in + i);
            for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(x, w[v], acc[i][v]);
          }
        }
        for (int i = 0; i < P; ++i)
          for (int v = 0; v < NV; ++v) _mm256_store_ps(tile + i * N + v * 8, acc[i][v]);
      }
      if (c1 == te) break;
    }
    StoreChunkTransposed<N>(g, scratch, t0 * P, std::min(t1 * P, g.total), p.filters + b * N, y);
  });
}

template <int N, int M>
void Vec(const Geo& g, const Program& p, const float* packed, float* y, int threads) {
  const std::vector<int> off = TapOffsets(g, p);
  ForItems(g, p, M * 8, threads, [&](int b, int t0, int t1) {
    alignas(32) float tile[N][M * 8];
    const int tb = p.tap_begin[b], te = p.tap_begin[b + 1];
    for (int tt = t0; tt < t1; ++tt) {
      const int p0 = tt * M * 8;
      __m256 acc[N][M];
      for (int n = 0; n < N; ++n)
        for (int m = 0; m < M; ++m) acc[n][m] = _mm256_setzero_ps();
      const float* base = packed + p0;
      for (int t = tb; t < te; ++t) {
        const float* in = base + off[t];
        __m256 x[M];
        for (int m = 0; m < M; ++m) x[m] = _mm256_loadu_ps(in + 8 * m);
        const float* w = p.weights + static_cast<size_t>(t) * N;
        for (int n = 0; n < N; ++n) {
          const __m256 wn = _mm256_broadcast_ss(w + n);
          for (int m = 0; m < M; ++m) acc[n][m] = _mm256_fmadd_ps(wn, x[m], acc[n][m]);
        }
      }
      const int count = std::min(M * 8, g.total - p0);
      for (int n = 0; n < N; ++n) {
        for (int m = 0; m < M; ++m) _mm256_store_ps(tile[n] + 8 * m, acc[n][m]);
        StoreFlat(g, tile[n], 1, p0, count, y + static_cast<size_t>(p.filters[b * N + n]) * g.OH * g.OW);
      }
    }
  });
}

// Kernel rows of a block program: consecutive taps with the same (channel, ky).
struct Rows {
  std::vector<int> offset, mask, first_tap, begin;  // begin: (nblocks + 1) into the rows
};

Rows MakeRows(const Geo& g, const Program& p) {
  Rows r;
  for (int b = 0; b < p.nblocks; ++b) {
    r.begin.push_back(static_cast<int>(r.offset.size()));
    for (int t = p.tap_begin[b]; t < p.tap_begin[b + 1];) {
      const int c = p.channel[t], ky = p.tap[t] / 3;
      int mask = 0, u = t;
      for (; u < p.tap_begin[b + 1] && p.channel[u] == c && p.tap[u] / 3 == ky; ++u) mask |= 1 << (p.tap[u] % 3);
      r.offset.push_back(c * g.plane + ky * g.flat_row);
      r.mask.push_back(mask);
      r.first_tap.push_back(t);
      t = u;
    }
  }
  r.begin.push_back(static_cast<int>(r.offset.size()));
  return r;
}

template <int N, int M>
__attribute__((always_inline)) inline void ShiftTap(__m256 (&acc)[N][M], const __m256 (&s)[M], const float* w) {
  for (int n = 0; n < N; ++n) {
    const __m256 wn = _mm256_broadcast_ss(w + n);
    for (int m = 0; m < M; ++m) acc[n][m] = _mm256_fmadd_ps(wn, s[m], acc[n][m]);
  }
}

template <int N, int M>
void Shift(const Geo& g, const Program& p, const float* packed, float* y, int threads) {
  const Rows rows = MakeRows(g, p);
  ForItems(g, p, M * 8, threads, [&](int b, int t0, int t1) {
    alignas(32) float tile[N][M * 8];
    for (int tt = t0; tt < t1; ++tt) {
      const int p0 = tt * M * 8;
      __m256 acc[N][M];
      for (int n = 0; n < N; ++n)
        for (int m = 0; m < M; ++m) acc[n][m] = _mm256_setzero_ps();
      const float* base = packed + p0;
      for (int r = rows.begin[b]; r < rows.begin[b + 1]; ++r) {
        const float* in = base + rows.offset[r];
        const int mask = rows.mask[r];
        const float* w = p.weights + static_cast<size_t>(rows.first_tap[r]) * N;
        __m256 v[M + 1];
        for (int m = 0; m <= M; ++m) v[m] = _mm256_load_ps(in + 8 * m);  // 32-byte aligned: flat_row % 8 == 0
        if (mask & 1) {
          __m256 s[M];
          for (int m = 0; m < M; ++m) s[m] = v[m];
          ShiftTap<N, M>(acc, s, w);
          w += N;
        }
        if (mask & 6) {
          __m256 hi[M];  // [v[m] upper half, v[m + 1] lower half]
          for (int m = 0; m < M; ++m) hi[m] = _mm256_permute2f128_ps(v[m], v[m + 1], 0x21);
          if (mask & 2) {
            __m256 s[M];
            for (int m = 0; m < M; ++m)
              s[m] = _mm256_castsi256_ps(
                  _mm256_alignr_epi8(_mm256_castps_si256(hi[m]), _mm256_castps_si256(v[m]), 4));
            ShiftTap<N, M>(acc, s, w);
            w += N;
          }
          if (mask & 4) {
            __m256 s[M];
            for (int m = 0; m < M; ++m)
              s[m] = _mm256_castsi256_ps(
                  _mm256_alignr_epi8(_mm256_castps_si256(hi[m]), _mm256_castps_si256(v[m]), 8));
            ShiftTap<N, M>(acc, s, w);
          }
        }
      }
      const int count = std::min(M * 8, g.total - p0);
      for (int n = 0; n < N; ++n) {
        for (int m = 0; m < M; ++m) _mm256_store_ps(tile[n] + 8 * m, acc[n][m]);
        StoreFlat(g, tile[n], 1, p0, count, y + static_cast<size_t>(p.filters[b * N + n]) * g.OH * g.OW);
      }
    }
  });
}

// The AVX-512 broadcast kernel: compiled for that ISA by its attribute only; lab_run calls it only when the CPU has it.
template <int P>
__attribute__((target("avx512f"))) void ZBcast(const Geo& g, const Program& p, const float* packed, float* y,
                                               int threads) {
  constexpr int N = 16;
  const std::vector<int> off = TapOffsets(g, p);
  ForItems(g, p, P, threads, [&](int b, int t0, int t1) __attribute__((target("avx512f"))) {
    thread_local std::vector<float> scratch_buffer;
    if (scratch_buffer.size() < static_cast<size_t>((t1 - t0) * P + 8) * N + 16) scratch_buffer.resize(((t1 - t0) * P + 8) * N + 16);
    float* scratch = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch_buffer.data()) + 63) & ~uintptr_t(63));
    const int tb = p.tap_begin[b], te = p.tap_begin[b + 1];
    for (int c0 = tb; c0 < te || c0 == tb; c0 += kTapChunk) {
      const int c1 = std::min(te, c0 + kTapChunk);
      for (int tt = t0; tt < t1; ++tt) {
        float* tile = scratch + (tt - t0) * P * N;
        __m512 acc[P];
        for (int i = 0; i < P; ++i) acc[i] = c0 == tb ? _mm512_setzero_ps() : _mm512_load_ps(tile + i * N);
        const float* base = packed + tt * P;
        for (int t = c0; t < c1; ++t) {
          const float* in = base + off[t];
          const __m512 w = _mm512_load_ps(p.weights + static_cast<size_t>(t) * N);
#pragma GCC unroll 32
          for (int i = 0; i < P; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(in[i]), w, acc[i]);
        }
        for (int i = 0; i < P; ++i) _mm512_store_ps(tile + i * N, acc[i]);
      }
      if (c1 == te) break;
    }
    StoreChunkTransposed<N>(g, scratch, t0 * P, std::min(t1 * P, g.total), p.filters + b * N, y);
  });
}

Geo MakeGeo(int C, int H, int W, int flat_row) {
  Geo g{};
  g.C = C, g.H = H, g.W = W, g.OH = H, g.OW = W, g.flat_row = flat_row;
  g.total = g.OH * flat_row;
  // Reads reach the last tile's end (at most 32 flat positions past total) + 2 rows + 2 + one vector.
  const int reach = g.total + 32 + 2 * flat_row + 2 + 8;
  g.plane = (std::max((H + 2) * flat_row, reach) + 15) / 16 * 16;
  return g;
}

}  // namespace

extern "C" {

enum Design { kBcast8 = 0, kBcast16 = 1, kVec4 = 2, kShift4 = 3, kZBcast16 = 4 };

int lab_block_size(int design) {
  switch (design) {
    case kBcast8: return 8;
    case kBcast16: return 16;
    case kVec4: return 4;
    case kShift4: return 4;
    case kZBcast16: return 16;
  }
  return 0;
}

long lab_packed_floats(int C, int H, int W, int flat_row) {
  return static_cast<long>(C) * MakeGeo(C, H, W, flat_row).plane;
}

// Packs x (C, H, W) and computes y (O, H, W) with one design. Returns 0, or -1 for a bad design / geometry.
int lab_run(int design, int threads, int C, int H, int W, int flat_row, int nblocks, const int* filters,
            const int* tap_begin, const int* channel, const int* tap, const float* weights, const float* x,
            float* y, float* packed) {
  const Geo g = MakeGeo(C, H, W, flat_row);
  if (flat_row < W + 1 || (design == kShift4 && flat_row % 8 != 0)) return -1;
  if (reinterpret_cast<uintptr_t>(packed) % 64 != 0 || reinterpret_cast<uintptr_t>(weights) % 64 != 0) return -1;
  const Program p{nblocks, lab_block_size(design), filters, tap_begin, channel, tap, weights};
  Pack(g, x, packed, threads);
  switch (design) {
    case kBcast8: Bcast<1, 12>(g, p, packed, y, threads); return 0;
    case kBcast16: Bcast<2, 6>(g, p, packed, y, threads); return 0;
    case kVec4: Vec<4, 3>(g, p, packed, y, threads); return 0;
    case kShift4: Shift<4, 2>(g, p, packed, y, threads); return 0;
    case kZBcast16:
      if (!__builtin_cpu_supports("avx512f")) return -1;
      ZBcast<24>(g, p, packed, y, threads);
      return 0;
  }
  return -1;
}

}  // extern "C"
