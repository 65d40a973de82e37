#include "cpu/pattern_conv_nonfinite.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace ctprune {
namespace cpu {

ChannelKernels ChannelKernelsOf(const PatternConvPlan& p) {
  ChannelKernels ck;
  ck.begin.assign(static_cast<size_t>(p.C) + 1, 0);
  std::vector<int32_t> filter_of(static_cast<size_t>(p.K));
  for (int fi = 0; fi < p.O; ++fi) {
    for (int k = p.kernel_begin[fi]; k < p.kernel_begin[fi + 1]; ++k) filter_of[k] = p.filters[fi];
  }
  std::vector<int32_t> order(static_cast<size_t>(p.K));
  for (int k = 0; k < p.K; ++k) order[k] = k;
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return p.channels[a] != p.channels[b] ? p.channels[a] < p.channels[b] : filter_of[a] < filter_of[b];
  });
  for (int32_t k : order) {
    ++ck.begin[static_cast<size_t>(p.channels[k]) + 1];
    ck.filter.push_back(filter_of[k]);
    ck.taps.push_back(p.shapes[k]);
  }
  for (int c = 0; c < p.C; ++c) ck.begin[c + 1] += ck.begin[c];
  return ck;
}

void MarkNonFiniteChannel(const PatternConvPlan& p, const ChannelKernels& ck, const ConvGeometry& g, int c,
                          const float* x, float* out) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const size_t plane = static_cast<size_t>(g.OH) * g.OW;
  const int32_t* filters = ck.filter.data() + ck.begin[c];
  const int32_t* taps = ck.taps.data() + ck.begin[c];
  const int count = ck.begin[c + 1] - ck.begin[c];
  for (int iy = 0; iy < g.H; ++iy) {
    for (int ix = 0; ix < g.W; ++ix) {
      const float v = x[static_cast<size_t>(iy) * g.W + ix];
      if (std::isfinite(v)) continue;
      // Every output (y, x) that reads this pixel at tap (ky, kx): y * stride + ky = iy + pad_top, likewise x.
      for (int ky = 0; ky < 3; ++ky) {
        const int ry = iy + p.pad_top - ky;
        if (ry < 0 || ry % p.stride != 0 || ry / p.stride >= g.OH) continue;
        for (int kx = 0; kx < 3; ++kx) {
          const int rx = ix + p.pad_left - kx;
          if (rx < 0 || rx % p.stride != 0 || rx / p.stride >= g.OW) continue;
          const size_t at = static_cast<size_t>(ry / p.stride) * g.OW + rx / p.stride;
          const int tap = ky * 3 + kx;
          // Filters walk in order beside this channel's kernels (sorted by filter): a filter that keeps the tap
          // computed v * w itself; every other one multiplied v by a zero.
          int next = 0;
          for (int f = 0; f < p.O; ++f) {
            while (next < count && filters[next] < f) ++next;
            const bool kept = next < count && filters[next] == f && ((taps[next] >> tap) & 1);
            if (!kept) out[static_cast<size_t>(f) * plane + at] = nan;
          }
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace ctprune
