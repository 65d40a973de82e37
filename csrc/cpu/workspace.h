// Scratch memory for one kernel call (PatternConv's packed input), bounded by the calls in flight rather than by the
// threads that ever ran one: a per-thread buffer that kept its peak made every onnxruntime pool thread hold the
// largest call's workspace for its whole life (1.5 GB resident after one large call on a 98 MB model).
//
// Buffers come from one small process-wide pool and go back to it when the call ends. The pool keeps at most
// kPoolBytes in all (steady-state calls reuse warm pages: no page faults, no system calls); a buffer that does not fit
// goes back to the operating system at once (munmap), so the resident size after a large call returns to what the
// pool keeps.
#pragma once

#include <cstddef>

namespace ctprune {
namespace cpu {

class Workspace {
 public:
  static constexpr size_t kPoolBytes = size_t{64} << 20;

  explicit Workspace(size_t bytes);  // page-aligned, contents undefined; throws std::bad_alloc
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  void* data() const { return data_; }
  template <class T>
  T* as(size_t byte_offset = 0) const {
    return reinterpret_cast<T*>(static_cast<char*>(data_) + byte_offset);
  }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;  // the mapping's size (whole pages)
};

}  // namespace cpu
}  // namespace ctprune
