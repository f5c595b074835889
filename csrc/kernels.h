// The contract between the backend-independent op wrappers (ops.h) and the per-backend
// kernels (cpu/, cuda/). Wrappers validate, reshape to [rows, features], make everything
// contiguous and allocate; kernels only compute. Vocabulary as in the schemas
// (docs/ops.md#schemas): grad_acts is the gradient of the elementwise output (acts, or the step for
// `step`), grad_l0 the gradient of the per-row L0 count.
#pragma once

#include <ATen/core/Tensor.h>

namespace jumprelu_ext {

// What one forward pass writes.
enum class ForwardMode {
  kJumpReLU,    // out = pre·H(pre−θ)
  kStep,        // out = H(pre−θ)
  kJumpReLUL0,  // out = pre·H(pre−θ) and l0 = Σ_features H(pre−θ)
};

struct ForwardArgs {
  at::Tensor pre;        // [rows, features], contiguous; float32/64, float16, bfloat16
  at::Tensor threshold;  // [features], contiguous; pre's dtype or float32
  at::Tensor out;        // [rows, features], pre's dtype
  at::Tensor l0;         // [rows] float32 (exact counts up to 2^24); kJumpReLUL0 only
  // [features] int64, or undefined: not counted (the .counted op overloads). Each feature's count
  // of rows where out != 0 is added to it (docs/ops.md#fire-counts); integer sums, so exact in any
  // order.
  at::Tensor fire_counts;
  ForwardMode mode = ForwardMode::kJumpReLU;
};

// The term each element adds to the θ gradient (docs/ops.md#ste_to_input):
//   term = K((pre−θ)/ε) · (c·grad_acts + grad_l0),  c = θ (JumpReLU) or 1 (step),
//   grad_θ_j = −(1/ε) Σ_rows term,
//   grad_pre = H(pre−θ)·grad_acts (JumpReLU only) + term/ε (ste_to_input only).
// A missing gradient contributes no term (in particular no c·0, which is NaN for θ = ±inf).
struct BackwardArgs {
  at::Tensor pre;             // [rows, features], contiguous
  at::Tensor threshold;       // [features], contiguous
  double bandwidth = 0;       // ε > 0, finite
  at::Tensor grad_acts;       // [rows, features] in pre's dtype, or undefined
  at::Tensor grad_l0;         // [rows] float32, or undefined
  bool step = false;          // grad_acts is the gradient of H(pre−θ), not of pre·H(pre−θ)
  bool ste_to_input = false;  // grad_pre also receives −(the element's θ term)
  at::Tensor grad_pre;        // [rows, features] output in pre's dtype, or undefined: not wanted
  at::Tensor grad_threshold;  // [features] output in θ's dtype, or undefined: not wanted
};

// The [rows, features] traffic of one backward pass: whether it reads grad_acts and whether it
// writes grad_pre. Each reachable pair is one kernel instantiation; the rest of BackwardArgs
// (step, ste_to_input, grad_l0, grad_threshold) is decided at run time, uniformly per call.
enum class BackwardMode {
  kActs,       // reads grad_acts; θ gradient only
  kActsToPre,  // reads grad_acts; writes grad_pre
  kL0,         // grad_l0 only; θ gradient only
  kL0ToPre,    // grad_l0 only; writes grad_pre (ste_to_input)
};

inline BackwardMode backward_mode(const BackwardArgs& a) {
  if (a.grad_acts.defined()) {
    return a.grad_pre.defined() ? BackwardMode::kActsToPre : BackwardMode::kActs;
  }
  return a.grad_pre.defined() ? BackwardMode::kL0ToPre : BackwardMode::kL0;
}

constexpr bool reads_grad_acts(BackwardMode m) {
  return m == BackwardMode::kActs || m == BackwardMode::kActsToPre;
}
constexpr bool writes_grad_pre(BackwardMode m) {
  return m == BackwardMode::kActsToPre || m == BackwardMode::kL0ToPre;
}

// Output allocation: large CPU outputs come from a cache of already faulted-in buffers
// (cpu/output_cache.cpp); elsewhere at::empty.
at::Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options);

void forward_cpu(const ForwardArgs& args);
void backward_cpu(const BackwardArgs& args);
void forward_cuda(const ForwardArgs& args);
void backward_cuda(const BackwardArgs& args);

}  // namespace jumprelu_ext
