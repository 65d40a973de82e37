// What an op reads from onnxruntime's KernelInfo when its kernel is created: the node's name and a typed snapshot of
// its attributes (op_spec.h checks them). Only the C API is used, so probing an attribute's type throws nothing.
#pragma once

#include <string>
#include <vector>

#include "ops/op_spec.h"
#include "ops/ort_api.h"

namespace ctprune {
namespace ops {

// The attributes called `names`, each with the type onnxruntime reports (kMissing when the node has none).
NodeAttributes ReadAttributes(const OrtApi& api, const OrtKernelInfo* info, const std::vector<const char*>& names);

// A constant 1-D integer initializer input (an index array, e.g. SparseConv's I and P) as int64 values, with its
// element type in *type (uint16, int32 or int64). Throws InvalidNode naming `name` when the input is not a constant
// initializer, not 1-D, or of another element type. An op on a non-CPU provider declares such an input
// OrtMemTypeCPUInput, so the values are read here on the host.
std::vector<int64_t> ConstantIndexInput(const OrtApi& api, const OrtKernelInfo* info, size_t index, const char* name,
                                        ONNXTensorElementDataType* type);

// The data of a constant float32 initializer input of shape (rows, cols), or nullptr when the input is not a constant
// or has another type or shape (the kernel then reads it at run time). The data lives as long as the session.
const float* ConstantFloatMatrix(const OrtApi& api, const OrtKernelInfo* info, size_t index, int64_t rows,
                                 int64_t cols);

// "PatternConv node 'conv1'" (+ suffix, e.g. " (CUDA)"): how every message of the op starts.
std::string NodeLabel(const OrtApi& api, const OrtKernelInfo* info, const char* op_type, const char* suffix = "");

}  // namespace ops
}  // namespace ctprune
