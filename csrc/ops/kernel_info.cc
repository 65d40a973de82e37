#include "ops/kernel_info.h"

namespace ctprune {
namespace ops {
namespace {

// True when `status` is success; frees it either way (a failed probe is an answer here, not an error).
bool Succeeded(const OrtApi& api, OrtStatus* status) {
  if (status == nullptr) return true;
  api.ReleaseStatus(status);
  return false;
}

// onnxruntime's scalar getters check the attribute's type; its list getters do not (a FLOATS attribute reads as an
// empty INTS list), so a list's type is told by which of its value lists is non-empty. A list getter fails only when
// the attribute is missing.
Attribute ReadOne(const OrtApi& api, const OrtKernelInfo* info, const char* name) {
  Attribute a;
  if (Succeeded(api, api.KernelInfoGetAttribute_float(info, name, &a.f))) {
    a.type = AttributeType::kFloat;
    return a;
  }
  if (Succeeded(api, api.KernelInfoGetAttribute_int64(info, name, &a.i))) {
    a.type = AttributeType::kInt;
    return a;
  }
  size_t size = 0;
  if (Succeeded(api, api.KernelInfoGetAttribute_string(info, name, nullptr, &size))) {
    a.type = AttributeType::kString;
    return a;
  }
  OrtAllocator* allocator = nullptr;
  OrtValue* tensor = nullptr;
  if (Succeeded(api, api.GetAllocatorWithDefaultOptions(&allocator)) &&
      Succeeded(api, api.KernelInfoGetAttribute_tensor(info, name, allocator, &tensor))) {
    api.ReleaseValue(tensor);
    a.type = AttributeType::kTensor;
    return a;
  }
  size = 0;
  if (!Succeeded(api, api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size))) return a;  // missing
  if (size > 0) {
    a.ints.resize(size);
    if (!Succeeded(api, api.KernelInfoGetAttributeArray_int64(info, name, a.ints.data(), &size))) return a;
    a.ints.resize(size);
    a.type = AttributeType::kInts;
    return a;
  }
  size = 0;
  if (Succeeded(api, api.KernelInfoGetAttributeArray_float(info, name, nullptr, &size)) && size > 0) {
    a.type = AttributeType::kFloats;
    return a;  // the values are never used: the type alone is the error
  }
  a.type = AttributeType::kList;
  return a;
}

}  // namespace

NodeAttributes ReadAttributes(const OrtApi& api, const OrtKernelInfo* info, const std::vector<const char*>& names) {
  NodeAttributes attributes;
  for (const char* name : names) attributes.Set(name, ReadOne(api, info, name));
  return attributes;
}

std::vector<int64_t> ConstantIndexInput(const OrtApi& api, const OrtKernelInfo* info, size_t index, const char* name,
                                        ONNXTensorElementDataType* type) {
  int is_constant = 0;
  const OrtValue* value = nullptr;
  if (!Succeeded(api, api.KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value)) || !is_constant ||
      value == nullptr)
    throw InvalidNode(std::string("input ") + name + " must be a constant initializer for ctprune's kernel");
  Ort::ConstValue tensor(value);
  const auto shape_info = tensor.GetTensorTypeAndShapeInfo();
  const std::vector<int64_t> shape = shape_info.GetShape();
  if (shape.size() != 1) throw InvalidNode(std::string("input ") + name + " must be 1-D, got shape " + ShapeStr(shape));
  *type = shape_info.GetElementType();
  const size_t n = static_cast<size_t>(shape[0]);
  std::vector<int64_t> out(n);
  if (*type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16) {
    const uint16_t* p = tensor.GetTensorData<uint16_t>();
    for (size_t i = 0; i < n; ++i) out[i] = p[i];
  } else if (*type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) {
    const int32_t* p = tensor.GetTensorData<int32_t>();
    for (size_t i = 0; i < n; ++i) out[i] = p[i];
  } else if (*type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
    const int64_t* p = tensor.GetTensorData<int64_t>();
    for (size_t i = 0; i < n; ++i) out[i] = p[i];
  } else {
    throw InvalidNode(std::string("input ") + name + " must hold uint16, int32 or int64 indices");
  }
  return out;
}

const float* ConstantFloatMatrix(const OrtApi& api, const OrtKernelInfo* info, size_t index, int64_t rows,
                                 int64_t cols) {
  int is_constant = 0;
  const OrtValue* value = nullptr;
  OrtStatus* status = api.KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    return nullptr;
  }
  if (!is_constant || value == nullptr) return nullptr;
  Ort::ConstValue tensor(value);
  const auto type_shape = tensor.GetTensorTypeAndShapeInfo();
  const std::vector<int64_t> shape = type_shape.GetShape();
  if (type_shape.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || shape.size() != 2 || shape[0] != rows ||
      shape[1] != cols)
    return nullptr;
  return tensor.GetTensorData<float>();
}

std::string NodeLabel(const OrtApi& api, const OrtKernelInfo* info, const char* op_type, const char* suffix) {
  std::string label = std::string(op_type) + " node";
  size_t size = 0;
  if (Succeeded(api, api.KernelInfo_GetNodeName(info, nullptr, &size)) && size > 1) {
    std::string name(size, '\0');
    if (Succeeded(api, api.KernelInfo_GetNodeName(info, &name[0], &size))) {
      name.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
      label += " '" + name + "'";
    }
  }
  return label + suffix;
}

}  // namespace ops
}  // namespace ctprune
