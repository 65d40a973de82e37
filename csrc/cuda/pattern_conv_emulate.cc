// CPU emulation of the PatternConv GPU kernel, for tests on machines without a GPU (tests/test_cuda_emulated.py).
//
// Runs the very steps the CUDA kernel runs (pattern_conv_impl.cuh) block by block, thread by thread, with the barrier
// between staging and compute made explicit. Guards catch indexing mistakes a GPU would hide or crash on: the shared
// tile is refilled with NaN before every chunk and framed by NaN guard zones, the inputs (Z too) and the output live
// inside NaN guard zones, and a write outside the output is reported. Not in the onnxruntime library; built with g++.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/pattern_conv_impl.cuh"
#include "cuda/pattern_conv_plan.h"

namespace {

using namespace ctprune::cuda;

constexpr size_t kGuard = 4096;  // floats of NaN on each side of every buffer
const float kNaN = std::numeric_limits<float>::quiet_NaN();

template <int FT, int PX>
void RunBlocks(const PatternConvParams& p) {
  const size_t tile = static_cast<size_t>(p.CC) * p.chan_stride;
  std::vector<float> smem_buffer(tile + 2 * kGuard);
  float* smem = smem_buffer.data() + kGuard;
  std::vector<ThreadState<FT, PX>> threads(kBlockThreads);
  // Blocks run in reverse order, so a tile's last-arriving split is its first one, not its last.
  for (long long block = p.blocks - 1; block >= 0; --block) {
    const BlockCoord bc = DecodeBlock(p, block);
    for (int t = 0; t < kBlockThreads; ++t) InitThread(threads[t], p, bc, t);
    bool non_finite = false;
    for (int c0 = bc.c_begin; c0 < bc.c_end; c0 += p.CC) {
      const int c1 = c0 + p.CC < bc.c_end ? c0 + p.CC : bc.c_end;
      std::fill(smem_buffer.begin(), smem_buffer.end(), kNaN);
      for (int t = 0; t < kBlockThreads; ++t) non_finite |= StageChunk(p, bc, c0, c1 - c0, t, kBlockThreads, smem);
      // __syncthreads_or()
      for (int t = 0; t < kBlockThreads; ++t) ComputeChunk(threads[t], p, c0, c1, smem);
      // __syncthreads()
    }
    if (non_finite) {
      for (int t = 0; t < kBlockThreads; ++t) MarkNonFinite(threads[t], NonFiniteOutputs<FT, PX>(p, bc, t));
    }
    if (p.splits == 1) {
      for (int t = 0; t < kBlockThreads; ++t) FinishThread(threads[t], p);
      continue;
    }
    for (int t = 0; t < kBlockThreads; ++t) StorePartial(threads[t], p, bc.split);
    const int arrived = p.tickets[bc.ticket]++;
    if (arrived == p.splits - 1) {
      p.tickets[bc.ticket] = 0;
      for (int t = 0; t < kBlockThreads; ++t) ReducePartials(threads[t], p);
    }
  }
}

bool Dispatch(const PatternConvParams& p) {
  switch (p.ft * 10 + p.px) {
    case 11: RunBlocks<1, 1>(p); return true;
    case 12: RunBlocks<1, 2>(p); return true;
    case 14: RunBlocks<1, 4>(p); return true;
    case 21: RunBlocks<2, 1>(p); return true;
    case 22: RunBlocks<2, 2>(p); return true;
    case 24: RunBlocks<2, 4>(p); return true;
    case 41: RunBlocks<4, 1>(p); return true;
    case 42: RunBlocks<4, 2>(p); return true;
    case 44: RunBlocks<4, 4>(p); return true;
    default: return false;
  }
}

std::vector<float> Guarded(const float* data, size_t count) {
  std::vector<float> v(count + 2 * kGuard, kNaN);
  if (data && count) std::memcpy(v.data() + kGuard, data, count * sizeof(float));
  return v;
}

bool GuardsIntact(const std::vector<float>& v) {
  for (size_t i = 0; i < kGuard; ++i)
    if (!std::isnan(v[i]) || !std::isnan(v[v.size() - 1 - i])) return false;
  return true;
}

}  // namespace

