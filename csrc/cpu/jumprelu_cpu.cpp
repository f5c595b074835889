// Fused CPU kernels: one pass over pre for the forward, one pass over pre and the
// incoming gradient for the backward, θ-gradient partials per fixed row chunk.
// The inner loops are written for the auto-vectoriser (built with -fno-trapping-math,
// which lets comparisons become masks without changing any result).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../dispatch.h"
#include "../kernels.h"
#include "../ops.h"

namespace jumprelu_ext {
namespace {

// A large output is written once from scratch, so much of its time is first-touch page faults,
// one per 4 KiB page. Advising transparent huge pages for it (2 MiB pages) cuts them 512-fold
// where THP runs in "madvise" mode (Linux's common default); elsewhere this changes nothing.
void advise_huge_pages(const at::Tensor& out) {
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

// Rows handled together so that work per task is worth a thread.
int64_t row_grain(int64_t features) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(features, 1));
}

template <typename acc_t, typename theta_t>
std::vector<acc_t> threshold_as_acc(const at::Tensor& threshold) {
  const theta_t* src = threshold.data_ptr<theta_t>();
  return std::vector<acc_t>(src, src + threshold.numel());
}

// An integer as wide as acc_t: counting in it keeps the row loop vectorisable
// (a floating-point sum would need reassociation).
template <typename acc_t>
using count_t = std::conditional_t<sizeof(acc_t) == 8, int64_t, int32_t>;

// One row of the forward. The row loops are plain functions with __restrict pointer
// parameters: inside the parallel_for lambdas gcc cannot prove the arrays disjoint and
// stops vectorising.
template <typename scalar_t, typename acc_t, bool STEP>
count_t<acc_t> forward_row(const scalar_t* __restrict pre, const acc_t* __restrict theta,
                           scalar_t* __restrict out, int64_t features) {
  count_t<acc_t> active = 0;
  for (int64_t j = 0; j < features; ++j) {
    const acc_t x = static_cast<acc_t>(pre[j]);
    const acc_t on = x > theta[j] ? acc_t(1) : acc_t(0);
    // x * on rather than a select: NaN (and -inf) in pre give NaN, like pre·H.
    out[j] = static_cast<scalar_t>(STEP ? on : x * on);
    active += x > theta[j] ? 1 : 0;
  }
  return active;
}

template <typename scalar_t, typename theta_t, typename acc_t, bool STEP, bool WITH_L0>
void forward_kernel(const ForwardArgs& a) {
  const int64_t rows = a.pre.size(0), features = a.pre.size(1);
  const scalar_t* pre = a.pre.data_ptr<scalar_t>();
  scalar_t* out = a.out.data_ptr<scalar_t>();
  scalar_t* l0 = WITH_L0 ? a.l0.data_ptr<scalar_t>() : nullptr;
  const std::vector<acc_t> theta = threshold_as_acc<acc_t, theta_t>(a.threshold);
  at::parallel_for(0, rows, row_grain(features), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto active = forward_row<scalar_t, acc_t, STEP>(pre + r * features, theta.data(),
                                                             out + r * features, features);
      if (WITH_L0) l0[r] = static_cast<scalar_t>(active);
    }
  });
}

// One row of the backward: writes grad_pre (if WRITE_GRAD_PRE) and adds this row's
// θ-gradient terms, K·(coef·g + g_row), to the chunk's partial sums.
template <typename scalar_t, typename acc_t, bool HAS_ELEM, bool WRITE_GRAD_PRE>
void backward_row(const scalar_t* __restrict pre, const scalar_t* __restrict grad_elem,
                  acc_t g_row, const acc_t* __restrict theta, const acc_t* __restrict elem_coef,
                  acc_t eps, scalar_t* __restrict grad_pre, acc_t* __restrict partial,
                  int64_t features) {
  for (int64_t j = 0; j < features; ++j) {
    const acc_t x = static_cast<acc_t>(pre[j]);
    const acc_t u = (x - theta[j]) / eps;
    const acc_t in_window = (u > acc_t(-0.5)) & (u < acc_t(0.5)) ? acc_t(1) : acc_t(0);
    const acc_t g = HAS_ELEM ? static_cast<acc_t>(grad_elem[j]) : acc_t(0);
    if (WRITE_GRAD_PRE) grad_pre[j] = static_cast<scalar_t>(g * (x > theta[j] ? acc_t(1) : acc_t(0)));
    partial[j] += in_window * (elem_coef[j] * g + g_row);
  }
}

