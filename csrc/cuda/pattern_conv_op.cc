// ai.ctprune.PatternConv (version 1) on onnxruntime's CUDAExecutionProvider (operator: ops/PatternConv.md).
// Same attributes, inputs and checks as the CPU op; X, W, B, Z and Y live in device memory, and the kernel runs on the
// compute stream onnxruntime hands over (KernelContext::GetGPUComputeStream), so it orders with the provider's own
// kernels. The packed kernel lists are uploaded once per device, on first use there.
#include <cuda_runtime.h>

#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cuda/cuda_ops.h"
#include "cuda/pattern_conv_cuda.h"
#include "cuda/pattern_conv_layout.h"
#include "ops/node_attributes.h"

namespace ctprune {
namespace cuda {
namespace {

using ops::ScalarOr;
using ops::ShapeStr;

// A malformed node or input: reported as ORT_INVALID_ARGUMENT naming the node.
struct InvalidNode : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::vector<int64_t> Ints(const Ort::ConstKernelInfo& info, const char* name, const std::vector<int64_t>* fallback) {
  try {
    return info.GetAttributes<int64_t>(name);
  } catch (const Ort::Exception&) {
    if (fallback) return *fallback;  // attribute absent: the spec's default
    throw InvalidNode(std::string("required attribute '") + name + "' is missing or not a list of ints");
  }
}

class PatternConvCudaKernel {
 public:
  PatternConvCudaKernel(const OrtApi& api, const OrtKernelInfo* info) : api_(api) {
    Ort::ConstKernelInfo ki(info);
    node_ = "PatternConv node '" + ki.GetNodeName() + "' (CUDA)";
    const std::vector<int64_t> one_one{1, 1}, zeros{0, 0, 0, 0};
    weight_shape_ = Ints(ki, "weight_shape", nullptr);
    patterns_ = Ints(ki, "patterns", nullptr);
    filters_ = Ints(ki, "kernel_filters", nullptr);
    channels_ = Ints(ki, "kernel_channels", nullptr);
    kernel_patterns_ = Ints(ki, "kernel_patterns", nullptr);
    const std::vector<int64_t> strides = Ints(ki, "strides", &one_one), pads = Ints(ki, "pads", &zeros);
    const std::vector<int64_t> dilations = Ints(ki, "dilations", &one_one);
    const int64_t group = ScalarOr<int64_t>(ki, "group", 1);
    if (weight_shape_.size() != 4 || weight_shape_[2] != 3 || weight_shape_[3] != 3)
      throw InvalidNode("weight_shape must be [O, C, 3, 3], got " + ShapeStr(weight_shape_));
    if (patterns_.size() % 4 != 0) throw InvalidNode("patterns must hold 4 taps per pattern");
    if (channels_.size() != filters_.size() || kernel_patterns_.size() != filters_.size())
      throw InvalidNode("kernel_filters, kernel_channels and kernel_patterns must have the same length");
    if (strides.size() != 2) throw InvalidNode("strides must have 2 values, got " + ShapeStr(strides));
    if (pads.size() != 4) throw InvalidNode("pads must have 4 values [top, left, bottom, right], got " + ShapeStr(pads));
    if (dilations != one_one) throw InvalidNode("dilations must be [1, 1], got " + ShapeStr(dilations));
    if (group != 1) throw InvalidNode("group must be 1, got " + std::to_string(group));

    desc_ = CtprunePatternConvDesc{};
    desc_.out_channels = weight_shape_[0];
    desc_.in_channels = weight_shape_[1];
    desc_.patterns = patterns_.data();
    desc_.num_patterns = static_cast<int64_t>(patterns_.size() / 4);
    desc_.kernel_filters = filters_.data();
    desc_.kernel_channels = channels_.data();
    desc_.kernel_patterns = kernel_patterns_.data();
    desc_.num_kernels = static_cast<int64_t>(filters_.size());
    desc_.stride_h = strides[0];
    desc_.stride_w = strides[1];
    desc_.pad_top = pads[0];
    desc_.pad_left = pads[1];
    desc_.pad_bottom = pads[2];
    desc_.pad_right = pads[3];
    desc_.activation_min = ScalarOr<float>(ki, "activation_min", -std::numeric_limits<float>::infinity());
    desc_.activation_max = ScalarOr<float>(ki, "activation_max", std::numeric_limits<float>::infinity());
    // Validate now, at session creation (the upload waits for the first run on a device).
    const std::string problem = PackPatternConv(desc_, packed_);
    if (!problem.empty()) throw InvalidNode(problem);
  }

