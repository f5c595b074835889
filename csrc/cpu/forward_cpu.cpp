// Fused CPU forward: one pass over pre writes the output (and the per-row L0 count, and adds
// the per-feature fire counts when asked).
// The row loop is written for the auto-vectoriser (built with -fno-trapping-math, which lets
// comparisons become masks without changing any result).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../dispatch.h"
#include "../kernels.h"
#include "cpu_common.h"

namespace jumprelu_ext {
namespace {

// An integer as wide as acc_t: counting in it keeps the row loop vectorisable
// (a floating-point sum would need reassociation).
template <typename acc_t>
using count_t = std::conditional_t<sizeof(acc_t) == 8, int64_t, int32_t>;

// One row. With COUNT, fired[j] += (out[j] != 0): the fire counts' definition (the output,
// not H, so NaN outputs count as the trainer's acts != 0 did). The row loops are plain functions
// with __restrict pointer parameters: inside the parallel_for lambdas gcc cannot prove the
// arrays disjoint and stops vectorising.
template <typename scalar_t, typename acc_t, ForwardMode MODE, bool COUNT>
count_t<acc_t> forward_row(const scalar_t* __restrict pre, const acc_t* __restrict theta,
                           scalar_t* __restrict out, count_t<acc_t>* __restrict fired,
                           int64_t features) {
  count_t<acc_t> active = 0;
  for (int64_t j = 0; j < features; ++j) {
    const acc_t x = static_cast<acc_t>(pre[j]);
    const acc_t on = x > theta[j] ? acc_t(1) : acc_t(0);
    // x * on rather than a select: NaN (and -inf) in pre give NaN, like pre·H.
    const acc_t y = MODE == ForwardMode::kStep ? on : x * on;
    out[j] = static_cast<scalar_t>(y);  // exact: y is x, ±0, NaN or 1
    if constexpr (MODE == ForwardMode::kJumpReLUL0) active += x > theta[j] ? 1 : 0;
    if constexpr (COUNT) fired[j] += y != acc_t(0) ? 1 : 0;
  }
  return active;
}

// Adds a thread's partial fire counts to the caller's int64 counts. Integer addition is exact
// and associative, so the result is the same for any thread count and order.
template <typename count>
void add_fire_counts(std::vector<count>& partial, int64_t* fire_counts, std::mutex& lock) {
  const std::lock_guard<std::mutex> guard(lock);
  for (size_t j = 0; j < partial.size(); ++j) fire_counts[j] += partial[j];
  std::fill(partial.begin(), partial.end(), count(0));
}

template <typename scalar_t, typename theta_t, typename acc_t, ForwardMode MODE, bool COUNT>
void forward_kernel(const ForwardArgs& a) {
  const int64_t rows = a.pre.size(0), features = a.pre.size(1);
  const scalar_t* pre = a.pre.const_data_ptr<scalar_t>();
  scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
  float* l0 = MODE == ForwardMode::kJumpReLUL0 ? a.l0.mutable_data_ptr<float>() : nullptr;
  int64_t* fire_counts = COUNT ? a.fire_counts.mutable_data_ptr<int64_t>() : nullptr;
  // A partial count grows by at most 1 per row: flushing every max() rows keeps it exact.
  constexpr int64_t kFlushRows = std::numeric_limits<count_t<acc_t>>::max();
  std::mutex lock;
  const std::vector<acc_t> theta = threshold_as_acc<acc_t, theta_t>(a.threshold);
  at::parallel_for(0, rows, row_grain(features), [&](int64_t begin, int64_t end) {
    std::vector<count_t<acc_t>> fired(COUNT ? features : 0);
    for (int64_t r = begin; r < end; ++r) {
      const auto active = forward_row<scalar_t, acc_t, MODE, COUNT>(
          pre + r * features, theta.data(), out + r * features, fired.data(), features);
      if constexpr (MODE == ForwardMode::kJumpReLUL0) l0[r] = static_cast<float>(active);
      if constexpr (COUNT) {
        if (r + 1 == end || (r + 1 - begin) % kFlushRows == 0) {
          add_fire_counts(fired, fire_counts, lock);
        }
      }
    }
  });
}

template <typename scalar_t, typename theta_t, typename acc_t, ForwardMode MODE>
void forward_mode(const ForwardArgs& a) {
  if (a.fire_counts.defined()) {
    forward_kernel<scalar_t, theta_t, acc_t, MODE, true>(a);
  } else {
    forward_kernel<scalar_t, theta_t, acc_t, MODE, false>(a);
  }
}

}  // namespace

void forward_cpu(const ForwardArgs& args) {
  JUMPRELU_DISPATCH(args.pre, args.threshold, "jumprelu_forward_cpu", [&] {
    switch (args.mode) {
      case ForwardMode::kJumpReLU:
        return forward_mode<scalar_t, theta_t, acc_t, ForwardMode::kJumpReLU>(args);
      case ForwardMode::kStep:
        return forward_mode<scalar_t, theta_t, acc_t, ForwardMode::kStep>(args);
      case ForwardMode::kJumpReLUL0:
        return forward_mode<scalar_t, theta_t, acc_t, ForwardMode::kJumpReLUL0>(args);
    }
  });
}

}  // namespace jumprelu_ext
