// First-touch page faults of large fresh outputs (docs/ops.md, "CPU memory").
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu_common.h"

namespace jumprelu_ext {

// A large output is written once from scratch, so much of its time is first-touch page faults,
// one per 4 KiB page. Advising transparent huge pages for it (2 MiB pages) cuts them 512-fold
// where THP runs in "madvise" mode (Linux's common default); elsewhere this changes nothing.
void prepare_output_pages(const at::Tensor& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  if (!out.defined() || out.nbytes() < 4 * kHugePage) return;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + out.nbytes()) & ~(kHugePage - 1);
  // Advice only: if the kernel refuses it, the output still works with small pages.
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

}  // namespace jumprelu_ext
