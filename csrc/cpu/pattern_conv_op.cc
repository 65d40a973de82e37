#include "cpu/pattern_conv_op.h"

#include <algorithm>
#include <cstdint>
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
  bool (*all_finite)(const float* x, size_t n);  // the direct form: nothing to pack, only the non-finite report
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
  const size_t first = static_cast<size_t>(n) * w.g->C + c0;
  if (w.all_finite != nullptr) {
    // One scan of the item's channels (a scan per channel of a small plane cost about as much in its reduction as in
    // its loads); channel by channel only when it meets a NaN or +-Inf.
    const bool finite = w.all_finite(w.x + first * in_plane, static_cast<size_t>(c1 - c0) * in_plane);
    for (size_t nc = first; nc < first + (c1 - c0); ++nc) {
      w.non_finite[nc] = !finite && !w.all_finite(w.x + nc * in_plane, in_plane);
    }
    return;
  }
  for (size_t nc = first; nc < first + (c1 - c0); ++nc) {
    w.non_finite[nc] = w.pack(*w.g, w.x + nc * in_plane, w.packed + nc * w.g->plane);
  }
}

// The items of one call: every image's filter-block items (a block over a strip of flat positions; the strip outer,
// so consecutive items share one strip's input rows in L2), then every image's per-filter items (a group of filter
// positions over a block of tiles). Block items come first: they are the larger ones.
struct ConvWork {
  const ConvGeometry* g;
  FilterTilesFn tiles;
  BlockStripFn block_strip;
  ImageJob job;  // image 0; others offset by their index
  const int32_t* group_begin;
  const int32_t* group_end;
  int filter_items;
  int tiles_per_item;
  int tile_items;
  int blocks;
  int strip_pixels;
  int strips;
  size_t block_items;  // all images'
};

ImageJob JobOfImage(const ConvWork& w, int n) {
  ImageJob job = w.job;
  const size_t image_out = static_cast<size_t>(n) * w.g->O * w.g->OH * w.g->OW;  // Y and Z share the layout
  job.packed += static_cast<size_t>(n) * w.g->C * w.g->plane;
  job.out += image_out;
  if (job.residual != nullptr) job.residual += image_out;
  return job;
}

void ConvItem(void* data, size_t item) {
  const ConvWork& w = *static_cast<const ConvWork*>(data);
  if (item < w.block_items) {
    const size_t per_image = static_cast<size_t>(w.blocks) * w.strips;
    const int n = static_cast<int>(item / per_image);
    const int rest = static_cast<int>(item % per_image);
    const int p0 = (rest / w.blocks) * w.strip_pixels;
    const int total = w.g->OH * w.g->flat_row;
    w.block_strip(*w.g, JobOfImage(w, n), rest % w.blocks, p0, std::min(total, p0 + w.strip_pixels));
    return;
  }
  item -= w.block_items;
  const size_t per_image = static_cast<size_t>(w.filter_items) * w.tile_items;
  const int n = static_cast<int>(item / per_image);
  const int rest = static_cast<int>(item % per_image);
  // Tile blocks outermost: consecutive items share one block's input rows in L2.
  const int t0 = (rest / w.filter_items) * w.tiles_per_item;
  const int group = rest % w.filter_items;
  w.tiles(*w.g, JobOfImage(w, n), w.group_begin[group], w.group_end[group], t0,
          std::min(w.g->tiles, t0 + w.tiles_per_item));
}

int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

}  // namespace

