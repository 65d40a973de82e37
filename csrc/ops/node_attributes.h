// Small helpers shared by the CPU and CUDA PatternConv ops: reading optional node attributes and printing shapes
// in error messages.
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

}  // namespace ops
}  // namespace ctprune
