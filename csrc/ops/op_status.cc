#include "ops/op_status.h"

#include <exception>
#include <new>

#include "ops/op_spec.h"

namespace ctprune {
namespace ops {

OrtStatusPtr StatusFromCurrentException(const OrtApi& api, const std::string& where) noexcept {
  OrtErrorCode code = ORT_FAIL;
  const char* what = "unknown error";
  try {
    throw;
  } catch (const InvalidNode& e) {
    code = ORT_INVALID_ARGUMENT;
    what = e.what();
  } catch (const Ort::Exception& e) {
    code = e.GetOrtErrorCode();
    what = e.what();
  } catch (const std::bad_alloc&) {
    what = "out of memory";
  } catch (const std::exception& e) {
    what = e.what();
  } catch (...) {
  }
  try {
    return api.CreateStatus(code, where.empty() ? what : (where + ": " + what).c_str());
  } catch (...) {  // no memory left for the message: the bare reason still goes back
    return api.CreateStatus(code, what);
  }
}

}  // namespace ops
}  // namespace ctprune
