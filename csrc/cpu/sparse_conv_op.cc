#include "cpu/sparse_conv_op.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "ops/kernel_info.h"
#include "ops/op_status.h"

namespace ctprune {
namespace cpu {
namespace {

using ops::InvalidNode;
using ops::ShapeStr;

constexpr int kInputI = 2, kInputP = 3;

std::string Str(int64_t v) { return std::to_string(v); }

// A constant 1-D initializer input as int64 values; `index` is I or P.
std::vector<int64_t> ConstantIndices(const OrtKernelInfo* info, int index, const char* name,
                                     ONNXTensorElementDataType* type) {
  Ort::ConstKernelInfo ki(info);
  int is_constant = 0;
  Ort::ConstValue value{nullptr};
  try {
    value = ki.GetTensorConstantInput(index, &is_constant);
  } catch (const Ort::Exception&) {
    is_constant = 0;
  }
  if (!is_constant || !value)
    throw InvalidNode(std::string("input ") + name + " must be a constant initializer for ctprune's kernel");
  const auto info_shape = value.GetTensorTypeAndShapeInfo();
  const std::vector<int64_t> shape = info_shape.GetShape();
  if (shape.size() != 1) throw InvalidNode(std::string("input ") + name + " must be 1-D, got shape " + ShapeStr(shape));
  *type = info_shape.GetElementType();
  const size_t n = static_cast<size_t>(shape[0]);
  std::vector<int64_t> out(n);
  if (*type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16) {
    const uint16_t* p = value.GetTensorData<uint16_t>();
    for (size_t i = 0; i < n; ++i) out[i] = p[i];
  } else if (*type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) {
    const int32_t* p = value.GetTensorData<int32_t>();
    for (size_t i = 0; i < n; ++i) out[i] = p[i];
  } else {
    throw InvalidNode(std::string("input ") + name + (index == kInputI ? " must be uint16 or int32" : " must be int32"));
  }
  return out;
}

SparsePlan BuildPlan(const OrtApi& api, const OrtKernelInfo* info) {
  SparsePlan plan;
  plan.spec = ops::ParseSparseConv(ops::ReadAttributes(api, info, ops::SparseConvAttributeNames()));
  const ops::SparseConvSpec& s = plan.spec;
  ONNXTensorElementDataType i_type, p_type;
  const std::vector<int64_t> columns = ConstantIndices(info, kInputI, "I", &i_type);
  const std::vector<int64_t> pointer = ConstantIndices(info, kInputP, "P", &p_type);
  if (p_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) throw InvalidNode("input P must be int32");
  if (i_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16 && s.columns() > 65536)
    throw InvalidNode("input I is uint16 but the column space has " + Str(s.columns()) + " columns");
  if (columns.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
    throw InvalidNode("input I has more than 2^31 rows");
  ops::CheckSparseIndices(s, pointer, columns);

  plan.K = static_cast<int>(columns.size());
  const int64_t NB = s.num_blocks(), bpg = s.blocks_per_group(), Og = s.per_group();
  plan.row_begin.assign(pointer.begin(), pointer.end());
  plan.columns.assign(columns.begin(), columns.end());
  for (int64_t p = 0; p < NB; ++p) {
    const int64_t id = s.block_order[static_cast<size_t>(p)], g = id / bpg, i = id % bpg;
    plan.group_of.push_back(static_cast<int32_t>(g));
    plan.first.push_back(static_cast<int32_t>(g * Og + i * s.block));
    plan.channels.push_back(static_cast<int32_t>(std::min<int64_t>(s.block, Og - i * s.block)));
  }
  if (s.fc) {
    if (i_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16)
      plan.columns16.assign(columns.begin(), columns.end());
    else
      plan.columns32.assign(columns.begin(), columns.end());
  } else {
    const int64_t taps = s.kernel_h * s.kernel_w;
    plan.row_channel.resize(columns.size());
    plan.row_tap.resize(columns.size());
    for (int64_t p = 0; p < NB; ++p) {
      const int64_t g = s.block_order[static_cast<size_t>(p)] / bpg;
      for (int64_t r = pointer[static_cast<size_t>(p)]; r < pointer[static_cast<size_t>(p) + 1]; ++r) {
        const int64_t col = columns[static_cast<size_t>(r)];
        plan.row_channel[static_cast<size_t>(r)] = static_cast<int32_t>(g * s.group_channels + col / taps);
        plan.row_tap[static_cast<size_t>(r)] = static_cast<int32_t>(col % taps);
      }
    }
  }
  return plan;
}

// Thresholds of the 1x1 path (see Compute), read when a kernel is created; the environment overrides them so that the
// tests can force each path on small layers.
size_t EnvBytes(const char* name, size_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? static_cast<size_t>(std::strtoull(v, nullptr, 10)) : fallback;
}

size_t RoundUp(size_t v, size_t m) { return (v + m - 1) / m * m; }

int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

// The depthwise kernel's limits (cpu/sparse_conv.h, SparseDepthwiseJob); other depthwise nodes take the general path.
bool DepthwiseShape(const ops::SparseConvSpec& s) {
  return !s.fc && s.group_channels == 1 && s.group == s.out_channels && s.dilation_h == 1 && s.dilation_w == 1 &&
         s.stride_h == s.stride_w && (s.stride_h == 1 || s.stride_h == 2) && s.kernel_h <= 7 && s.kernel_w <= 7;
}

// The layout of a call (cpu/sparse_conv.h): in place, subsampled 1x1, or the general padded phase planes.
SparseGeometry MakeGeometry(const ops::SparseConvSpec& s, const std::vector<int64_t>& xs, const float* x, int lanes) {
  SparseGeometry g;
  g.N = xs[0];
  g.C = xs[1];
  g.H = xs[2];
  g.W = xs[3];
  const int64_t Hp = g.H + s.pad_top + s.pad_bottom, Wp = g.W + s.pad_left + s.pad_right;
  const int64_t span_h = s.dilation_h * (s.kernel_h - 1) + 1, span_w = s.dilation_w * (s.kernel_w - 1) + 1;
  if (Hp < span_h || Wp < span_w)
    throw InvalidNode("the padded input " + Str(Hp) + "x" + Str(Wp) + " is smaller than the dilated kernel " +
                      Str(span_h) + "x" + Str(span_w) + " (X shape " + ShapeStr(xs) + ")");
  g.OH = (Hp - span_h) / s.stride_h + 1;
  g.OW = (Wp - span_w) / s.stride_w + 1;
  const int64_t taps = s.kernel_h * s.kernel_w;
  g.tap_offset.assign(static_cast<size_t>(taps), 0);
  const bool pointwise = s.kernel_h == 1 && s.kernel_w == 1 && s.pad_top == 0 && s.pad_left == 0 &&
                         s.pad_bottom == 0 && s.pad_right == 0;
  double plane_floats;
  if (pointwise) {
    const size_t outputs = static_cast<size_t>(g.OH * g.OW);
    g.flat_row = static_cast<int>(g.OW);
    g.vectors = static_cast<int>((outputs + lanes - 1) / lanes);
    g.subsample = s.stride_h > 1 || s.stride_w > 1;
    // The 8-lane tiers read X in place even when it is not vector-aligned, and whatever the plane size (the plane's
    // partial last vector goes through a lane mask): on Zen 3 a copy of X cost more than the loads that cross cache
    // lines (C96 O24 56x56 at 8x, where each input value is read less than once; 7x7 and 14x14 planes).
    const bool aligned = reinterpret_cast<uintptr_t>(x) % (sizeof(float) * lanes) == 0;
    g.in_place = !g.subsample && (lanes == 8 || (aligned && outputs % static_cast<size_t>(lanes) == 0));
    g.plane = g.in_place ? outputs : RoundUp(outputs, 16);
    plane_floats = static_cast<double>(g.plane);
  } else {
    g.phase_rows = static_cast<int>((Hp + s.stride_h - 1) / s.stride_h);
    g.flat_row = static_cast<int>(std::max<int64_t>(g.OW, (Wp + s.stride_w - 1) / s.stride_w));
    g.phase = static_cast<size_t>(g.phase_rows) * g.flat_row;
    g.vectors = static_cast<int>((g.OH * g.flat_row + lanes - 1) / lanes);
    int64_t max_offset = 0;
    for (int64_t ky = 0; ky < s.kernel_h; ++ky) {
      for (int64_t kx = 0; kx < s.kernel_w; ++kx) {
        const int64_t dy = ky * s.dilation_h, dx = kx * s.dilation_w;
        const int64_t phase = (dy % s.stride_h) * s.stride_w + dx % s.stride_w;
        const int64_t off = phase * static_cast<int64_t>(g.phase) + (dy / s.stride_h) * g.flat_row + dx / s.stride_w;
        if (off > std::numeric_limits<int32_t>::max()) throw InvalidNode("the input is too large to index");
        g.tap_offset[static_cast<size_t>(ky * s.kernel_w + kx)] = static_cast<int32_t>(off);
        max_offset = std::max(max_offset, off);
      }
    }
    const double needed = std::max(static_cast<double>(g.phase) * s.stride_h * s.stride_w,
                                   static_cast<double>(g.vectors) * lanes + max_offset);
    plane_floats = static_cast<double>(RoundUp(static_cast<size_t>(needed), 16));
    g.plane = static_cast<size_t>(plane_floats);
  }
  if (plane_floats * static_cast<double>(g.C) >= 2147483647.0)
    throw InvalidNode("the input " + ShapeStr(xs) + " is too large for 32-bit offsets");
  return g;
}

// Input packing (not per tier: a copy, cheap next to the multiply-adds).
struct PackWork {
  const SparseGeometry* g;
  const ops::SparseConvSpec* s;
  const float* x;
  float* packed;
  int channels_per_item;
  int items_per_image;
  bool (*all_finite)(const float*, size_t);
  int* nonfinite;  // set when a packed channel holds NaN or +-inf (checked while it is in cache)
};

void PackChannel(const SparseGeometry& g, const ops::SparseConvSpec& s, const float* x, float* out) {
  if (!g.subsample && g.phase == 0) {  // 1x1 stride 1: copy to an aligned plane
    std::memcpy(out, x, sizeof(float) * static_cast<size_t>(g.H * g.W));
    return;
  }
  if (g.subsample) {
    // Sizes in locals and the rows restrict-qualified: with them read through `s` and `g` in the loop, GCC kept the
    // copy scalar and reloaded the stride from the stack per pixel (the packing took longer than a 1x1 stride-2
    // layer's multiply-adds at 8x); stride 2 as a constant is the vectorised case (ResNet's downsampling shortcuts).
    const int64_t OH = g.OH, OW = g.OW, W = g.W, sh = s.stride_h, sw = s.stride_w;
    for (int64_t oy = 0; oy < OH; ++oy) {
      const float* __restrict row = x + oy * sh * W;
      float* __restrict dst = out + oy * OW;
      if (sw == 2) {
        for (int64_t ox = 0; ox < OW; ++ox) dst[ox] = row[2 * ox];
      } else {
        for (int64_t ox = 0; ox < OW; ++ox) dst[ox] = row[ox * sw];
      }
    }
    return;
  }
  // Phase (py, px) row i, column j holds padded (i * sh + py, j * sw + px); zero outside the image.
  for (int64_t py = 0; py < s.stride_h; ++py) {
    for (int64_t px = 0; px < s.stride_w; ++px) {
      float* phase = out + (py * s.stride_w + px) * g.phase;
      for (int64_t i = 0; i < g.phase_rows; ++i) {
        float* dst = phase + i * g.flat_row;
        const int64_t iy = i * s.stride_h + py - s.pad_top;
        if (iy < 0 || iy >= g.H) {
          std::fill(dst, dst + g.flat_row, 0.0f);
          continue;
        }
        const float* row = x + iy * g.W;
        for (int64_t j = 0; j < g.flat_row; ++j) {
          const int64_t ix = j * s.stride_w + px - s.pad_left;
          dst[j] = ix >= 0 && ix < g.W ? row[ix] : 0.0f;
        }
      }
    }
  }
  const size_t used = g.phase * static_cast<size_t>(s.stride_h * s.stride_w);
  std::fill(out + used, out + g.plane, 0.0f);  // tiles past the last row read here (garbage columns only)
}

void PackItem(void* data, size_t item) {
  const PackWork& w = *static_cast<const PackWork*>(data);
  const int64_t n = static_cast<int64_t>(item) / w.items_per_image;
  const int64_t c0 = (static_cast<int64_t>(item) % w.items_per_image) * w.channels_per_item;
  const int64_t c1 = std::min<int64_t>(w.g->C, c0 + w.channels_per_item);
  const size_t in_plane = static_cast<size_t>(w.g->H * w.g->W);
  for (int64_t c = c0; c < c1; ++c) {
    const size_t nc = static_cast<size_t>(n * w.g->C + c);
    PackChannel(*w.g, *w.s, w.x + nc * in_plane, w.packed + nc * w.g->plane);
  }
  // The item's input channels are contiguous in X and were just read: check them in one vectorised pass.
  const float* first = w.x + static_cast<size_t>(n * w.g->C + c0) * in_plane;
  if (c1 > c0 && !w.all_finite(first, static_cast<size_t>(c1 - c0) * in_plane))
    __atomic_store_n(w.nonfinite, 1, __ATOMIC_RELAXED);
}

// A per-thread buffer reused across calls (no per-call allocation once grown), 64-byte aligned: the packed input of
// a call (taken by the calling thread), or a depthwise strip's padded rows (taken by each worker; that path packs
// nothing, so the two never hold the same thread's buffer at once).
float* Workspace(size_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < floats + 16) buffer.resize(floats + 16);
  auto address = reinterpret_cast<uintptr_t>(buffer.data());
  return reinterpret_cast<float*>((address + 63) & ~static_cast<uintptr_t>(63));
}

struct ConvWork {
  SparseConvTilesFn tiles;
  SparseConvJob job;  // image 0; others offset by their index
  size_t in_image;    // floats of one image's input planes
  size_t out_image;   // floats of one image's output (Y and Z share the layout)
  int positions;
  int positions_per_item, position_items;
  int tiles_per_item, tile_items;
};

void ConvItem(void* data, size_t item) {
  const ConvWork& w = *static_cast<const ConvWork*>(data);
  const size_t per_image = static_cast<size_t>(w.position_items) * w.tile_items;
  const size_t n = item / per_image;
  const int rest = static_cast<int>(item % per_image);
  // Tile chunks outer: consecutive items (threads) share one chunk's input rows in L2.
  const int t0 = (rest / w.position_items) * w.tiles_per_item;
  const int p0 = (rest % w.position_items) * w.positions_per_item;
  SparseConvJob job = w.job;
  job.packed += n * w.in_image;
  job.out += n * w.out_image;
  if (job.residual != nullptr) job.residual += n * w.out_image;
  w.tiles(job, p0, std::min(w.positions, p0 + w.positions_per_item), t0, std::min(job.tiles, t0 + w.tiles_per_item));
}

struct DepthwiseWork {
  SparseDepthwiseFn kernel;
  SparseDepthwiseJob job;
  size_t scratch_floats;  // of one strip
  int channels_per_item, channel_items;
  int strip_rows, strips;
};

void DepthwiseItem(void* data, size_t item) {
  const DepthwiseWork& w = *static_cast<const DepthwiseWork*>(data);
  const size_t per_image = static_cast<size_t>(w.channel_items) * w.strips;
  const int n = static_cast<int>(item / per_image);
  const int rest = static_cast<int>(item % per_image);
  const int c0 = (rest / w.strips) * w.channels_per_item, oy0 = (rest % w.strips) * w.strip_rows;
  w.kernel(w.job, Workspace(w.scratch_floats), n, c0, std::min(w.job.C, c0 + w.channels_per_item), oy0,
           std::min(w.job.OH, oy0 + w.strip_rows));
}

struct FcWork {
  SparseFcFn fc;
  SparseFcJob job;
  int positions, positions_per_item;
  int images;
};

void FcItem(void* data, size_t item) {
  const FcWork& w = *static_cast<const FcWork*>(data);
  const int p0 = static_cast<int>(item) * w.positions_per_item;
  w.fc(w.job, p0, std::min(w.positions, p0 + w.positions_per_item), 0, w.images);
}

}  // namespace

SparseConvKernel::SparseConvKernel(const OrtApi& api, const OrtKernelInfo* info, std::string node)
    : api_(api), node_(std::move(node)) {
  plan_ = BuildPlan(api, info);
  std::string isa_error;
  kernels_ = Kernels(&isa_error);
  if (!isa_error.empty()) throw InvalidNode(isa_error);
  narrow_kernels_ = NarrowPlaneKernels(kernels_);
  stream_bytes_ = EnvBytes("CTPRUNE_SPARSE_STREAM_BYTES", static_cast<size_t>(2) << 20);
  fused_check_bytes_ = EnvBytes("CTPRUNE_SPARSE_FUSED_CHECK_BYTES", static_cast<size_t>(1) << 20);
  pass_bytes_ = static_cast<long>(EnvBytes("CTPRUNE_SPARSE_PASS_BYTES", static_cast<size_t>(128) << 10));
  const char* poison = std::getenv("CTPRUNE_POISON_OUTPUT");
  poison_output_ = poison != nullptr && std::strcmp(poison, "1") == 0;
  depthwise_ = DepthwiseShape(plan_.spec) && EnvInt("CTPRUNE_SPARSE_DEPTHWISE", 1) != 0;
  if (depthwise_) {
    // A constant W of the right shape is made dense once; anything else at run time.
    const float* w = ops::ConstantFloatMatrix(api, info, 1, plan_.K, plan_.spec.block);
    if (w != nullptr) {
      const ops::SparseConvSpec& s = plan_.spec;
      depthwise_weights_.resize(static_cast<size_t>(s.out_channels * s.kernel_h * s.kernel_w));
      DenseDepthwiseWeights(w, depthwise_weights_.data());
    }
  }
}

void SparseConvKernel::DenseDepthwiseWeights(const float* w, float* dense) const {
  const ops::SparseConvSpec& s = plan_.spec;
  const int64_t taps = s.kernel_h * s.kernel_w;
  std::fill(dense, dense + s.out_channels * taps, 0.0f);
  // One output channel per group, so every block holds one channel (lane 0 of its rows) and a column is a tap.
  for (size_t p = 0; p + 1 < plan_.row_begin.size(); ++p)
    for (int32_t r = plan_.row_begin[p]; r < plan_.row_begin[p + 1]; ++r)
      dense[plan_.first[p] * taps + plan_.columns[static_cast<size_t>(r)]] = w[static_cast<size_t>(r) * s.block];
}

void SparseConvKernel::ComputeDepthwise(Ort::KernelContext& ctx, const SparseGeometry& g, const float* x,
                                        const float* w, const SparseEpilogue& epilogue, const float* residual,
                                        float* out) {
  const ops::SparseConvSpec& s = plan_.spec;
  std::vector<float> dense;
  const float* weights = depthwise_weights_.data();
  if (depthwise_weights_.empty()) {
    dense.resize(static_cast<size_t>(s.out_channels * s.kernel_h * s.kernel_w));
    DenseDepthwiseWeights(w, dense.data());
    weights = dense.data();
  }
  // Rows of at most 8 outputs (7x7 planes) in 8-float vectors where the tier's are wider: 16 lanes left 9 idle.
  const SparseKernels& k = g.OW <= kNarrowRowFloats ? narrow_kernels_.sparse : kernels_.sparse;
  const int lanes = k.lanes, stride = static_cast<int>(s.stride_h), kh = static_cast<int>(s.kernel_h);
  DepthwiseWork work{};
  work.kernel = k.depthwise;
  SparseDepthwiseJob& job = work.job;
  job.x = x;
  job.weights = weights;
  job.C = static_cast<int>(g.C);
  job.H = static_cast<int>(g.H);
  job.W = static_cast<int>(g.W);
  job.OH = static_cast<int>(g.OH);
  job.OW = static_cast<int>(g.OW);
  job.kh = kh;
  job.kw = static_cast<int>(s.kernel_w);
  job.stride = stride;
  job.pad_top = static_cast<int>(s.pad_top);
  job.pad_left = static_cast<int>(s.pad_left);
  // A row's loads reach OW rounded up to whole vectors plus the taps' column shift (kx / stride); its copy writes the
  // image's columns in whole vectors from the left pad on (per phase with stride 2).
  const size_t loads = RoundUp(static_cast<size_t>(g.OW), lanes) + static_cast<size_t>(s.kernel_w - 1) / stride;
  const size_t copies = stride == 1
                            ? static_cast<size_t>(s.pad_left) + RoundUp(static_cast<size_t>(g.W), lanes)
                            : static_cast<size_t>(s.pad_left + 1) / 2 + RoundUp(static_cast<size_t>(g.W + 1) / 2, lanes);
  job.row_floats = static_cast<int>(RoundUp(std::max(loads, copies), 16));
  job.residual = residual;
  job.epilogue = epilogue;
  job.out = out;
  // Strips of output rows whose padded input rows fit about half of L1 (16 KB), in multiples of 4 rows (a step of
  // the stride-1 kernel); a plane that fits is one strip, and small planes go several channels to a work item.
  const size_t row_floats = static_cast<size_t>(stride) * job.row_floats;  // one padded input row, every phase
  const int fit_rows = static_cast<int>(4096 / row_floats);
  int strip_rows = std::max(1, (fit_rows - kh) / stride + 1);
  if (strip_rows >= 8) strip_rows -= strip_rows % 4;
  work.strip_rows = std::min(job.OH, strip_rows);
  work.strips = (job.OH + work.strip_rows - 1) / work.strip_rows;
  work.scratch_floats = static_cast<size_t>((work.strip_rows - 1) * stride + kh) * row_floats;
  const int64_t plane = g.OH * g.OW;
  const int64_t per_item =
      work.strips > 1 ? 1 : std::max<int64_t>(1, std::min<int64_t>(16384 / std::max<int64_t>(1, plane), g.C / 8));
  work.channels_per_item = static_cast<int>(per_item);
  work.channel_items = static_cast<int>((g.C + per_item - 1) / per_item);
  ctx.ParallelFor(&DepthwiseItem, static_cast<size_t>(g.N) * work.channel_items * work.strips, 0, &work);
}

std::shared_ptr<const std::vector<int32_t>> SparseConvKernel::Offsets(const SparseGeometry& g) {
  std::lock_guard<std::mutex> lock(offsets_mutex_);
  for (const OffsetsFor& o : offsets_) {
    if (o.H == g.H && o.W == g.W && o.in_place == g.in_place) return o.offsets;
  }
  auto offsets = std::make_shared<std::vector<int32_t>>(static_cast<size_t>(plan_.K));
  for (size_t r = 0; r < offsets->size(); ++r)
    (*offsets)[r] = static_cast<int32_t>(static_cast<size_t>(plan_.row_channel[r]) * g.plane +
                                         g.tap_offset[static_cast<size_t>(plan_.row_tap[r])]);
  constexpr size_t kKeptSizes = 4;
  if (offsets_.size() == kKeptSizes) offsets_.erase(offsets_.begin());
  offsets_.push_back({g.H, g.W, g.in_place, offsets});
  return offsets;
}

bool SparseConvKernel::Kept(int position, int64_t column) const {
  const int32_t* begin = plan_.columns.data() + plan_.row_begin[static_cast<size_t>(position)];
  const int32_t* end = plan_.columns.data() + plan_.row_begin[static_cast<size_t>(position) + 1];
  return std::binary_search(begin, end, static_cast<int32_t>(column));
}

void SparseConvKernel::PoisonPruned(const float* x, const std::vector<int64_t>& xs, int64_t OH, int64_t OW,
                                    float* out) const {
  const ops::SparseConvSpec& s = plan_.spec;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int positions = static_cast<int>(s.num_blocks());
  const int64_t O = s.out_channels;
  if (s.fc) {
    for (int64_t n = 0; n < xs[0]; ++n)
      for (int64_t j = 0; j < xs[1]; ++j) {
        if (std::isfinite(x[n * xs[1] + j])) continue;
        for (int p = 0; p < positions; ++p)
          if (!Kept(p, j))
            std::fill_n(out + n * O + plan_.first[p], plan_.channels[p], nan);
      }
    return;
  }
  const int64_t C = xs[1], H = xs[2], W = xs[3];
  for (int64_t n = 0; n < xs[0]; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t iy = 0; iy < H; ++iy)
        for (int64_t ix = 0; ix < W; ++ix) {
          if (std::isfinite(x[((n * C + c) * H + iy) * W + ix])) continue;
          const int64_t g = c / s.group_channels, local = c % s.group_channels;
          for (int64_t ky = 0; ky < s.kernel_h; ++ky) {
            const int64_t ty = iy + s.pad_top - ky * s.dilation_h;  // = oy * stride_h
            if (ty < 0 || ty % s.stride_h != 0 || ty / s.stride_h >= OH) continue;
            for (int64_t kx = 0; kx < s.kernel_w; ++kx) {
              const int64_t tx = ix + s.pad_left - kx * s.dilation_w;
              if (tx < 0 || tx % s.stride_w != 0 || tx / s.stride_w >= OW) continue;
              const int64_t column = (local * s.kernel_h + ky) * s.kernel_w + kx;
              const int64_t pixel = (ty / s.stride_h) * OW + tx / s.stride_w;
              for (int p = 0; p < positions; ++p) {
                if (plan_.group_of[p] != g || Kept(p, column)) continue;
                for (int b = 0; b < plan_.channels[p]; ++b)
                  out[(n * O + plan_.first[p] + b) * OH * OW + pixel] = nan;
              }
            }
          }
        }
}

OrtStatusPtr SparseConvKernel::ComputeV2(OrtKernelContext* context) {
  return ops::StatusOf(api_, node_, [&] { Compute(context); });
}

void SparseConvKernel::Compute(OrtKernelContext* context) {
  Ort::KernelContext ctx(context);
  const ops::SparseConvSpec& s = plan_.spec;
  const size_t input_count = ctx.GetInputCount();
  Ort::ConstValue x = ctx.GetInput(0);
  Ort::ConstValue w = ctx.GetInput(1);
  Ort::ConstValue b = input_count > 4 ? ctx.GetInput(4) : Ort::ConstValue{nullptr};
  Ort::ConstValue z = input_count > 5 ? ctx.GetInput(5) : Ort::ConstValue{nullptr};

  const std::vector<int64_t> ws = w.GetTensorTypeAndShapeInfo().GetShape();
  if (ws.size() != 2 || ws[0] != plan_.K || ws[1] != s.block)
    throw InvalidNode("W must have shape (" + Str(plan_.K) + ", " + Str(s.block) + ") (one row per kept column), got " +
                      ShapeStr(ws));
  const float* bias = nullptr;
  if (b) {
    const std::vector<int64_t> bs = b.GetTensorTypeAndShapeInfo().GetShape();
    if (bs.size() != 1 || bs[0] != s.out_channels)
      throw InvalidNode("B must have shape (" + Str(s.out_channels) + ",), got " + ShapeStr(bs));
    bias = b.GetTensorData<float>();
  }
  const std::vector<int64_t> xs = x.GetTensorTypeAndShapeInfo().GetShape();
  if (s.fc) {
    if (xs.size() != 2 || xs[1] != s.group_channels)
      throw InvalidNode("X must have shape (N, " + Str(s.group_channels) + ") for an FC SparseConv, got " +
                        ShapeStr(xs));
    ComputeFc(ctx, x.GetTensorData<float>(), xs[0], w.GetTensorData<float>(), bias, z);
    const size_t x_size = static_cast<size_t>(xs[0] * xs[1]);
    if (!kernels_.sparse.all_finite(x.GetTensorData<float>(), x_size))
      PoisonPruned(x.GetTensorData<float>(), xs, 1, 1, ctx.GetOutput(0, {xs[0], s.out_channels}).GetTensorMutableData<float>());
    return;
  }
  if (xs.size() != 4) throw InvalidNode("X must be 4-D (N, C, H, W), got shape " + ShapeStr(xs));
  if (xs[1] != s.group * s.group_channels)
    throw InvalidNode("X has " + Str(xs[1]) + " channels but group * weight_shape[1] is " +
                      Str(s.group * s.group_channels) + " (X shape " + ShapeStr(xs) + ")");
  const float* x_data = x.GetTensorData<float>();
  const SparseKernels& k = kernels_.sparse;
  const SparseGeometry g = MakeGeometry(s, xs, x_data, k.lanes);

  const std::vector<int64_t> y_shape = {g.N, s.out_channels, g.OH, g.OW};
  float z_offset = 0.0f;
  const float* residual = nullptr;
  if (z) {
    if (ops::ResidualElements(z.GetTensorTypeAndShapeInfo().GetShape(), y_shape) == 1)
      z_offset = z.GetTensorData<float>()[0];
    else
      residual = z.GetTensorData<float>();
  }
  Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
  float* out = y.GetTensorMutableData<float>();
  const size_t out_image = static_cast<size_t>(s.out_channels * g.OH * g.OW);
  if (poison_output_) std::fill(out, out + out_image * g.N, std::numeric_limits<float>::quiet_NaN());
  if (g.N == 0) return;
  if (depthwise_) {
    ComputeDepthwise(ctx, g, x_data, w.GetTensorData<float>(),
                     SparseEpilogue{bias, z_offset, s.activation_min, s.activation_max, s.has_clamp(),
                                    static_cast<int>(s.activation), s.activation_alpha, s.activation_beta},
                     residual, out);
    return;
  }

  // 1. The input planes: X itself, or packed in parallel.
  // Whether X holds NaN or +-inf is found on the way: while packing, or by the tile loop when X is read in place.
  int nonfinite = 0;
  const float* planes = x_data;
  if (!g.in_place) {
    float* packed = Workspace(static_cast<size_t>(g.N * g.C) * g.plane);
    PackWork pack{&g, &s, x_data, packed, 1, 0, k.all_finite, &nonfinite};
    pack.channels_per_item = static_cast<int>(std::max<size_t>(1, 16384 / g.plane));
    pack.items_per_image = static_cast<int>((g.C + pack.channels_per_item - 1) / pack.channels_per_item);
    ctx.ParallelFor(&PackItem, static_cast<size_t>(g.N) * pack.items_per_image, 0, &pack);
    planes = packed;
  }

  // 2. The blocks over tiles. A work item is a run of block positions (stored by decreasing work) over a chunk of
  // tiles whose input rows of all channels fit about a quarter of L2 while every block of the item reads them.
  const std::shared_ptr<const std::vector<int32_t>> offsets = Offsets(g);
  const int bi = BlockIndex(static_cast<int>(s.block));
  ConvWork work{};
  work.tiles = k.conv[bi];
  SparseConvJob& job = work.job;
  job.packed = planes;
  job.offsets = offsets->data();
  job.values = w.GetTensorData<float>();
  job.row_begin = plan_.row_begin.data();
  job.first = plan_.first.data();
  job.channels = plan_.channels.data();
  job.block = static_cast<int>(s.block);
  job.flat_row = g.flat_row;
  job.OH = static_cast<int>(g.OH);
  job.OW = static_cast<int>(g.OW);
  job.vectors = g.vectors;
  job.tiles = (g.vectors + k.tile_vectors[bi] - 1) / k.tile_vectors[bi];
  job.tile_vectors = (g.vectors + job.tiles - 1) / job.tiles;
  // The 8-lane tiers run each block over a pass of tiles whose input of all channels fits a quarter of L2: with few
  // input channels a block has few rows per tile, and writing each output plane one tile at a time across every block
  // was memory-bound (AVX2 on Zen 3, C16 O96 112x112 at 8x: 0.3-0.6x dense before, 0.8-1.4x after); passes that fit
  // half of L1 (16 KB) cost a call per block and tile on C 128-512 at 14-56 px (one-process A/B, 8x, 22 1x1 shapes:
  // 64 KB and 128 KB +5-10% on the medians against 16 KB, 256 KB and whole planes no better). The 16-lane tiers keep
  // one tile per pass (not measured there).
  const long tile_bytes = static_cast<long>(job.tile_vectors) * k.lanes * static_cast<long>(sizeof(float));
  job.pass_tiles = k.lanes == 8 ? static_cast<int>(std::max(1L, pass_bytes_ / (tile_bytes * g.C))) : 1;
  // AVX2 on Zen 3: with C >= 512 (a tile's input >= 48 KB) prefetching gained up to 1.25x (C2048 O512 7x7); at C 256-320
  // (24-30 KB) it lost up to 10%.
  job.prefetch = tile_bytes * g.C > (40L << 10);
  job.tail = job.flat_row == job.OW ? static_cast<int>((g.OH * g.OW) % k.lanes) : 0;
  job.residual = residual;
  job.epilogue = SparseEpilogue{bias, z_offset, s.activation_min, s.activation_max, s.has_clamp(),
                                static_cast<int>(s.activation), s.activation_alpha, s.activation_beta};
  job.out = out;
  // Streaming stores once Y is well past L2 (a regular store reads each line first and evicts the input), measured
  // faster with C >= 32 (C64 O256 56x56 at 8x: 1.4x) and no better with fewer channels (C16 O96 112x112); the full
  // vectors must be aligned: Y aligned and every plane a whole number of vectors.
  const size_t y_bytes = out_image * static_cast<size_t>(g.N) * sizeof(float);
  job.stream = y_bytes >= stream_bytes_ && (g.C >= 32 || stream_bytes_ == 0) &&
               reinterpret_cast<uintptr_t>(out) % (sizeof(float) * k.lanes) == 0 && (g.OH * g.OW) % k.lanes == 0 &&
               job.flat_row == job.OW;
  // X read in place: an input that fits L2 is checked in one sequential pass first (which leaves it in L2 for the
  // blocks; measured faster there); a larger one inside the tile loop, so that it comes from memory once.
  const size_t x_bytes = static_cast<size_t>(g.N * g.C * g.H * g.W) * sizeof(float);
  const bool fused_check = g.in_place && x_bytes >= fused_check_bytes_;
  if (g.in_place && !fused_check && !k.all_finite(x_data, x_bytes / sizeof(float))) nonfinite = 1;
  job.check_channels = fused_check ? static_cast<int>(g.C) : 0;
  job.check_plane = g.plane;
  job.nonfinite = &nonfinite;
  work.in_image = static_cast<size_t>(g.C) * g.plane;
  work.out_image = out_image;
  work.positions = static_cast<int>(s.num_blocks());
  const long tile_floats = static_cast<long>(job.tile_vectors) * k.lanes;
  const long chunk_tiles = std::max(1L, (64L * 1024 / static_cast<long>(g.C)) / tile_floats);
  work.tiles_per_item = static_cast<int>(std::min<long>(chunk_tiles, job.tiles));
  work.tile_items = (job.tiles + work.tiles_per_item - 1) / work.tiles_per_item;
  const int position_items_wanted = std::max(1, std::min(work.positions, 16 / std::min(16, work.tile_items)));
  work.positions_per_item = (work.positions + position_items_wanted - 1) / position_items_wanted;
  work.position_items = (work.positions + work.positions_per_item - 1) / work.positions_per_item;
  ctx.ParallelFor(&ConvItem, static_cast<size_t>(g.N) * work.position_items * work.tile_items, 0, &work);
  if (__atomic_load_n(&nonfinite, __ATOMIC_RELAXED) != 0) PoisonPruned(x_data, xs, g.OH, g.OW, out);
}

void SparseConvKernel::ComputeFc(Ort::KernelContext& ctx, const float* x, int64_t N, const float* w,
                                 const float* bias, Ort::ConstValue& z) {
  const ops::SparseConvSpec& s = plan_.spec;
  const std::vector<int64_t> y_shape = {N, s.out_channels};
  float z_offset = 0.0f;
  const float* residual = nullptr;
  if (z) {
    if (ops::ResidualElements(z.GetTensorTypeAndShapeInfo().GetShape(), y_shape) == 1)
      z_offset = z.GetTensorData<float>()[0];
    else
      residual = z.GetTensorData<float>();
  }
  Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
  float* out = y.GetTensorMutableData<float>();
  if (poison_output_)
    std::fill(out, out + static_cast<size_t>(N * s.out_channels), std::numeric_limits<float>::quiet_NaN());
  if (N == 0) return;
  FcWork work{};
  work.fc = kernels_.sparse.fc;
  SparseFcJob& job = work.job;
  job.x = x;
  job.inputs = static_cast<int>(s.group_channels);
  job.outputs = static_cast<int>(s.out_channels);
  job.wide = plan_.columns16.empty() && !plan_.columns32.empty();
  job.columns = job.wide ? static_cast<const void*>(plan_.columns32.data()) : plan_.columns16.data();
  job.values = w;
  job.row_begin = plan_.row_begin.data();
  job.first = plan_.first.data();
  job.channels = plan_.channels.data();
  job.block = static_cast<int>(s.block);
  job.residual = residual;
  job.epilogue = SparseEpilogue{bias, z_offset, s.activation_min, s.activation_max, s.has_clamp(),
                                static_cast<int>(s.activation), s.activation_alpha, s.activation_beta};
  job.out = out;
  work.positions = static_cast<int>(s.num_blocks());
  work.images = static_cast<int>(N);
  // About 64 KB of compact weights per item, and no more than 64 items.
  const long bytes = static_cast<long>(plan_.K) * s.block * 4 + 1;
  const long items = std::max(1L, std::min({64L, static_cast<long>(work.positions), bytes / (64 * 1024) + 1}));
  work.positions_per_item = static_cast<int>((work.positions + items - 1) / items);
  ctx.ParallelFor(&FcItem, static_cast<size_t>((work.positions + work.positions_per_item - 1) / work.positions_per_item),
                  0, &work);
}

OrtStatusPtr SparseConvOp::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
  const std::string node = ops::NodeLabel(api, info, ops::kSparseConvName);
  return ops::StatusOf(api, node, [&] { *kernel = new SparseConvKernel(api, info, node); });
}

}  // namespace cpu
}  // namespace ctprune
