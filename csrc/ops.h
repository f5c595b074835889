// Backend-independent op wrappers: input checks, reshaping to [rows, features],
// output allocation (the contract: docs/ops.md). Each backend registers them with its own two
// kernels and, optionally, its allocator for the large outputs:
//   register_ops<forward_cpu, backward_cpu, empty_cpu>(m);
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "kernels.h"

namespace jumprelu_ext {

using ForwardFn = void (*)(const ForwardArgs&);
using BackwardFn = void (*)(const BackwardArgs&);
using EmptyFn = at::Tensor (*)(at::IntArrayRef, const at::TensorOptions&);

inline at::Tensor empty_default(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Shape bookkeeping for pre = [..., features] viewed as [rows, features].
struct RowView {
  int64_t rows;
  int64_t features;
  at::IntArrayRef leading;  // pre.sizes() without the last dimension
};

inline RowView check_inputs(const char* op, const at::Tensor& pre, const at::Tensor& threshold,
                            double bandwidth) {
  TORCH_CHECK(pre.dim() >= 1, op, ": pre must have shape [..., features], got a 0-d tensor");
  TORCH_CHECK(is_supported_float(pre.scalar_type()), op,
              ": pre must be float32, float64, float16 or bfloat16, got ", pre.scalar_type());
  TORCH_CHECK(threshold.dim() == 1, op, ": threshold must be 1-D [features], got shape ",
              threshold.sizes());
  TORCH_CHECK(threshold.size(0) == pre.size(-1), op, ": threshold has ", threshold.size(0),
              " features but pre's last dimension is ", pre.size(-1));
  TORCH_CHECK(pre.device() == threshold.device(), op, ": pre is on ", pre.device(),
              " but threshold is on ", threshold.device());
  TORCH_CHECK(threshold.scalar_type() == pre.scalar_type() || threshold.scalar_type() == at::kFloat,
              op, ": threshold must be float32 or pre's dtype (", pre.scalar_type(), "), got ",
              threshold.scalar_type());
  TORCH_CHECK(std::isfinite(bandwidth) && bandwidth > 0, op,
              ": bandwidth must be positive and finite, got ", bandwidth);
  // ε is used in fp32 unless pre is fp64: it must neither flush to 0 nor overflow there.
  const bool fp64 = pre.scalar_type() == at::kDouble;
  const double tiny = fp64 ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  const double max = fp64 ? std::numeric_limits<double>::max() : std::numeric_limits<float>::max();
  TORCH_CHECK(bandwidth >= tiny && bandwidth <= max, op, ": bandwidth ", bandwidth,
              " is outside the range of ", fp64 ? "float64" : "float32", ", the dtype ",
              pre.scalar_type(), " inputs are computed in ([", tiny, ", ", max, "])");
  const auto leading = pre.sizes().slice(0, pre.dim() - 1);
  return {c10::multiply_integers(leading), pre.size(-1), leading};
}

// An incoming gradient must match the tensor it is the gradient of.
// grad_acts has pre's dtype; grad_l0 has l0's, float32.
inline at::Tensor check_grad(const char* op, const char* name, const at::Tensor& grad,
                             at::ScalarType dtype, const char* dtype_name, const at::Tensor& pre,
                             at::IntArrayRef expected_shape, at::IntArrayRef flat_shape) {
  TORCH_CHECK(grad.sizes() == expected_shape, op, ": ", name, " must have shape ", expected_shape,
              ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == dtype, op, ": ", name, " must have ", dtype_name, " (", dtype,
              "), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == pre.device(), op, ": ", name, " is on ", grad.device(),
              " but pre is on ", pre.device());
  return grad.contiguous().view(flat_shape);
}

inline at::Tensor as_rows(const at::Tensor& pre, const RowView& v) {
  return pre.contiguous().view({v.rows, v.features});
}

// fire_counts is an accumulator the kernel adds to in place, so it must be exactly the buffer
// the caller holds: int64 [features], on pre's device, contiguous (never a copy).
inline void check_fire_counts(const char* op, const at::Tensor& fire_counts, const RowView& v,
                              const at::Tensor& pre) {
  TORCH_CHECK(fire_counts.scalar_type() == at::kLong, op, ": fire_counts must be int64, got ",
              fire_counts.scalar_type());
  TORCH_CHECK(fire_counts.dim() == 1 && fire_counts.size(0) == v.features, op,
              ": fire_counts must have shape [", v.features, "] (pre's features), got ",
              fire_counts.sizes());
  TORCH_CHECK(fire_counts.device() == pre.device(), op, ": fire_counts is on ",
              fire_counts.device(), " but pre is on ", pre.device());
  TORCH_CHECK(fire_counts.is_contiguous(), op,
              ": fire_counts must be contiguous (it is added to in place)");
}

// fire_counts: undefined (the plain ops), or the caller's buffer (the .counted overloads).
template <ForwardFn forward, EmptyFn empty>
std::tuple<at::Tensor, at::Tensor> run_forward(const char* op, const at::Tensor& pre,
                                               const at::Tensor& threshold, double bandwidth,
                                               ForwardMode mode, const at::Tensor& fire_counts) {
  const RowView v = check_inputs(op, pre, threshold, bandwidth);
  ForwardArgs args;
  if (fire_counts.defined()) {
    check_fire_counts(op, fire_counts, v, pre);
    args.fire_counts = fire_counts;
  }
  args.pre = as_rows(pre, v);
  args.threshold = threshold.contiguous();
  args.out = empty({v.rows, v.features}, pre.options());
  args.mode = mode;
  const bool with_l0 = mode == ForwardMode::kJumpReLUL0;
  // float32 whatever pre's dtype: exact counts up to 2^24 (docs/ops.md#l0-dtype).
  if (with_l0) args.l0 = at::zeros({v.rows}, pre.options().dtype(at::kFloat));
  if (pre.numel() > 0) forward(args);
  at::Tensor l0 = with_l0 ? args.l0.view(v.leading) : at::Tensor();
  return {args.out.view(pre.sizes()), l0};
}

// ste_to_input changes only the backward; the forward ops take it so that autograd sees it.
template <ForwardFn forward, EmptyFn empty>
at::Tensor jumprelu_counted_op(const at::Tensor& pre, const at::Tensor& threshold, double bandwidth,
                               bool /*ste_to_input*/, const at::Tensor& fire_counts) {
  return std::get<0>(run_forward<forward, empty>("jumprelu", pre, threshold, bandwidth,
                                                 ForwardMode::kJumpReLU, fire_counts));
}

template <ForwardFn forward, EmptyFn empty>
at::Tensor step_counted_op(const at::Tensor& pre, const at::Tensor& threshold, double bandwidth,
                           bool /*ste_to_input*/, const at::Tensor& fire_counts) {
  return std::get<0>(run_forward<forward, empty>("step", pre, threshold, bandwidth,
                                                 ForwardMode::kStep, fire_counts));
}

template <ForwardFn forward, EmptyFn empty>
std::tuple<at::Tensor, at::Tensor> jumprelu_l0_counted_op(const at::Tensor& pre,
                                                          const at::Tensor& threshold,
                                                          double bandwidth, bool /*ste_to_input*/,
                                                          const at::Tensor& fire_counts) {
  return run_forward<forward, empty>("jumprelu_l0", pre, threshold, bandwidth,
                                     ForwardMode::kJumpReLUL0, fire_counts);
}

// The plain ops: the .counted ones without a buffer.
template <ForwardFn forward, EmptyFn empty>
at::Tensor jumprelu_op(const at::Tensor& pre, const at::Tensor& threshold, double bandwidth,
                       bool ste_to_input) {
  return jumprelu_counted_op<forward, empty>(pre, threshold, bandwidth, ste_to_input, {});
}

template <ForwardFn forward, EmptyFn empty>
at::Tensor step_op(const at::Tensor& pre, const at::Tensor& threshold, double bandwidth,
                   bool ste_to_input) {
  return step_counted_op<forward, empty>(pre, threshold, bandwidth, ste_to_input, {});
}

template <ForwardFn forward, EmptyFn empty>
std::tuple<at::Tensor, at::Tensor> jumprelu_l0_op(const at::Tensor& pre,
                                                  const at::Tensor& threshold, double bandwidth,
                                                  bool ste_to_input) {
  return jumprelu_l0_counted_op<forward, empty>(pre, threshold, bandwidth, ste_to_input, {});
}

// Which gradients the caller asked for (autograd passes ctx.needs_input_grad).
struct Wanted {
  bool ste_to_input;
  bool grad_pre;
  bool grad_threshold;
};

// Shared by the three backward ops: grad_acts and grad_l0 may each be missing. An output that
// was not asked for is returned as an empty tensor, and never computed.
template <BackwardFn backward, EmptyFn empty>
std::tuple<at::Tensor, at::Tensor> run_backward(const char* op,
                                                const std::optional<at::Tensor>& grad_acts,
                                                bool step, const std::optional<at::Tensor>& grad_l0,
                                                const at::Tensor& pre, const at::Tensor& threshold,
                                                double bandwidth, Wanted wanted) {
  const RowView v = check_inputs(op, pre, threshold, bandwidth);
  BackwardArgs args;
  args.pre = as_rows(pre, v);
  args.threshold = threshold.contiguous();
  args.bandwidth = bandwidth;
  args.step = step;
  args.ste_to_input = wanted.ste_to_input;
  const bool has_acts = grad_acts.has_value() && grad_acts->defined();
  const bool has_l0 = grad_l0.has_value() && grad_l0->defined();
  if (has_acts) {
    args.grad_acts = check_grad(op, "the output gradient", *grad_acts, pre.scalar_type(),
                                "pre's dtype", pre, pre.sizes(), {v.rows, v.features});
  }
  if (has_l0) {
    args.grad_l0 = check_grad(op, "the l0 gradient", *grad_l0, at::kFloat, "l0's dtype", pre,
                              v.leading, {v.rows});
  }
  // pre gets H·grad_acts (JumpReLU) and, with ste_to_input, every element's θ term.
  const bool pre_has_terms = (has_acts && !step) || (wanted.ste_to_input && (has_acts || has_l0));
  at::Tensor grad_pre = at::empty({0}, pre.options());
  if (wanted.grad_pre) {
    if (pre_has_terms) {
      args.grad_pre = empty({v.rows, v.features}, pre.options());
      grad_pre = args.grad_pre.view(pre.sizes());
    } else {
      grad_pre = empty(pre.sizes(), pre.options()).zero_();  // asked for, but no term reaches pre
    }
  }
  at::Tensor grad_threshold = at::empty({0}, threshold.options());
  if (wanted.grad_threshold) {
    grad_threshold = at::empty({v.features}, threshold.options());
    args.grad_threshold = grad_threshold;
  }
  const bool work = args.grad_pre.defined() || args.grad_threshold.defined();
  if (pre.numel() > 0 && (has_acts || has_l0) && work) {
    backward(args);
  } else if (args.grad_threshold.defined()) {
    args.grad_threshold.zero_();
  }
  return {grad_pre, grad_threshold};
}

template <BackwardFn backward, EmptyFn empty>
std::tuple<at::Tensor, at::Tensor> jumprelu_backward_op(
    const at::Tensor& grad_acts, const at::Tensor& pre, const at::Tensor& threshold,
    double bandwidth, bool ste_to_input, bool needs_grad_pre, bool needs_grad_threshold) {
  return run_backward<backward, empty>("jumprelu_backward", grad_acts, false, std::nullopt, pre,
                                       threshold, bandwidth,
                                       {ste_to_input, needs_grad_pre, needs_grad_threshold});
}

template <BackwardFn backward, EmptyFn empty>
std::tuple<at::Tensor, at::Tensor> step_backward_op(const at::Tensor& grad_step,
                                                    const at::Tensor& pre,
                                                    const at::Tensor& threshold, double bandwidth,
                                                    bool ste_to_input, bool needs_grad_pre,
                                                    bool needs_grad_threshold) {
  return run_backward<backward, empty>("step_backward", grad_step, true, std::nullopt, pre,
                                       threshold, bandwidth,
                                       {ste_to_input, needs_grad_pre, needs_grad_threshold});
}

template <BackwardFn backward, EmptyFn empty>
std::tuple<at::Tensor, at::Tensor> jumprelu_l0_backward_op(
    const std::optional<at::Tensor>& grad_acts, const std::optional<at::Tensor>& grad_l0,
    const at::Tensor& pre, const at::Tensor& threshold, double bandwidth, bool ste_to_input,
    bool needs_grad_pre, bool needs_grad_threshold) {
  return run_backward<backward, empty>("jumprelu_l0_backward", grad_acts, false, grad_l0, pre,
                                       threshold, bandwidth,
                                       {ste_to_input, needs_grad_pre, needs_grad_threshold});
}

template <ForwardFn forward, BackwardFn backward, EmptyFn empty = empty_default>
void register_ops(torch::Library& m) {
  m.impl("jumprelu", &jumprelu_op<forward, empty>);
  m.impl("step", &step_op<forward, empty>);
  m.impl("jumprelu_l0", &jumprelu_l0_op<forward, empty>);
  m.impl("jumprelu.counted", &jumprelu_counted_op<forward, empty>);
  m.impl("step.counted", &step_counted_op<forward, empty>);
  m.impl("jumprelu_l0.counted", &jumprelu_l0_counted_op<forward, empty>);
  m.impl("jumprelu_backward", &jumprelu_backward_op<backward, empty>);
  m.impl("step_backward", &step_backward_op<backward, empty>);
  m.impl("jumprelu_l0_backward", &jumprelu_l0_backward_op<backward, empty>);
}

}  // namespace jumprelu_ext