// Fixed chunking (a function of rows only) keeps the θ-gradient sum order, and so its
// bits, independent of the thread count.
constexpr int64_t kMaxRowChunks = 64;

template <typename scalar_t, typename theta_t, typename acc_t, bool HAS_ELEM, bool WRITE_GRAD_PRE>
void backward_kernel(const BackwardArgs& a) {
  const int64_t rows = a.pre.size(0), features = a.pre.size(1);
  const int64_t chunk_rows = (rows + kMaxRowChunks - 1) / kMaxRowChunks;
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  const acc_t eps = static_cast<acc_t>(a.bandwidth);
  const scalar_t* pre = a.pre.data_ptr<scalar_t>();
  const scalar_t* grad_elem = HAS_ELEM ? a.grad_elem.data_ptr<scalar_t>() : nullptr;
  const scalar_t* grad_row = a.grad_row.defined() ? a.grad_row.data_ptr<scalar_t>() : nullptr;
  scalar_t* grad_pre = WRITE_GRAD_PRE ? a.grad_pre.data_ptr<scalar_t>() : nullptr;
  const std::vector<acc_t> theta = threshold_as_acc<acc_t, theta_t>(a.threshold);
  // Weight of grad_elem in the θ-gradient: θ for JumpReLU, 1 for the step.
  const std::vector<acc_t> elem_coef =
      a.elem_is_jumprelu ? theta : std::vector<acc_t>(features, acc_t(1));
  std::vector<acc_t> partials(chunks * features, acc_t(0));

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      const int64_t row_end = std::min(rows, (c + 1) * chunk_rows);
      for (int64_t r = c * chunk_rows; r < row_end; ++r) {
        const int64_t offset = r * features;
        backward_row<scalar_t, acc_t, HAS_ELEM, WRITE_GRAD_PRE>(
            pre + offset, HAS_ELEM ? grad_elem + offset : nullptr,
            grad_row ? static_cast<acc_t>(grad_row[r]) : acc_t(0), theta.data(), elem_coef.data(),
            eps, WRITE_GRAD_PRE ? grad_pre + offset : nullptr, partials.data() + c * features,
            features);
      }
    }
  });

  theta_t* grad_threshold = a.grad_threshold.data_ptr<theta_t>();
  at::parallel_for(0, features, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_t sum = 0;
      for (int64_t c = 0; c < chunks; ++c) sum += partials[c * features + j];
      grad_threshold[j] = static_cast<theta_t>(-sum / eps);
    }
  });
}

}  // namespace

void forward_cpu(const ForwardArgs& args) {
  advise_huge_pages(args.out);
  JUMPRELU_DISPATCH(args.pre, args.threshold, "jumprelu_forward_cpu", [&] {
    if (args.step) {
      forward_kernel<scalar_t, theta_t, acc_t, true, false>(args);
    } else if (args.l0.defined()) {
      forward_kernel<scalar_t, theta_t, acc_t, false, true>(args);
    } else {
      forward_kernel<scalar_t, theta_t, acc_t, false, false>(args);
    }
  });
}

void backward_cpu(const BackwardArgs& args) {
  advise_huge_pages(args.grad_pre);
  JUMPRELU_DISPATCH(args.pre, args.threshold, "jumprelu_backward_cpu", [&] {
    if (!args.grad_elem.defined()) {
      backward_kernel<scalar_t, theta_t, acc_t, false, false>(args);
    } else if (args.grad_pre.defined()) {
      backward_kernel<scalar_t, theta_t, acc_t, true, true>(args);
    } else {
      backward_kernel<scalar_t, theta_t, acc_t, true, false>(args);
    }
  });
}

}  // namespace jumprelu_ext

TORCH_LIBRARY_IMPL(jumprelu_ext, CPU, m) {
  jumprelu_ext::register_ops<jumprelu_ext::forward_cpu, jumprelu_ext::backward_cpu>(m);
}
