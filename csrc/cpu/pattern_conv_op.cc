#include "cpu/pattern_conv_op.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/workspace.h"
#include "ops/kernel_info.h"
#include "ops/op_status.h"

namespace ctprune {
namespace cpu {
namespace {

using ops::ShapeStr;

struct PackWork {
  const ConvGeometry* g;
  PackChannelFn pack;
  const float* x;
  float* packed;
  uint8_t* non_finite;  // (N, C): the channel holds a NaN or +-Inf
  int channels_per_item;
  int items_per_image;
};

void PackItem(void* data, size_t item) {
  const PackWork& w = *static_cast<const PackWork*>(data);
  const int n = static_cast<int>(item / w.items_per_image);
  const int c0 = static_cast<int>(item % w.items_per_image) * w.channels_per_item;
  const int c1 = std::min(w.g->C, c0 + w.channels_per_item);
  const size_t in_plane = static_cast<size_t>(w.g->H) * w.g->W;
  for (int c = c0; c < c1; ++c) {
    const size_t nc = static_cast<size_t>(n) * w.g->C + c;
    w.non_finite[nc] = w.pack(*w.g, w.x + nc * in_plane, w.packed + nc * w.g->plane);
  }
}

struct ConvWork {
  const ConvGeometry* g;
  FilterTilesFn tiles;
  ImageJob job;  // image 0; others offset by their index
  int filter_count;
  int filters_per_item;
  int filter_items;
  int tiles_per_item;
  int tile_items;
};

void ConvItem(void* data, size_t item) {
  const ConvWork& w = *static_cast<const ConvWork*>(data);
  const size_t per_image = static_cast<size_t>(w.filter_items) * w.tile_items;
  const int n = static_cast<int>(item / per_image);
  const int rest = static_cast<int>(item % per_image);
  // Tile blocks outermost: consecutive items share one block's input rows in L2.
  const int t0 = (rest / w.filter_items) * w.tiles_per_item;
  const int f0 = (rest % w.filter_items) * w.filters_per_item;
  ImageJob job = w.job;
  const size_t image_out = static_cast<size_t>(n) * w.g->O * w.g->OH * w.g->OW;  // Y and Z share the layout
  job.packed += static_cast<size_t>(n) * w.g->C * w.g->plane;
  job.out += image_out;
  if (job.residual != nullptr) job.residual += image_out;
  w.tiles(*w.g, job, f0, std::min(w.filter_count, f0 + w.filters_per_item), t0,
          std::min(w.g->tiles, t0 + w.tiles_per_item));
}

}  // namespace

PatternConvKernel::PatternConvKernel(const OrtApi& api, const OrtKernelInfo* info, std::string node)
    : api_(api), node_(std::move(node)) {
  plan_ = BuildPlan(ops::ParsePatternConv(ops::ReadAttributes(api, info, ops::PatternConvAttributeNames())));
  std::string isa_error;
  kernels_ = Kernels(&isa_error);
  if (!isa_error.empty()) throw InvalidNode(isa_error);
  const char* poison = std::getenv("CTPRUNE_POISON_OUTPUT");
  poison_output_ = poison != nullptr && std::strcmp(poison, "1") == 0;
}

std::shared_ptr<const std::vector<int32_t>> PatternConvKernel::Offsets(const ConvGeometry& g) {
  std::lock_guard<std::mutex> lock(offsets_mutex_);
  for (const OffsetsFor& o : offsets_) {
    if (o.H == g.H && o.W == g.W) return o.offsets;
  }
  constexpr size_t kKeptSizes = 4;
  if (offsets_.size() == kKeptSizes) offsets_.erase(offsets_.begin());
  offsets_.push_back({g.H, g.W, std::make_shared<const std::vector<int32_t>>(TapOffsets(plan_, g))});
  return offsets_.back().offsets;
}

OrtStatusPtr PatternConvKernel::ComputeV2(OrtKernelContext* context) {
  return ops::StatusOf(api_, node_, [&] { Compute(context); });
}

void PatternConvKernel::Compute(OrtKernelContext* context) {
  Ort::KernelContext ctx(context);
  const size_t input_count = ctx.GetInputCount();
  Ort::ConstValue x = ctx.GetInput(0);
  Ort::ConstValue w = ctx.GetInput(1);
  Ort::ConstValue b = input_count > 2 ? ctx.GetInput(2) : Ort::ConstValue{nullptr};
  Ort::ConstValue z = input_count > 3 ? ctx.GetInput(3) : Ort::ConstValue{nullptr};

  // Shapes first, before anything is allocated.
  const std::vector<int64_t> xs = x.GetTensorTypeAndShapeInfo().GetShape();
  if (xs.size() != 4) throw InvalidNode("X must be 4-D (N, C, H, W), got shape " + ShapeStr(xs));
  if (xs[1] != plan_.C)
    throw InvalidNode("X has " + std::to_string(xs[1]) + " channels but weight_shape says " +
                           std::to_string(plan_.C) + " (X shape " + ShapeStr(xs) + ")");
  const std::vector<int64_t> ws = w.GetTensorTypeAndShapeInfo().GetShape();
  if (ws.size() != 2 || ws[0] != plan_.K || ws[1] != 4)
    throw InvalidNode("W must have shape (" + std::to_string(plan_.K) + ", 4) (one row per kept kernel), got " +
                           ShapeStr(ws));
  const float* bias = nullptr;
  if (b) {
    const std::vector<int64_t> bs = b.GetTensorTypeAndShapeInfo().GetShape();
    if (bs.size() != 1 || bs[0] != plan_.O)
      throw InvalidNode("B must have shape (" + std::to_string(plan_.O) + ",), got " + ShapeStr(bs));
    bias = b.GetTensorData<float>();
  }
  const int64_t N = xs[0];
  const ConvGeometry g = MakeGeometry(plan_, xs[2], xs[3], kernels_.lanes, kernels_.max_vectors);
  const FilterTilesFn tiles = kernels_.select_tiles(g.vectors);
  if (tiles == nullptr) throw InvalidNode("no kernel for this geometry");

  // Z, the fused residual: one element (added to every output) or exactly Y's shape.
  const std::vector<int64_t> y_shape = {N, static_cast<int64_t>(plan_.O), g.OH, g.OW};
  float z_offset = 0.0f;
  const float* residual = nullptr;
  if (z) {
    if (ops::ResidualElements(z.GetTensorTypeAndShapeInfo().GetShape(), y_shape) == 1) {
      z_offset = z.GetTensorData<float>()[0];
    } else {
      residual = z.GetTensorData<float>();
    }
  }

  Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
  float* out = y.GetTensorMutableData<float>();
  const size_t out_size = static_cast<size_t>(N) * plan_.O * g.OH * g.OW;
  if (poison_output_) std::fill(out, out + out_size, std::numeric_limits<float>::quiet_NaN());
  if (N == 0) return;

  // 1. Pack every input channel into its zero-padded plane, in parallel, noting channels with a NaN or +-Inf. The
  // workspace is this call's (workspace.h): the planes (64-byte aligned: the mapping is page-aligned), then the flags.
  const size_t channels = static_cast<size_t>(N) * g.C, planes_bytes = channels * g.plane * sizeof(float);
  const Workspace workspace(planes_bytes + channels);
  float* packed = workspace.as<float>();
  uint8_t* non_finite = workspace.as<uint8_t>(planes_bytes);
  PackWork pack{&g, kernels_.pack, x.GetTensorData<float>(), packed, non_finite, 1, 0};
  pack.channels_per_item = static_cast<int>(std::max<size_t>(1, 16384 / g.plane));
  pack.items_per_image = (g.C + pack.channels_per_item - 1) / pack.channels_per_item;
  ctx.ParallelFor(&PackItem, static_cast<size_t>(N) * pack.items_per_image, 0, &pack);

  // 2. Convolve. A work item is a run of consecutive filters (filters come sorted by decreasing work, so items that
  // start first are the heaviest) over a block of tiles, walked filter by filter so consecutive tiles of one kernel
  // share their overlapping input rows in L1. A tile block's input rows of all channels stay within about half of
  // L2 while every filter reads them (on 224x224 layers a whole channel plane alone is 200 KB); about 16 items per
  // image keep 2+ threads busy.
  const std::shared_ptr<const std::vector<int32_t>> offsets = Offsets(g);
  ConvWork work{};
  work.g = &g;
  work.tiles = tiles;
  work.job = ImageJob{packed,        offsets->data(), w.GetTensorData<float>(), plan_.kernel_begin.data(),
                           plan_.filters.data(), bias,    z_offset,                 residual,
                           plan_.act_min,   plan_.act_max, plan_.clamp,             out};
  work.filter_count = plan_.O;
  work.filters_per_item = std::max(1, std::min(16, plan_.O / 16));
  work.filter_items = (plan_.O + work.filters_per_item - 1) / work.filters_per_item;
  const int tile_items_wanted = work.filter_items >= 16 ? 1 : (16 + work.filter_items - 1) / work.filter_items;
  constexpr long kTileBlockFloats = 256 * 1024 / sizeof(float);
  const long tile_floats = static_cast<long>(g.vectors) * kernels_.lanes;
  const long block_tiles = (kTileBlockFloats / plan_.C - 2L * g.flat_row) / tile_floats;
  work.tiles_per_item = static_cast<int>(std::max(1L, std::min<long>(block_tiles, g.tiles / tile_items_wanted)));
  work.tile_items = (g.tiles + work.tiles_per_item - 1) / work.tiles_per_item;
  ctx.ParallelFor(&ConvItem, static_cast<size_t>(N) * work.filter_items * work.tile_items, 0, &work);

  // 3. NaN and +-Inf the ONNX way: the outputs a dense Conv makes NaN through the pruned taps' zeros.
  if (std::find(non_finite, non_finite + channels, 1) == non_finite + channels) return;
  const std::shared_ptr<const ChannelKernels> by_channel = KernelsByChannel();
  const size_t in_plane = static_cast<size_t>(g.H) * g.W, out_image = static_cast<size_t>(g.O) * g.OH * g.OW;
  const float* xd = x.GetTensorData<float>();
  for (size_t nc = 0; nc < channels; ++nc) {
    if (!non_finite[nc]) continue;
    const size_t n = nc / g.C;
    MarkNonFiniteChannel(plan_, *by_channel, g, static_cast<int>(nc % g.C), xd + nc * in_plane, out + n * out_image);
  }
}

std::shared_ptr<const ChannelKernels> PatternConvKernel::KernelsByChannel() {
  std::lock_guard<std::mutex> lock(offsets_mutex_);
  if (!by_channel_) by_channel_ = std::make_shared<const ChannelKernels>(ChannelKernelsOf(plan_));
  return by_channel_;
}

OrtStatusPtr PatternConvOp::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
  const std::string node = ops::NodeLabel(api, info, ops::kPatternConvName);
  return ops::StatusOf(api, node, [&] { *kernel = new PatternConvKernel(api, info, node); });
}

}  // namespace cpu
}  // namespace ctprune
