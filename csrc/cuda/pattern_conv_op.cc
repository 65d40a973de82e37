#include "cuda/pattern_conv_op.h"

#include <cuda_runtime.h>

#include <stdexcept>

#include "ops/kernel_info.h"
#include "ops/op_status.h"

namespace ctprune {
namespace cuda {
namespace {

using ops::InvalidNode;
using ops::ShapeStr;

CtprunePatternConvDesc DescOf(const ops::PatternConvSpec& s) {
  CtprunePatternConvDesc d{};
  d.out_channels = s.out_channels;
  d.in_channels = s.in_channels;
  d.patterns = s.patterns.data();
  d.num_patterns = s.num_patterns();
  d.kernel_filters = s.kernel_filters.data();
  d.kernel_channels = s.kernel_channels.data();
  d.kernel_patterns = s.kernel_patterns.data();
  d.num_kernels = s.num_kernels();
  d.stride_h = s.stride_h;
  d.stride_w = s.stride_w;
  d.pad_top = s.pad_top;
  d.pad_left = s.pad_left;
  d.pad_bottom = s.pad_bottom;
  d.pad_right = s.pad_right;
  d.activation_min = s.activation_min;
  d.activation_max = s.activation_max;
  return d;
}

}  // namespace

PatternConvCudaKernel::PatternConvCudaKernel(const OrtApi& api, const OrtKernelInfo* info, std::string node)
    : api_(api), node_(std::move(node)) {
  spec_ = ops::ParsePatternConv(ops::ReadAttributes(api, info, ops::PatternConvAttributeNames()));
  desc_ = DescOf(spec_);
  packed_ = PackPatternConv(spec_);  // the upload waits for the first run on a device
}

PatternConvCudaKernel::~PatternConvCudaKernel() {
  for (auto& entry : per_device_) ctprune_pattern_conv_cuda_release(entry.second);
}

OrtStatusPtr PatternConvCudaKernel::ComputeV2(OrtKernelContext* context) {
  return ops::StatusOf(api_, node_, [&] { Compute(context); });
}

void PatternConvCudaKernel::Compute(OrtKernelContext* context) {
  Ort::KernelContext ctx(context);
  Ort::ConstValue x = ctx.GetInput(0);
  Ort::ConstValue w = ctx.GetInput(1);
  const size_t input_count = ctx.GetInputCount();
  Ort::ConstValue b = input_count > 2 ? ctx.GetInput(2) : Ort::ConstValue{nullptr};
  Ort::ConstValue z = input_count > 3 ? ctx.GetInput(3) : Ort::ConstValue{nullptr};

  // Shapes first, before anything is allocated.
  const std::vector<int64_t> xs = x.GetTensorTypeAndShapeInfo().GetShape();
  if (xs.size() != 4) throw InvalidNode("X must be 4-D (N, C, H, W), got shape " + ShapeStr(xs));
  if (xs[1] != packed_.in_channels)
    throw InvalidNode("X has " + std::to_string(xs[1]) + " channels but weight_shape says " +
                      std::to_string(packed_.in_channels) + " (X shape " + ShapeStr(xs) + ")");
  const std::vector<int64_t> ws = w.GetTensorTypeAndShapeInfo().GetShape();
  if (ws.size() != 2 || ws[0] != packed_.num_kernels || ws[1] != 4)
    throw InvalidNode("W must have shape (" + std::to_string(packed_.num_kernels) +
                      ", 4) (one row per kept kernel), got " + ShapeStr(ws));
  const float* bias = nullptr;
  if (b) {
    const std::vector<int64_t> bs = b.GetTensorTypeAndShapeInfo().GetShape();
    if (bs.size() != 1 || bs[0] != packed_.out_channels)
      throw InvalidNode("B must have shape (" + std::to_string(packed_.out_channels) + ",), got " + ShapeStr(bs));
    bias = b.GetTensorData<float>();
  }
  const int64_t padded_h = xs[2] + packed_.pad_top + packed_.pad_bottom;
  const int64_t padded_w = xs[3] + packed_.pad_left + packed_.pad_right;
  if (xs[2] < 1 || xs[3] < 1 || padded_h < 3 || padded_w < 3)
    throw InvalidNode("input height and width plus pads must be at least 3, got X shape " + ShapeStr(xs));
  const int64_t oh = (padded_h - 3) / packed_.stride_h + 1, ow = (padded_w - 3) / packed_.stride_w + 1;
  // Z, the fused residual: one element (added to every output) or exactly Y's shape.
  const std::vector<int64_t> y_shape = {xs[0], static_cast<int64_t>(packed_.out_channels), oh, ow};
  const float* residual = nullptr;
  int64_t z_elements = 0;
  if (z) {
    z_elements = ops::ResidualElements(z.GetTensorTypeAndShapeInfo().GetShape(), y_shape);
    residual = z.GetTensorData<float>();
  }
  Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
  if (xs[0] == 0) return;

  const int status = ctprune_pattern_conv_cuda(OnCurrentDevice(), x.GetTensorData<float>(), w.GetTensorData<float>(),
                                               bias, residual, z_elements, y.GetTensorMutableData<float>(), xs[0],
                                               xs[2], xs[3], ctx.GetGPUComputeStream(), 0);
  if (status != 0) throw std::runtime_error(ctprune_pattern_conv_cuda_status_string(status));
}

const CtprunePatternConvGpu* PatternConvCudaKernel::OnCurrentDevice() {
  int device = -1;
  const cudaError_t got = cudaGetDevice(&device);
  if (got != cudaSuccess) throw std::runtime_error(cudaGetErrorString(got));
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& entry : per_device_)
    if (entry.first == device) return entry.second;
  CtprunePatternConvGpu* gpu = nullptr;
  char err[512] = {0};
  const int status = ctprune_pattern_conv_cuda_prepare(&desc_, &gpu, err, sizeof(err));
  if (status == CTPRUNE_CUDA_INVALID_ATTRIBUTES) throw InvalidNode(err);
  if (status != 0) throw std::runtime_error(ctprune_pattern_conv_cuda_status_string(status));
  per_device_.emplace_back(device, gpu);
  return gpu;
}

OrtStatusPtr PatternConvCudaOp::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
  const std::string node = ops::NodeLabel(api, info, ops::kPatternConvName, " (CUDA)");
  return ops::StatusOf(api, node, [&] { *kernel = new PatternConvCudaKernel(api, info, node); });
}

}  // namespace cuda
}  // namespace ctprune
