// PatternConv GPU kernel: the launch plan (host only). Picks the template instance (filters and pixels per thread),
// the tile, the channel chunk and the channel splits for one input shape; see pattern_conv_impl.cuh for the kernel.
#pragma once

#include "cuda/pattern_conv_impl.cuh"

namespace ctprune {
namespace cuda {

// Chooses the tile for one template instance (ft, px); fills the plan fields of p. Returns false if it cannot fit.
inline bool PlanTile(PatternConvParams& p, int ft, int px, const PackedPatternConv& packed) {
  const int npt = 32 * px;  // pixel slots per block
  const long long plane = static_cast<long long>(p.OH) * p.OW;
  int nimg = 1, TR, TC;
  if (plane <= npt) {
    TR = p.OH;
    TC = p.OW;
    nimg = static_cast<int>(npt / plane);
    if (nimg > p.N) nimg = p.N;
  } else if (p.OW <= npt) {
    TC = p.OW;
    TR = npt / p.OW;
    const int row_tiles = (p.OH + TR - 1) / TR;
    TR = (p.OH + row_tiles - 1) / row_tiles;  // same tile count, rows spread evenly
  } else {
    TR = 1;
    const int col_tiles = (p.OW + npt - 1) / npt;
    TC = (p.OW + col_tiles - 1) / col_tiles;  // e.g. 56 columns as 2 x 28, not 32 + 24
  }
  // Large strides make the halo big: shrink the tile until one channel fits the budget.
  for (;;) {
    const long long ir = static_cast<long long>(TR - 1) * p.stride_h + 3, iws = static_cast<long long>(TC - 1) * p.stride_w + 3;
    if (nimg * ir * iws * 4 <= kSmemBudgetBytes) {
      p.IR = static_cast<int>(ir);
      p.IWs = static_cast<int>(iws);
      break;
    }
    if (nimg > 1) nimg /= 2;
    else if (TR > 1) TR /= 2;
    else if (TC > 1) TC /= 2;
    else return false;
  }
  p.ft = ft;
  p.px = px;
  p.nimg = nimg;
  p.TR = TR;
  p.TC = TC;
  p.img_stride = p.IR * p.IWs;
  p.chan_stride = nimg * p.img_stride;
  p.CC = kSmemBudgetBytes / (p.chan_stride * 4);
  if (p.CC > p.C) p.CC = p.C;
  p.filter_groups = (p.O + kWarps * ft - 1) / (kWarps * ft);
  p.tiles_w = (p.OW + TC - 1) / TC;
  p.tiles_per_group = ((p.OH + TR - 1) / TR) * p.tiles_w;
  const long long image_groups = (p.N + nimg - 1) / nimg;
  p.blocks = static_cast<long long>(p.filter_groups) * image_groups * p.tiles_per_group;
  p.splits = 1;
  p.split_channels = p.C;
  p.div_iws = FastDivmod(static_cast<uint32_t>(p.IWs));
  p.div_ir = FastDivmod(static_cast<uint32_t>(p.IR));
  p.div_nimg = FastDivmod(static_cast<uint32_t>(nimg));
  for (int i = 0; i < packed.num_patterns * 4; ++i) {
    const int tap = packed.taps[i];
    p.tap_offset[i] = (tap / 3) * p.IWs + tap % 3;
  }
  return true;
}

// Fills everything but the tile; returns false when the output would be empty or sizes overflow the kernel's ints.
inline bool PlanShape(PatternConvParams& p, const PackedPatternConv& packed, long long n, long long h, long long w) {
  if (n < 1 || h < 1 || w < 1) return false;
  const long long oh = (h + packed.pad_top + packed.pad_bottom - 3) / packed.stride_h + 1;
  const long long ow = (w + packed.pad_left + packed.pad_right - 3) / packed.stride_w + 1;
  if (h + packed.pad_top + packed.pad_bottom < 3 || w + packed.pad_left + packed.pad_right < 3) return false;
  if (oh < 1 || ow < 1 || n > (1 << 30) || h > (1 << 30) || w > (1 << 30) || oh * ow > (1 << 30)) return false;
  p.N = static_cast<int>(n);
  p.C = packed.in_channels;
  p.H = static_cast<int>(h);
  p.W = static_cast<int>(w);
  p.O = packed.out_channels;
  p.OH = static_cast<int>(oh);
  p.OW = static_cast<int>(ow);
  p.stride_h = packed.stride_h;
  p.stride_w = packed.stride_w;
  p.pad_top = packed.pad_top;
  p.pad_left = packed.pad_left;
  p.has_activation = packed.has_activation ? 1 : 0;
  p.activation_min = packed.activation_min;
  p.activation_max = packed.activation_max;
  return true;
}

// Splits the input channels so that a small grid still gives every SM two blocks (at most 8 splits of >= 32
// channels each, and a bounded partial-sum buffer); updates blocks.
inline void PlanSplits(PatternConvParams& p, int splits) {
  const long long tiles = p.blocks / p.splits;
  while (splits > 1 && static_cast<long long>(splits) * p.y_size > (64LL << 20)) --splits;
  p.split_channels = (p.C + splits - 1) / splits;
  p.splits = (p.C + p.split_channels - 1) / p.split_channels;  // no empty split
  p.blocks = tiles * p.splits;
}

inline int WantedSplits(const PatternConvParams& p, int num_sms) {
  if (p.blocks >= 2LL * num_sms) return 1;
  const long long wanted = (2LL * num_sms + p.blocks - 1) / p.blocks;
  const int most = p.C / 32 < 1 ? 1 : (p.C / 32 > 8 ? 8 : p.C / 32);
  return static_cast<int>(wanted < most ? wanted : most);
}

// Picks the largest per-thread work that gives every SM at least two blocks, splitting input channels when the
// grid is smaller than one block per SM (batch 1 needs parallelism, batch 32 reuse); a config that splits must use
// half its pixel slots. The thresholds are a first guess, to be tuned on a GPU (python -m ctprune.bench_cuda).
// force_config = 100 * splits + 10 * ft + px pins one (splits 0 means 1). Returns false for an unknown config.
inline bool PlanLaunch(PatternConvParams& p, const PackedPatternConv& packed, int num_sms, int force_config) {
  static const int kConfigs[9][2] = {{4, 4}, {4, 2}, {2, 4}, {2, 2}, {4, 1}, {1, 4}, {2, 1}, {1, 2}, {1, 1}};
  p.y_size = static_cast<long long>(p.N) * p.O * p.OH * p.OW;
  if (force_config != 0) {
    const int splits = force_config / 100, ft = force_config / 10 % 10, px = force_config % 10;
    if ((ft != 1 && ft != 2 && ft != 4) || (px != 1 && px != 2 && px != 4) || splits > 64) return false;
    if (!PlanTile(p, ft, px, packed)) return false;
    PlanSplits(p, splits < 1 ? 1 : splits);
    return true;
  }
  // First without splitting (partial sums cost a round trip): the first config with two blocks per SM, else the
  // one with the most blocks if that still gives every SM one; only smaller grids split.
  long long unsplit_blocks = -1;
  int unsplit = 8;
  for (int i = 0; i < 9; ++i) {
    if (!PlanTile(p, kConfigs[i][0], kConfigs[i][1], packed)) continue;
    if (p.blocks >= 2LL * num_sms) return true;
    if (p.blocks >= unsplit_blocks) {
      unsplit_blocks = p.blocks;
      unsplit = i;
    }
  }
  if (unsplit_blocks >= num_sms) return PlanTile(p, kConfigs[unsplit][0], kConfigs[unsplit][1], packed);
  long long best_blocks = -1;
  int best = 8, best_splits = 1;
  for (int i = 0; i < 9; ++i) {
    if (!PlanTile(p, kConfigs[i][0], kConfigs[i][1], packed)) continue;
    const int splits = WantedSplits(p, num_sms);
    const bool dense_tile = 2 * p.nimg * p.TR * p.TC >= 32 * p.px;
    if (p.blocks * splits >= 2LL * num_sms && dense_tile) {
      PlanSplits(p, splits);
      return true;
    }
    if (p.blocks * splits >= best_blocks) {  // ties: the later, smaller config wastes fewer pixel slots
      best_blocks = p.blocks * splits;
      best = i;
      best_splits = splits;
    }
  }
  if (!PlanTile(p, kConfigs[best][0], kConfigs[best][1], packed)) return false;
  PlanSplits(p, best_splits);
  return true;
}

}  // namespace cuda
}  // namespace ctprune
