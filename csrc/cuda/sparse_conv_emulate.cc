// CPU emulation of the SparseConv GPU kernels, for tests on machines without a GPU (tests/test_cuda_emulated_sparse.py).
//
// Runs the kernels' own steps (sparse_conv_impl.cuh) thread block by thread block in the CUDA kernels' order, the FC
// warps' shuffle tree lane by lane, then the non-finite pass over every input element. The inputs (Z too) and the
// output live inside NaN guard zones: a read outside an input shows as NaN in the result, a write outside the output
// fails the call. Not in the onnxruntime library; built with g++.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda/sparse_conv_impl.cuh"

namespace {

using namespace ctprune::cuda;
using namespace ctprune::cuda::sparse;

constexpr size_t kGuard = 4096;  // floats of NaN on each side of every buffer
const float kNaN = std::numeric_limits<float>::quiet_NaN();

template <int BLOCK>
void Run(const Params& p) {
  if (!p.fc) {
    const long long blocks = p.pixel_tiles * p.num_blocks;
    for (long long block = 0; block < blocks; ++block) {
      const int position = static_cast<int>(block % p.num_blocks);
      const long long tile = block / p.num_blocks;
      for (int t = 0; t < kThreads; ++t) ConvPixel<BLOCK>(p, position, tile * kThreads + t);
    }
  } else {
    for (long long pair = 0; pair < static_cast<long long>(p.num_blocks) * p.N; ++pair) {
      const int position = static_cast<int>(pair % p.num_blocks), n = static_cast<int>(pair / p.num_blocks);
      float acc[32][BLOCK];
      for (int lane = 0; lane < 32; ++lane) FcLane<BLOCK>(p, position, n, lane, acc[lane]);
      // __shfl_down_sync(offset): lane l adds lane l + offset's value from before this step (increasing l reads
      // lanes not yet updated in this step).
      for (int offset = 16; offset > 0; offset /= 2)
        for (int lane = 0; lane + offset < 32; ++lane)
          for (int b = 0; b < BLOCK; ++b) acc[lane][b] += acc[lane + offset][b];
      FcFinish<BLOCK>(p, position, n, acc[0]);
    }
  }
  for (long long i = 0; i < p.x_size; ++i) NonFiniteInput(p, i);
}

bool Dispatch(const Params& p) {
  switch (p.block) {
    case 1: Run<1>(p); return true;
    case 2: Run<2>(p); return true;
    case 4: Run<4>(p); return true;
    case 8: Run<8>(p); return true;
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

// Same inputs as ctprune_sparse_conv_cuda, on host memory. Returns 0, CTPRUNE_CUDA_INVALID_ATTRIBUTES (reason in
// err), CTPRUNE_CUDA_INVALID_SHAPE, 3 for an unknown block size, 4 when the kernels wrote outside the output.
__attribute__((visibility("default"))) int ctprune_sparse_conv_emulate(
    const CtpruneSparseConvDesc* desc, const float* x, const float* w, const float* b, const float* z,
    int64_t z_elements, float* y, int64_t n, int64_t c, int64_t h, int64_t width, char* err, int err_len) {
  PackedSparseConv packed;
  const std::string problem = PackSparseConv(*desc, packed);
  if (!problem.empty()) {
    if (err && err_len > 0) std::snprintf(err, static_cast<size_t>(err_len), "%s", problem.c_str());
    return CTPRUNE_CUDA_INVALID_ATTRIBUTES;
  }
  Params p{};
  if (!PlanSparse(p, packed, n, c, h, width)) return CTPRUNE_CUDA_INVALID_SHAPE;
  const size_t y_count = static_cast<size_t>(p.pixels) * p.O;
  if (z && z_elements != 1 && z_elements != static_cast<int64_t>(y_count)) return CTPRUNE_CUDA_INVALID_SHAPE;
  std::vector<float> gx = Guarded(x, static_cast<size_t>(p.x_size));
  std::vector<float> gw = Guarded(w, static_cast<size_t>(packed.num_rows) * p.block);
  std::vector<float> gb = Guarded(b, b ? static_cast<size_t>(p.O) : 0), gy = Guarded(nullptr, y_count);
  std::vector<float> gz = Guarded(z, z ? static_cast<size_t>(z_elements) : 0);
  p.x = gx.data() + kGuard;
  p.w = gw.data() + kGuard;
  p.b = b ? gb.data() + kGuard : nullptr;
  p.z = z ? gz.data() + kGuard : nullptr;
  p.z_full = z && z_elements != 1 ? 1 : 0;
  p.y = gy.data() + kGuard;
  p.rows = packed.rows.data();
  p.row_begin = packed.row_begin.data();
  p.first = packed.first.data();
  p.channels = packed.channels.data();
  p.group_of = packed.group_of.data();
  p.columns = packed.columns.data();
  if (!Dispatch(p)) return 3;
  if (!GuardsIntact(gy)) return 4;
  std::memcpy(y, gy.data() + kGuard, y_count * sizeof(float));
  return 0;
}

}  // extern "C"
