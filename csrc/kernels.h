// The contract between the backend-independent op wrappers (ops.h) and the
// per-backend kernels (cpu/, cuda/). Wrappers validate, reshape to
// [rows, features], make everything contiguous and allocate; kernels only compute.
#pragma once

#include <ATen/core/Tensor.h>

namespace jumprelu_ext {

struct ForwardArgs {
  at::Tensor pre;        // [rows, features], contiguous; float32/64, float16, bfloat16
  at::Tensor threshold;  // [features], contiguous; pre's dtype or float32
  at::Tensor out;        // [rows, features], pre's dtype: pre·H(pre−θ), or H(pre−θ) when step
  at::Tensor l0;         // [rows], pre's dtype: Σ_features H(pre−θ); undefined when not wanted
  bool step = false;
};

// grad_θ_j = −(1/ε) Σ_rows K((pre−θ_j)/ε) · (c_j · grad_elem[r, j] + grad_row[r]),
// c_j = θ_j for JumpReLU, 1 for the step. grad_pre = H(pre−θ) · grad_elem.
struct BackwardArgs {
  at::Tensor pre;             // [rows, features], contiguous
  at::Tensor threshold;       // [features], contiguous
  double bandwidth = 0;       // ε > 0, finite
  at::Tensor grad_elem;       // [rows, features] in pre's dtype, or undefined
  bool elem_is_jumprelu = true;
  at::Tensor grad_row;        // [rows] in pre's dtype (gradient of the L0 count), or undefined
  at::Tensor grad_pre;        // [rows, features] output, or undefined when not wanted
  at::Tensor grad_threshold;  // [features] output in θ's dtype
};

void forward_cpu(const ForwardArgs& args);
void backward_cpu(const BackwardArgs& args);
void forward_cuda(const ForwardArgs& args);
void backward_cuda(const BackwardArgs& args);

}  // namespace jumprelu_ext
