// The library's one exported symbol (csrc/ops/exports.lds keeps everything else local): onnxruntime calls
// RegisterCustomOps when a session loads this library. It registers the ai.ctprune domain with each backend's ops
// (ops/backends.h: the CPU ops and, in a CUDA build, the CUDA ops); every failure comes back as an OrtStatus
// (ops/op_status.h), never an exception or a crash.
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ops/backends.h"
#include "ops/op_status.h"
#include "ops/ort_api.h"

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
  return ctprune::ops::StatusOf(*api, "ctprune's kernel library", [&] {
    Ort::CustomOpDomain domain{ctprune::kDomain};
    ctprune::cpu::RegisterOps(domain);
    ctprune::cuda::RegisterOps(domain);
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(domain);
    KeepDomain(std::move(domain));
  });
}
