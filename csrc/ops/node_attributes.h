// Small helpers shared by the CPU and CUDA PatternConv ops: reading optional node attributes, printing shapes in
// error messages, checking the residual input's shape.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "onnxruntime_cxx_api.h"

namespace ctprune {
namespace ops {

// A scalar attribute, or `fallback` when the node does not carry it (the spec's default).
template <typename T>
T ScalarOr(const Ort::ConstKernelInfo& info, const char* name, T fallback) {
  try {
    return info.GetAttribute<T>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

// "(1, 3, 224, 224)" — Python's tuple spelling, so messages read like the shapes users see in numpy.
inline std::string ShapeStr(const std::vector<int64_t>& v) {
  std::string s = "(";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + (v.size() == 1 ? ",)" : ")");
}

// Z, the residual of a fused Add, has one element (added to every output) or exactly Y's shape: its element count,
// or `Error` (the op's malformed-input exception) with the message both ops give.
template <class Error>
int64_t ResidualElements(const std::vector<int64_t>& z_shape, const std::vector<int64_t>& y_shape) {
  int64_t elements = 1;
  for (int64_t d : z_shape) elements *= d;
  if (elements != 1 && z_shape != y_shape)
    throw Error("Z (the residual) must have one element or Y's shape " + ShapeStr(y_shape) + ", got " +
                ShapeStr(z_shape));
  return elements;
}

}  // namespace ops
}  // namespace ctprune
