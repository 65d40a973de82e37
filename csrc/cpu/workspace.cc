#include "cpu/workspace.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

namespace ctprune {
namespace cpu {

#if defined(__SANITIZE_ADDRESS__)
// Under AddressSanitizer (make asan) every workspace is a heap block of its exact size, never pooled: a read or write
// past the packed planes lands in a redzone and is reported, instead of in a mapping's slack.
Workspace::Workspace(size_t bytes) : bytes_(bytes) { data_ = ::operator new(bytes, std::align_val_t(64)); }
Workspace::~Workspace() { ::operator delete(data_, std::align_val_t(64)); }
#else
namespace {

struct Pool {
  std::mutex mutex;
  std::vector<std::pair<size_t, void*>> free;  // (bytes, mapping), kept sorted by size
  size_t kept = 0;
};

Pool& ThePool() {
  static Pool* pool = new Pool();  // never destroyed: a call may end during static destruction
  return *pool;
}

size_t PageRounded(size_t bytes) {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return (std::max<size_t>(bytes, 1) + page - 1) / page * page;
}

}  // namespace

Workspace::Workspace(size_t bytes) : bytes_(PageRounded(bytes)) {
  Pool& pool = ThePool();
  {
    std::lock_guard<std::mutex> lock(pool.mutex);
    // The smallest kept buffer that is large enough.
    auto it = std::lower_bound(pool.free.begin(), pool.free.end(), bytes_,
                               [](const std::pair<size_t, void*>& kept, size_t wanted) { return kept.first < wanted; });
    if (it != pool.free.end()) {
      bytes_ = it->first;
      data_ = it->second;
      pool.kept -= it->first;
      pool.free.erase(it);
      return;
    }
  }
  void* mapping = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapping == MAP_FAILED) throw std::bad_alloc();
  data_ = mapping;
}

Workspace::~Workspace() {
  Pool& pool = ThePool();
  std::vector<std::pair<size_t, void*>> release;
  {
    std::lock_guard<std::mutex> lock(pool.mutex);
    if (bytes_ <= Workspace::kPoolBytes) {
      // Make room by dropping the smallest buffers (the next calls are likelier to want this size than theirs).
      while (pool.kept + bytes_ > Workspace::kPoolBytes && !pool.free.empty()) {
        release.push_back(pool.free.front());
        pool.kept -= pool.free.front().first;
        pool.free.erase(pool.free.begin());
      }
      auto at = std::upper_bound(pool.free.begin(), pool.free.end(), bytes_,
                                 [](size_t size, const std::pair<size_t, void*>& kept) { return size < kept.first; });
      pool.free.insert(at, std::make_pair(bytes_, data_));
      pool.kept += bytes_;
    } else {
      release.emplace_back(bytes_, data_);
    }
  }
  for (const auto& r : release) munmap(r.second, r.first);  // outside the lock: munmap may take a while
}
#endif

}  // namespace cpu
}  // namespace ctprune
