// ai.ctprune.PatternConv (version 1) on the CPU execution provider; the operator is specified in ops/PatternConv.md.
// It computes clip(Conv(X, W_dense, B, strides, pads) + Z, activation_min, activation_max), the same as this
// standard-ONNX composition (what the model-local function in ctprune/ops does):
//     W_dense = ScatterND(zeros(O*C*9), flat indices of each kept kernel's 4 taps, W) reshaped to (O, C, 3, 3)
//     Y = Clip(Add(Conv(X, W_dense, B, strides=strides, pads=pads), Z), activation_min, activation_max)
// where Z (optional, the residual of a fused Add) has one element or Y's shape.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/pattern_conv_nonfinite.h"
#include "cpu/pattern_conv_plan.h"
#include "ops/ort_api.h"
#include "ops/pattern_conv_spec.h"

namespace ctprune {
namespace cpu {

class PatternConvKernel {
 public:
  // Reads and checks the attributes (ops/pattern_conv_spec.h); throws ops::InvalidNode on a malformed node.
  PatternConvKernel(const OrtApi& api, const OrtKernelInfo* info, std::string node);
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

 private:
  void Compute(OrtKernelContext* context);
  // The kept kernels' tap offsets for an input size, made on first use and kept (a model sees few input sizes).
  std::shared_ptr<const std::vector<int32_t>> Offsets(const ConvGeometry& g);
  // The kept kernels by input channel, made the first time an input holds a NaN or +-Inf.
  std::shared_ptr<const ChannelKernels> KernelsByChannel();

  const OrtApi& api_;
  std::string node_;  // "PatternConv node 'name'" for error messages
  PatternConvPlan plan_;
  KernelTable kernels_;
  int direct_ = 1;  // the direct form: 0 never, 1 where it fits and pays, 2 wherever it fits (CTPRUNE_PATTERN_DIRECT)
  int weights_finite_ = -1;  // W a constant: whether every weight is finite (1 or 0); -1: looked at in each call
  KernelTable narrow_kernels_;  // for output planes whose flat row is at most kNarrowRowFloats (dispatch.h)
  std::mutex offsets_mutex_;
  struct OffsetsFor {
    int H, W;
    bool direct;  // the same size may take either form (a fed W: finite in one call, not in the next)
    std::shared_ptr<const std::vector<int32_t>> offsets;
  };
  std::vector<OffsetsFor> offsets_;  // a few recent input sizes and forms
  std::shared_ptr<const ChannelKernels> by_channel_;  // guarded by offsets_mutex_
  bool poison_output_;  // CTPRUNE_POISON_OUTPUT=1: fill Y with NaN first, so unwritten elements show in tests
  // The filter blocks' regrouped weights (ImageJob::block_weights), made once when W is a constant initializer of the
  // right shape; otherwise each call regroups W into its workspace.
  std::vector<float> block_weights_storage_;
  const float* block_weights_ = nullptr;  // 64-byte aligned, inside block_weights_storage_
};

struct PatternConvOp : Ort::CustomOpBase<PatternConvOp, PatternConvKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return ops::kPatternConvName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 4; }  // X, W, B (optional), Z (optional)
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace cpu
}  // namespace ctprune
