// Fused CPU backward: one pass over pre and grad_acts writes grad_pre (when wanted) and adds
// each element's θ term to partial sums kept per fixed row chunk; a second, tiny pass sums the
// chunks in a fixed order. Formulas in kernels.h (BackwardArgs); the window test in window.h.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../dispatch.h"
#include "../kernels.h"
#include "../window.h"
#include "cpu_common.h"

namespace jumprelu_ext {
namespace {

// Per-call constants of the row loop.
template <typename acc_t>
struct RowConsts {
  Window<acc_t> window;
  acc_t eps;
  acc_t pass;  // weight of H(pre−θ)·grad_acts in grad_pre: 1 (JumpReLU) or 0 (step)
};

// One row. MODE fixes the traffic; STE (grad_pre also gets term/ε) is a template argument too
// because a run-time test inside the loop would keep gcc from vectorising it.
template <typename scalar_t, typename acc_t, BackwardMode MODE, bool STE>
void backward_row(const scalar_t* __restrict pre, const scalar_t* __restrict grad_acts, acc_t g_l0,
                  const acc_t* __restrict theta, const acc_t* __restrict acts_coef,
                  RowConsts<acc_t> k, scalar_t* __restrict grad_pre, acc_t* __restrict partial,
                  int64_t features) {
  for (int64_t j = 0; j < features; ++j) {
    const acc_t x = static_cast<acc_t>(pre[j]);
    const acc_t d = x - theta[j];
    const acc_t in_window = (d >= k.window.lo) & (d <= k.window.hi) ? acc_t(1) : acc_t(0);
    // Literal multiplies, as in the reference: NaN/inf in a gradient propagate.
    acc_t term;
    if constexpr (reads_grad_acts(MODE)) {
      const acc_t g = static_cast<acc_t>(grad_acts[j]);
      term = in_window * (acts_coef[j] * g + g_l0);
      if constexpr (writes_grad_pre(MODE)) {
        acc_t gp = g * (x > theta[j] ? k.pass : acc_t(0));
        if constexpr (STE) gp += term / k.eps;
        grad_pre[j] = static_cast<scalar_t>(gp);
      }
    } else {
      term = in_window * g_l0;
      if constexpr (writes_grad_pre(MODE)) grad_pre[j] = static_cast<scalar_t>(term / k.eps);
    }
    partial[j] += term;
  }
}

// Fixed chunking (a function of rows only) keeps the θ-gradient sum order, and so its bits,
// independent of the thread count.
constexpr int64_t kMaxRowChunks = 64;

template <typename scalar_t, typename theta_t, typename acc_t, BackwardMode MODE, bool STE>
void backward_kernel(const BackwardArgs& a) {
  const int64_t rows = a.pre.size(0), features = a.pre.size(1);
  const int64_t chunk_rows = (rows + kMaxRowChunks - 1) / kMaxRowChunks;
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  const acc_t eps = static_cast<acc_t>(a.bandwidth);
  const RowConsts<acc_t> k{window_for(eps), eps, a.step ? acc_t(0) : acc_t(1)};
  const scalar_t* pre = a.pre.const_data_ptr<scalar_t>();
  const scalar_t* grad_acts =
      reads_grad_acts(MODE) ? a.grad_acts.const_data_ptr<scalar_t>() : nullptr;
  const float* grad_l0 = a.grad_l0.defined() ? a.grad_l0.const_data_ptr<float>() : nullptr;
  scalar_t* grad_pre = writes_grad_pre(MODE) ? a.grad_pre.mutable_data_ptr<scalar_t>() : nullptr;
  const std::vector<acc_t> theta = threshold_as_acc<acc_t, theta_t>(a.threshold);
  // Weight of grad_acts in the θ term: θ for JumpReLU, 1 for the step.
  const std::vector<acc_t> acts_coef = a.step ? std::vector<acc_t>(features, acc_t(1)) : theta;
  // Without grad_threshold the partials are still formed (they are per-chunk, not per-element)
  // but never summed.
  std::vector<acc_t> partials(chunks * features, acc_t(0));

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      const int64_t row_end = std::min(rows, (c + 1) * chunk_rows);
      for (int64_t r = c * chunk_rows; r < row_end; ++r) {
        const int64_t offset = r * features;
        backward_row<scalar_t, acc_t, MODE, STE>(
            pre + offset, grad_acts ? grad_acts + offset : nullptr,
            grad_l0 ? static_cast<acc_t>(grad_l0[r]) : acc_t(0), theta.data(), acts_coef.data(), k,
            grad_pre ? grad_pre + offset : nullptr, partials.data() + c * features, features);
      }
    }
  });
  if (!a.grad_threshold.defined()) return;

  theta_t* grad_threshold = a.grad_threshold.mutable_data_ptr<theta_t>();
  at::parallel_for(0, features, kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_t sum = 0;
      for (int64_t c = 0; c < chunks; ++c) sum += partials[c * features + j];
      grad_threshold[j] = static_cast<theta_t>(-sum / eps);
    }
  });
}

}  // namespace

void backward_cpu(const BackwardArgs& args) {
  JUMPRELU_DISPATCH(args.pre, args.threshold, "jumprelu_backward_cpu", [&] {
    switch (backward_mode(args)) {
      case BackwardMode::kActs:
        return backward_kernel<scalar_t, theta_t, acc_t, BackwardMode::kActs, false>(args);
      case BackwardMode::kActsToPre:
        if (args.ste_to_input) {
          return backward_kernel<scalar_t, theta_t, acc_t, BackwardMode::kActsToPre, true>(args);
        }
        return backward_kernel<scalar_t, theta_t, acc_t, BackwardMode::kActsToPre, false>(args);
      case BackwardMode::kL0:
        return backward_kernel<scalar_t, theta_t, acc_t, BackwardMode::kL0, false>(args);
      case BackwardMode::kL0ToPre:  // only reachable with ste_to_input
        return backward_kernel<scalar_t, theta_t, acc_t, BackwardMode::kL0ToPre, true>(args);
    }
  });
}

}  // namespace jumprelu_ext
