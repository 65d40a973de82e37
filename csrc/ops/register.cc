// The library's one exported symbol (csrc/ops/exports.lds keeps everything else local): onnxruntime calls
// RegisterCustomOps when a session loads this library. It registers the ai.ctprune domain with the CPU kernels and,
// in a CUDA build, the CUDA kernels; every failure comes back as an OrtStatus, never an exception or a crash.
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ops/ort_api.h"
#include "ops/pattern_conv_op.h"
#ifdef CTPRUNE_WITH_CUDA
#include "cuda/cuda_ops.h"
#endif

namespace {

// Domains must outlive every session that uses them: keep them for the life of the process.
void KeepDomain(Ort::CustomOpDomain&& domain) {
  static std::vector<Ort::CustomOpDomain> domains;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  domains.push_back(std::move(domain));
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // An onnxruntime older than the headers we were built with; version 1 of the API exists in every release.
    const std::string message = std::string("ctprune's kernel library needs onnxruntime API version ") +
                                std::to_string(ORT_API_VERSION) + " (onnxruntime >= 1." +
                                std::to_string(ORT_API_VERSION) + "); this onnxruntime is " +
                                api_base->GetVersionString();
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);
  static const ctprune::ops::PatternConvOp pattern_conv;
  try {
    Ort::CustomOpDomain domain{ctprune::ops::kDomain};
    domain.Add(&pattern_conv);
#ifdef CTPRUNE_WITH_CUDA
    ctprune::cuda::RegisterOps(domain);
#endif
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(domain);
    KeepDomain(std::move(domain));
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}
