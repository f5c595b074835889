// Large CPU outputs (acts, grad_pre) come from a small cache of buffers whose pages are already
// faulted in (docs/ops.md#cpu-memory).
//
// Why: torch's CPU allocator gets every large tensor from a fresh mmap and unmaps it when freed,
// so each op pays a first-touch page fault per page of its outputs. In a VM with free page
// reporting (virtio-balloon), memory freed by other large ops is handed back to the host within
// seconds, and touching it again also costs a host fault per page: measured here, a 256 MiB
// output took 30-50 ms to fill when the pages were still backed and 150-740 ms right after
// another large op or a pause. Reusing our own freed buffers avoids both; a training step has the
// same shapes every step, so after the first step the ops allocate no new memory.
#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <list>
#include <mutex>
#include <unordered_map>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu_common.h"

namespace jumprelu_ext {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinCachedBytes = 4 * kHugePage;  // smaller outputs: torch's allocator
constexpr size_t kDefaultLimitMiB = 2048;

// JUMPRELU_EXT_CPU_CACHE_MIB: the most bytes kept in freed buffers (0 turns the cache off).
size_t limit_from_env() {
  const char* env = std::getenv("JUMPRELU_EXT_CPU_CACHE_MIB");
  const size_t mib =
      (env != nullptr && *env != '\0') ? std::strtoull(env, nullptr, 10) : kDefaultLimitMiB;
  return mib << 20;
}

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCachedBytes || limit_ == 0) return c10::GetCPUAllocator()->allocate(n);
    void* p = take(n);
    if (p == nullptr) p = fresh(n);
    return {p, p, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static OutputCache& instance() {
    static auto* cache = new OutputCache();  // never destroyed: tensors may outlive static teardown
    return *cache;
  }

 private:
  static void release(void* p) { instance().put(p); }

  // 2 MiB-aligned and advised for transparent huge pages, so that its first touch takes 512
  // times fewer page faults where THP runs in "madvise" mode (Linux's common default).
  void* fresh(size_t n) {
    const size_t rounded = (n + kHugePage - 1) / kHugePage * kHugePage;
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kHugePage, rounded) == 0, "jumprelu_ext: out of CPU memory (",
                rounded, " bytes)");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, rounded, MADV_HUGEPAGE);  // advice only: small pages still work
#endif
    std::lock_guard<std::mutex> lock(mutex_);
    sizes_[p] = n;
    return p;
  }

  // The most recently freed buffer of exactly n bytes (a training step repeats its shapes).
  void* take(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
      if (it->first == n) {
        void* p = it->second;
        free_.erase(std::next(it).base());
        cached_bytes_ -= n;
        return p;
      }
    }
    return nullptr;
  }

  void put(void* p) {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t n = sizes_.at(p);
    free_.emplace_back(n, p);
    cached_bytes_ += n;
    while (cached_bytes_ > limit_) {  // the oldest buffers go back to the system
      auto [size, oldest] = free_.front();
      free_.pop_front();
      cached_bytes_ -= size;
      sizes_.erase(oldest);
      std::free(oldest);
    }
  }

  const size_t limit_ = limit_from_env();
  std::mutex mutex_;
  std::unordered_map<void*, size_t> sizes_;   // every buffer this cache made, in use or not
  std::list<std::pair<size_t, void*>> free_;  // freed buffers, oldest first
  size_t cached_bytes_ = 0;
};

}  // namespace

at::Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_generic(sizes, &OutputCache::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

}  // namespace jumprelu_ext