  ~PatternConvCudaKernel() {
    for (auto& entry : per_device_) ctprune_pattern_conv_cuda_release(entry.second);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const InvalidNode& e) {
      return api_.CreateStatus(ORT_INVALID_ARGUMENT, (node_ + ": " + e.what()).c_str());
    } catch (const Ort::Exception& e) {
      return api_.CreateStatus(e.GetOrtErrorCode(), (node_ + ": " + e.what()).c_str());
    } catch (const std::exception& e) {
      return api_.CreateStatus(ORT_FAIL, (node_ + ": " + e.what()).c_str());
    }
  }

 private:
  void Compute(OrtKernelContext* context) {
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
    const int64_t oh = xs[2] + packed_.pad_top + packed_.pad_bottom < 3
                           ? 0 : (xs[2] + packed_.pad_top + packed_.pad_bottom - 3) / packed_.stride_h + 1;
    const int64_t ow = xs[3] + packed_.pad_left + packed_.pad_right < 3
                           ? 0 : (xs[3] + packed_.pad_left + packed_.pad_right - 3) / packed_.stride_w + 1;
    if (oh < 1 || ow < 1)
      throw InvalidNode("input " + ShapeStr(xs) + " is smaller than the 3x3 kernel with these pads");
    // Z, the fused residual: one element (added to every output) or exactly Y's shape.
    const std::vector<int64_t> y_shape = {xs[0], static_cast<int64_t>(packed_.out_channels), oh, ow};
    const float* residual = nullptr;
    int64_t z_elements = 0;
    if (z) {
      z_elements = ops::ResidualElements<InvalidNode>(z.GetTensorTypeAndShapeInfo().GetShape(), y_shape);
      residual = z.GetTensorData<float>();
    }
    Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
    if (xs[0] == 0) return;

    const int status = ctprune_pattern_conv_cuda(OnCurrentDevice(), x.GetTensorData<float>(), w.GetTensorData<float>(),
                                                 bias, residual, z_elements, y.GetTensorMutableData<float>(), xs[0],
                                                 xs[2], xs[3], ctx.GetGPUComputeStream(), 0);
    if (status != 0) throw std::runtime_error(ctprune_pattern_conv_cuda_status_string(status));
  }

  // The packed layout on the current device (onnxruntime sets it for the provider's thread), uploaded on first use.
  const CtprunePatternConvGpu* OnCurrentDevice() {
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

  const OrtApi& api_;
  std::string node_;
  std::vector<int64_t> weight_shape_, patterns_, filters_, channels_, kernel_patterns_;  // desc_ points into these
  CtprunePatternConvDesc desc_;
  PackedPatternConv packed_;
  std::mutex mutex_;
  std::vector<std::pair<int, CtprunePatternConvGpu*>> per_device_;
};

struct PatternConvCudaOp : Ort::CustomOpBase<PatternConvCudaOp, PatternConvCudaKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    std::string node = "PatternConv node";
    try {
      node = "PatternConv node '" + Ort::ConstKernelInfo(info).GetNodeName() + "' (CUDA)";
      *kernel = new PatternConvCudaKernel(api, info);
      return nullptr;
    } catch (const InvalidNode& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, (node + ": " + e.what()).c_str());
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), (node + ": " + e.what()).c_str());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, (node + ": " + e.what()).c_str());
    }
  }
  const char* GetName() const { return "PatternConv"; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return 4; }  // X, W, B (optional), Z (optional)
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

void RegisterOps(Ort::CustomOpDomain& domain) {
  static const PatternConvCudaOp pattern_conv;  // must outlive every session: static
  domain.Add(&pattern_conv);
}

}  // namespace cuda
}  // namespace ctprune