PatternConvKernel::PatternConvKernel(const OrtApi& api, const OrtKernelInfo* info, std::string node)
    : api_(api), node_(std::move(node)) {
  // Filter blocks: on unless CTPRUNE_PATTERN_BLOCKS=0; CTPRUNE_PATTERN_BLOCK_PAD_MIN overrides the smallest remainder
  // run as a padded block (both for the tests and A/B measurements).
  BlockOptions blocks;
  blocks.enabled = EnvInt("CTPRUNE_PATTERN_BLOCKS", 1) != 0;
  blocks.pad_min = EnvInt("CTPRUNE_PATTERN_BLOCK_PAD_MIN", kBlockPadMin);
  plan_ = BuildPlan(ops::ParsePatternConv(ops::ReadAttributes(api, info, ops::PatternConvAttributeNames())), blocks);
  std::string isa_error;
  kernels_ = Kernels(&isa_error);
  if (!isa_error.empty()) throw InvalidNode(isa_error);
  narrow_kernels_ = NarrowPlaneKernels(kernels_);
  const float* w = ops::ConstantFloatMatrix(api, info, 1, plan_.K, 4);
  if (w != nullptr) weights_finite_ = kernels_.sparse.all_finite(w, static_cast<size_t>(plan_.K) * 4) ? 1 : 0;
  if (plan_.blocks() > 0) {
    // A constant W of the right shape is regrouped once; anything else is checked and regrouped at run time.
    if (w != nullptr) {
      const size_t floats = static_cast<size_t>(plan_.block_weight_begin.back()) * kBlockFilters;
      block_weights_storage_.resize(floats + 16);
      float* aligned = block_weights_storage_.data();
      while (reinterpret_cast<uintptr_t>(aligned) % 64 != 0) ++aligned;
      RegroupBlockWeights(plan_, w, aligned);
      block_weights_ = aligned;
    }
  }
  // The direct form (pattern_conv.h) where it fits, unless CTPRUNE_PATTERN_DIRECT=0 (tests and A/B measurements).
  // CTPRUNE_PATTERN_DIRECT=2 takes it wherever it can run, however many multiply-adds (measurements of the rule).
  direct_ = EnvInt("CTPRUNE_PATTERN_DIRECT", 1);
  const char* poison = std::getenv("CTPRUNE_POISON_OUTPUT");
  poison_output_ = poison != nullptr && std::strcmp(poison, "1") == 0;
}

