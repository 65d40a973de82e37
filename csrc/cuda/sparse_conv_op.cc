#include "cuda/sparse_conv_op.h"

#include <cuda_runtime.h>

#include <stdexcept>

#include "ops/kernel_info.h"
#include "ops/op_status.h"

namespace ctprune {
namespace cuda {
namespace {

using ops::InvalidNode;
using ops::ShapeStr;

constexpr size_t kInputI = 2, kInputP = 3;

std::string Str(int64_t v) { return std::to_string(v); }

}  // namespace

SparseConvCudaKernel::SparseConvCudaKernel(const OrtApi& api, const OrtKernelInfo* info, std::string node)
    : api_(api), node_(std::move(node)) {
  const ops::SparseConvSpec spec =
      ops::ParseSparseConv(ops::ReadAttributes(api, info, ops::SparseConvAttributeNames()));
  ONNXTensorElementDataType i_type, p_type;
  columns_ = ops::ConstantIndexInput(api, info, kInputI, "I", &i_type);
  pointer_ = ops::ConstantIndexInput(api, info, kInputP, "P", &p_type);
  if (p_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) throw InvalidNode("input P must be int32");
  if (i_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16 && i_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32)
    throw InvalidNode("input I must be uint16 or int32");
  if (i_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16 && spec.columns() > 65536)
    throw InvalidNode("input I is uint16 but the column space has " + Str(spec.columns()) + " columns");
  if (columns_.size() >= (size_t{1} << 31)) throw InvalidNode("input I has more than 2^31 rows");
  ops::CheckSparseIndices(spec, pointer_, columns_);
  packed_ = PackSparseConv(spec, pointer_, columns_);
  block_order_ = spec.block_order;
  desc_ = CtpruneSparseConvDesc{};
  desc_.fc = spec.fc ? 1 : 0;
  desc_.out_channels = spec.out_channels;
  desc_.group_channels = spec.group_channels;
  desc_.kernel_h = spec.kernel_h;
  desc_.kernel_w = spec.kernel_w;
  desc_.block = spec.block;
  desc_.group = spec.group;
  desc_.block_order = block_order_.data();
  desc_.num_blocks = static_cast<int64_t>(block_order_.size());
  desc_.pointer = pointer_.data();
  desc_.columns = columns_.data();
  desc_.num_rows = static_cast<int64_t>(columns_.size());
  desc_.stride_h = spec.stride_h;
  desc_.stride_w = spec.stride_w;
  desc_.pad_top = spec.pad_top;
  desc_.pad_left = spec.pad_left;
  desc_.pad_bottom = spec.pad_bottom;
  desc_.pad_right = spec.pad_right;
  desc_.dilation_h = spec.dilation_h;
  desc_.dilation_w = spec.dilation_w;
  desc_.activation_min = spec.activation_min;
  desc_.activation_max = spec.activation_max;
  desc_.activation = spec.activation;
  desc_.activation_alpha = spec.activation_alpha;
  desc_.activation_beta = spec.activation_beta;
}

SparseConvCudaKernel::~SparseConvCudaKernel() {
  for (auto& entry : per_device_) ctprune_sparse_conv_cuda_release(entry.second);
}

OrtStatusPtr SparseConvCudaKernel::ComputeV2(OrtKernelContext* context) {
  return ops::StatusOf(api_, node_, [&] { Compute(context); });
}

void SparseConvCudaKernel::Compute(OrtKernelContext* context) {
  Ort::KernelContext ctx(context);
  const ops::SparseConvSpec& s = packed_.spec;
  const size_t input_count = ctx.GetInputCount();
  Ort::ConstValue x = ctx.GetInput(0);
  Ort::ConstValue w = ctx.GetInput(1);
  Ort::ConstValue b = input_count > 4 ? ctx.GetInput(4) : Ort::ConstValue{nullptr};
  Ort::ConstValue z = input_count > 5 ? ctx.GetInput(5) : Ort::ConstValue{nullptr};

  // Shapes first, before anything is allocated.
  const std::vector<int64_t> ws = w.GetTensorTypeAndShapeInfo().GetShape();
  if (ws.size() != 2 || ws[0] != packed_.num_rows || ws[1] != s.block)
    throw InvalidNode("W must have shape (" + Str(packed_.num_rows) + ", " + Str(s.block) +
                      ") (one row per kept column), got " + ShapeStr(ws));
  const float* bias = nullptr;
  if (b) {
    const std::vector<int64_t> bs = b.GetTensorTypeAndShapeInfo().GetShape();
    if (bs.size() != 1 || bs[0] != s.out_channels)
      throw InvalidNode("B must have shape (" + Str(s.out_channels) + ",), got " + ShapeStr(bs));
    bias = b.GetTensorData<float>();
  }
  const std::vector<int64_t> xs = x.GetTensorTypeAndShapeInfo().GetShape();
  std::vector<int64_t> y_shape;
  int64_t h = 1, width = 1;
  if (s.fc) {
    if (xs.size() != 2 || xs[1] != s.group_channels)
      throw InvalidNode("X must have shape (N, " + Str(s.group_channels) + ") for an FC SparseConv, got " +
                        ShapeStr(xs));
    y_shape = {xs[0], s.out_channels};
  } else {
    if (xs.size() != 4) throw InvalidNode("X must be 4-D (N, C, H, W), got shape " + ShapeStr(xs));
    if (xs[1] != s.group * s.group_channels)
      throw InvalidNode("X has " + Str(xs[1]) + " channels but group * weight_shape[1] is " +
                        Str(s.group * s.group_channels) + " (X shape " + ShapeStr(xs) + ")");
    h = xs[2];
    width = xs[3];
    const int64_t span_h = s.dilation_h * (s.kernel_h - 1) + 1, span_w = s.dilation_w * (s.kernel_w - 1) + 1;
    const int64_t hp = h + s.pad_top + s.pad_bottom, wp = width + s.pad_left + s.pad_right;
    if (h < 1 || width < 1 || hp < span_h || wp < span_w)
      throw InvalidNode("the padded input is smaller than the dilated kernel (X shape " + ShapeStr(xs) + ")");
    y_shape = {xs[0], s.out_channels, (hp - span_h) / s.stride_h + 1, (wp - span_w) / s.stride_w + 1};
  }
  const float* residual = nullptr;
  int64_t z_elements = 0;
  if (z) {
    z_elements = ops::ResidualElements(z.GetTensorTypeAndShapeInfo().GetShape(), y_shape);
    residual = z.GetTensorData<float>();
  }
  Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
  if (xs[0] == 0) return;
  const int status = ctprune_sparse_conv_cuda(OnCurrentDevice(), x.GetTensorData<float>(), w.GetTensorData<float>(),
                                              bias, residual, z_elements, y.GetTensorMutableData<float>(), xs[0],
                                              xs[1], h, width, ctx.GetGPUComputeStream());
  if (status != 0) throw std::runtime_error(ctprune_sparse_conv_cuda_status_string(status));
}

const CtpruneSparseConvGpu* SparseConvCudaKernel::OnCurrentDevice() {
  int device = -1;
  const cudaError_t got = cudaGetDevice(&device);
  if (got != cudaSuccess) throw std::runtime_error(cudaGetErrorString(got));
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& entry : per_device_)
    if (entry.first == device) return entry.second;
  CtpruneSparseConvGpu* gpu = nullptr;
  char err[512] = {0};
  const int status = ctprune_sparse_conv_cuda_prepare(&desc_, &gpu, err, sizeof(err));
  if (status == CTPRUNE_CUDA_INVALID_ATTRIBUTES) throw InvalidNode(err);
  if (status != 0) throw std::runtime_error(ctprune_sparse_conv_cuda_status_string(status));
  per_device_.emplace_back(device, gpu);
  return gpu;
}

OrtStatusPtr SparseConvCudaOp::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
  const std::string node = ops::NodeLabel(api, info, ops::kSparseConvName, " (CUDA)");
  return ops::StatusOf(api, node, [&] { *kernel = new SparseConvCudaKernel(api, info, node); });
}

}  // namespace cuda
}  // namespace ctprune
