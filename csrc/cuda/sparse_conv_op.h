// ai.ctprune.SparseConv (version 1) on onnxruntime's CUDAExecutionProvider (operator: ops/SparseConv.md); laid out
// like the CPU op (cpu/sparse_conv_op.h) and PatternConv's CUDA op (pattern_conv_op.h): the shared spec parser
// (ops/sparse_conv_spec.h), the same input checks, the same status boundary. I and P are constant initializers read
// on the host (declared CPU inputs); X, W, B, Z and Y live in device memory and the kernels run on onnxruntime's
// compute stream. The packed layout is uploaded once per device, on first use there.
#pragma once

#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cuda/sparse_conv_cuda.h"
#include "cuda/sparse_conv_layout.h"
#include "ops/ort_api.h"
#include "ops/sparse_conv_spec.h"

namespace ctprune {
namespace cuda {

class SparseConvCudaKernel {
 public:
  // Reads and checks the attributes and the index inputs; throws ops::InvalidNode on a malformed node.
  SparseConvCudaKernel(const OrtApi& api, const OrtKernelInfo* info, std::string node);
  ~SparseConvCudaKernel();
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

 private:
  void Compute(OrtKernelContext* context);
  const CtpruneSparseConvGpu* OnCurrentDevice();

  const OrtApi& api_;
  std::string node_;  // "SparseConv node 'name' (CUDA)" for error messages
  PackedSparseConv packed_;
  std::vector<int64_t> block_order_, pointer_, columns_;  // desc_ points into these
  CtpruneSparseConvDesc desc_;
  std::mutex mutex_;
  std::vector<std::pair<int, CtpruneSparseConvGpu*>> per_device_;
};

struct SparseConvCudaOp : Ort::CustomOpBase<SparseConvCudaOp, SparseConvCudaKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return ops::kSparseConvName; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return 6; }  // X, W, I, P, B (optional), Z (optional)
  ONNXTensorElementDataType GetInputType(size_t index) const {
    // I is uint16 or int32: undefined lets onnxruntime accept either (the kernel checks which).
    return index == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED
                      : index == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtMemType GetInputMemoryType(size_t index) const {  // the index arrays are read on the host, once
    return index == 2 || index == 3 ? OrtMemTypeCPUInput : OrtMemTypeDefault;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace cuda
}  // namespace ctprune