std::shared_ptr<const std::vector<int32_t>> PatternConvKernel::Offsets(const ConvGeometry& g) {
  std::lock_guard<std::mutex> lock(offsets_mutex_);
  for (const OffsetsFor& o : offsets_) {
    if (o.H == g.H && o.W == g.W && o.direct == g.direct) return o.offsets;
  }
  constexpr size_t kKeptSizes = 4;
  if (offsets_.size() == kKeptSizes) offsets_.erase(offsets_.begin());
  offsets_.push_back({g.H, g.W, g.direct, std::make_shared<const std::vector<int32_t>>(TapOffsets(plan_, g))});
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
  // The tier's own vectors, or the narrow-plane table's when the output's flat row is that narrow (the choice
  // depends on the input size alone, so the offsets kept per input size stay valid).
  const KernelTable& kernels = FlatRow(plan_, xs[3]) <= kNarrowRowFloats ? narrow_kernels_ : kernels_;
  // Stride 1 with every pad 1 reads X in place (the direct form); the rest packs it first. The choice, too, depends
  // on the input size alone.
  // (The direct form skips the taps that would read the pad, which adds 0 * w: NaN for an infinite w.)
  const bool direct = direct_ != 0 &&
                      DirectFits(plan_, xs[2], xs[3], kernels.lanes, kernels.direct_vectors, direct_ == 2) &&
                      (weights_finite_ >= 0 ? weights_finite_ == 1
                                            : kernels.sparse.all_finite(w.GetTensorData<float>(),
                                                                        static_cast<size_t>(plan_.K) * 4));
  const ConvGeometry g =
      direct ? MakeDirectGeometry(plan_, xs[2], xs[3], kernels.lanes, kernels.direct_vectors)
             : MakeGeometry(plan_, xs[2], xs[3], kernels.lanes, kernels.max_vectors, kernels.block_pixels);
  const FilterTilesFn tiles =
      direct ? kernels.select_direct(g.row_vectors, g.tile_rows) : kernels.select_tiles(g.vectors);
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

  // 1. Pack every input channel into its zero-padded plane (the direct form: only look), in parallel, noting channels
  // with a NaN or +-Inf. The workspace is this call's (workspace.h): the planes (64-byte aligned: the mapping is
  // page-aligned), the blocks' regrouped weights when W is not a constant (64-byte aligned: a plane is a multiple of
  // 16 floats), then the flags.
  const size_t channels = static_cast<size_t>(N) * g.C;
  // (The direct form's lane masks take the planes' place: DirectMasksFn.)
  const size_t planes_bytes = direct ? kDirectMaskBytes : channels * g.plane * sizeof(float);
  const size_t regroup_bytes = plan_.blocks() > 0 && block_weights_ == nullptr
                                   ? static_cast<size_t>(plan_.block_weight_begin.back()) * kBlockFilters * sizeof(float)
                                   : 0;
  const Workspace workspace(planes_bytes + regroup_bytes + channels);
  const float* packed = direct ? x.GetTensorData<float>() : workspace.as<float>();
  if (direct) kernels.direct_masks(g, workspace.as<float>());
  uint8_t* non_finite = workspace.as<uint8_t>(planes_bytes + regroup_bytes);
  const float* block_weights = block_weights_;
  if (regroup_bytes > 0) {
    float* regrouped = workspace.as<float>(planes_bytes);
    RegroupBlockWeights(plan_, w.GetTensorData<float>(), regrouped);
    block_weights = regrouped;
  }
  PackWork pack{&g, kernels.pack, direct ? kernels.sparse.all_finite : nullptr, x.GetTensorData<float>(),
                workspace.as<float>(), non_finite, 1, 0};
  pack.channels_per_item = static_cast<int>(std::max<size_t>(1, 16384 / g.plane));
  pack.items_per_image = (g.C + pack.channels_per_item - 1) / pack.channels_per_item;
  ctx.ParallelFor(&PackItem, static_cast<size_t>(N) * pack.items_per_image, 0, &pack);

  // 2. Convolve. A per-filter work item is a group of consecutive filters (filters come sorted by decreasing work, so
  // items that start first are the heaviest) over a block of tiles, walked filter by filter so consecutive tiles of
  // one kernel share their overlapping input rows in L1. A tile block's input rows of all channels stay within about
  // half of L2 while every filter reads them (on 224x224 layers a whole channel plane alone is 200 KB); about 16
  // items per image keep 2+ threads busy. A filter-block item is one block over a strip of flat positions: strips
  // whose input rows of all channels fit about half of L2, and at least 8 block items per image (for layers of 1-4
  // blocks) so that 2 threads balance.
  const std::shared_ptr<const std::vector<int32_t>> offsets = Offsets(g);
  ConvWork work{};
  work.g = &g;
  work.tiles = tiles;
  work.block_strip = kernels.block_strip;
  work.job = ImageJob{packed,        offsets->data(), w.GetTensorData<float>(), plan_.kernel_begin.data(),
                      plan_.filters.data(), bias,    z_offset,                 residual,
                      plan_.act_min,   plan_.act_max, plan_.clamp,             out,
                      plan_.block_first.data(), plan_.block_count.data(), plan_.block_weight_begin.data(),
                      block_weights,   plan_.taps.data(), direct ? workspace.as<float>() : nullptr};
  work.group_begin = plan_.group_begin.data();
  work.group_end = plan_.group_end.data();
  work.filter_items = static_cast<int>(plan_.group_begin.size());
  const int tile_items_wanted =
      work.filter_items >= 16 ? 1 : (16 + work.filter_items - 1) / std::max(1, work.filter_items);
  constexpr long kTileBlockFloats = 256 * 1024 / sizeof(float);
  const long tile_floats = static_cast<long>(g.vectors) * kernels.lanes;
  const long block_tiles = (kTileBlockFloats / plan_.C - 2L * g.flat_row) / tile_floats;
  work.tiles_per_item = static_cast<int>(std::max(1L, std::min<long>(block_tiles, g.tiles / tile_items_wanted)));
  work.tile_items = (g.tiles + work.tiles_per_item - 1) / work.tiles_per_item;

  work.blocks = plan_.blocks();
  if (work.blocks > 0) {
    constexpr int kStripUnit = 24;  // a multiple of every tier's block tile and lanes (like kBlockStripPixels)
    const long total = static_cast<long>(g.OH) * g.flat_row;
    const long fit_rows = kTileBlockFloats / (static_cast<long>(plan_.C) * g.flat_row) - 2;
    long strip = std::min<long>(kBlockStripPixels, std::max<long>(1, fit_rows) * g.flat_row);
    const long strips_wanted = (8 + work.blocks - 1) / work.blocks;
    strip = std::min(strip, (total + strips_wanted - 1) / strips_wanted);
    strip = std::max<long>(kStripUnit, (strip + kStripUnit - 1) / kStripUnit * kStripUnit);
    strip = std::min<long>(strip, kBlockStripPixels);
    work.strip_pixels = static_cast<int>(strip);
    work.strips = static_cast<int>((total + strip - 1) / strip);
  }
  work.block_items = static_cast<size_t>(N) * work.blocks * work.strips;
  const size_t filter_items = static_cast<size_t>(N) * work.filter_items * work.tile_items;
  ctx.ParallelFor(&ConvItem, work.block_items + filter_items, 0, &work);

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