extern "C" {

// Same inputs as ctprune_pattern_conv_cuda (z, z_elements included), on host memory. plan_out (may be null) receives
// {ft, px, nimg, TR, TC, CC, blocks, splits}. Returns 0, CTPRUNE_CUDA_INVALID_ATTRIBUTES (reason in err),
// CTPRUNE_CUDA_INVALID_SHAPE (also for a Z that is neither one element nor Y's size), 3 for an unknown force_config,
// 4 when the kernel wrote outside the output or the partial sums, 5 when a channel-split launch left a ticket non-zero.
__attribute__((visibility("default"))) int ctprune_pattern_conv_emulate(
    const CtprunePatternConvDesc* desc, const float* x, const float* w, const float* b, const float* z,
    int64_t z_elements, float* y, int64_t n, int64_t h, int64_t width, int num_sms, int force_config, int64_t* plan_out,
    char* err, int err_len) {
  PackedPatternConv packed;
  const std::string problem = PackPatternConv(*desc, packed);
  if (!problem.empty()) {
    if (err && err_len > 0) std::snprintf(err, static_cast<size_t>(err_len), "%s", problem.c_str());
    return CTPRUNE_CUDA_INVALID_ATTRIBUTES;
  }
  PatternConvParams p{};
  if (!PlanShape(p, packed, n, h, width)) return CTPRUNE_CUDA_INVALID_SHAPE;
  const size_t x_count = static_cast<size_t>(n) * p.C * p.H * p.W;
  const size_t y_count = static_cast<size_t>(n) * p.O * p.OH * p.OW;
  if (z && z_elements != 1 && z_elements != static_cast<int64_t>(y_count)) return CTPRUNE_CUDA_INVALID_SHAPE;
  if (!PlanLaunch(p, packed, num_sms, force_config)) return 3;
  std::vector<float> gx = Guarded(x, x_count), gw = Guarded(w, static_cast<size_t>(packed.num_kernels) * 4);
  std::vector<float> gb = Guarded(b, b ? static_cast<size_t>(p.O) : 0), gy = Guarded(nullptr, y_count);
  std::vector<float> gz = Guarded(z, z ? static_cast<size_t>(z_elements) : 0);
  p.x = gx.data() + kGuard;
  p.w = gw.data() + kGuard;
  p.b = b ? gb.data() + kGuard : nullptr;
  p.z = z ? gz.data() + kGuard : nullptr;
  p.z_full = z && z_elements != 1 ? 1 : 0;
  p.y = gy.data() + kGuard;
  p.entries = packed.entries.data();
  p.filter_begin = packed.filter_begin.data();
  p.slot_filter = packed.slot_filter.data();
  std::vector<float> partial = Guarded(nullptr, p.splits > 1 ? static_cast<size_t>(p.splits) * y_count : 0);
  std::vector<int> tickets(p.splits > 1 ? static_cast<size_t>(p.blocks / p.splits) : 0, 0);
  p.partial = partial.data() + kGuard;
  p.tickets = tickets.data();
  if (plan_out) {
    const int64_t plan[8] = {p.ft, p.px, p.nimg, p.TR, p.TC, p.CC, p.blocks, p.splits};
    std::memcpy(plan_out, plan, sizeof(plan));
  }
  if (!Dispatch(p)) return 3;
  if (!GuardsIntact(gy) || !GuardsIntact(partial)) return 4;
  for (int t : tickets)
    if (t != 0) return 5;  // a ticket left behind would break the next launch
  std::memcpy(y, gy.data() + kGuard, y_count * sizeof(float));
  return 0;
}

// Checks FastDivmod against '/' and '%' for `trials` random (divisor, numerator) pairs below 2^31 plus edge values;
// returns the number of mismatches.
__attribute__((visibility("default"))) int64_t ctprune_fastdivmod_selftest(uint32_t seed, int64_t trials) {
  std::mt19937 rng(seed);
  int64_t bad = 0;
  auto check = [&](uint32_t d, uint32_t v) {
    const FastDivmod fd(d);
    uint32_t q, r;
    fd.divmod(v, q, r);
    if (q != v / d || r != v % d) ++bad;
  };
  const uint32_t edges[] = {0u, 1u, 2u, 3u, 7u, 8u, 9u, 255u, 256u, 257u, 65535u, 65536u, 0x7fffffffu, 0x7ffffffeu};
  for (uint32_t d : edges)
    if (d)
      for (uint32_t v : edges) check(d, v);
  for (int64_t i = 0; i < trials; ++i) {
    const uint32_t d = 1u + (rng() % (i % 2 ? 0x7fffffffu : 20000u));
    const uint32_t v = rng() & 0x7fffffffu;
    check(d, v);
    check(d, v % (d * 3u + 1u) & 0x7fffffffu);
  }
  return bad;
}

}  // extern "C"
