// The library's one exception -> OrtStatus boundary. Every entry point onnxruntime calls (kernel creation, Compute,
// RegisterCustomOps) runs its body through StatusOf, so no exception crosses into onnxruntime and every message starts
// with where it happened ("PatternConv node 'conv1': ...").
#pragma once

#include <string>
#include <utility>

#include "ops/ort_api.h"

namespace ctprune {
namespace ops {

// The exception being handled as a status: InvalidNode -> ORT_INVALID_ARGUMENT, Ort::Exception -> its own code,
// std::bad_alloc -> ORT_FAIL "out of memory", anything else -> ORT_FAIL. Call only inside a catch block.
OrtStatusPtr StatusFromCurrentException(const OrtApi& api, const std::string& where) noexcept;

// Runs body(); nullptr when it returns, the exception's status when it throws.
template <class Body>
OrtStatusPtr StatusOf(const OrtApi& api, const std::string& where, Body&& body) noexcept {
  try {
    std::forward<Body>(body)();
    return nullptr;
  } catch (...) {
    return StatusFromCurrentException(api, where);
  }
}

}  // namespace ops
}  // namespace ctprune
