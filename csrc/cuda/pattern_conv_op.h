// ai.ctprune.PatternConv (version 1) on onnxruntime's CUDAExecutionProvider (operator: ops/PatternConv.md); laid out
// like the CPU op (cpu/pattern_conv_op.h): the same spec parser, the same input checks and the same status boundary.
// X, W, B, Z and Y live in device memory, and the kernel runs on the compute stream onnxruntime hands over
// (KernelContext::GetGPUComputeStream), so it orders with the provider's own kernels. The packed kernel lists are
// uploaded once per device, on first use there.
#pragma once

#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cuda/pattern_conv_cuda.h"
#include "cuda/pattern_conv_layout.h"
#include "ops/ort_api.h"
#include "ops/pattern_conv_spec.h"

namespace ctprune {
namespace cuda {

class PatternConvCudaKernel {
 public:
  // Reads and checks the attributes (ops/pattern_conv_spec.h); throws ops::InvalidNode on a malformed node.
  PatternConvCudaKernel(const OrtApi& api, const OrtKernelInfo* info, std::string node);
  ~PatternConvCudaKernel();
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

 private:
  void Compute(OrtKernelContext* context);
  // The packed layout on the current device (onnxruntime sets it for the provider's thread), uploaded on first use.
  const CtprunePatternConvGpu* OnCurrentDevice();

  const OrtApi& api_;
  std::string node_;  // "PatternConv node 'name' (CUDA)" for error messages
  ops::PatternConvSpec spec_;
  CtprunePatternConvDesc desc_;  // points into spec_
  PackedPatternConv packed_;
  std::mutex mutex_;
  std::vector<std::pair<int, CtprunePatternConvGpu*>> per_device_;
};

struct PatternConvCudaOp : Ort::CustomOpBase<PatternConvCudaOp, PatternConvCudaKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return ops::kPatternConvName; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return 4; }  // X, W, B (optional), Z (optional)
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace cuda
}  // namespace ctprune
