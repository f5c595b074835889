// Operator schemas (the contract: docs/ops.md). Schema `float` is C++ `double`.
// The backward ops return an empty (0-element) tensor for an output that was not asked for.
#include <torch/library.h>

TORCH_LIBRARY(jumprelu_ext, m) {
  m.def(
      "jumprelu(Tensor pre, Tensor threshold, float bandwidth, bool ste_to_input=False) -> Tensor");
  m.def("step(Tensor pre, Tensor threshold, float bandwidth, bool ste_to_input=False) -> Tensor");
  m.def(
      "jumprelu_l0(Tensor pre, Tensor threshold, float bandwidth, bool ste_to_input=False)"
      " -> (Tensor, Tensor)");
  m.def(
      "jumprelu_backward(Tensor grad_acts, Tensor pre, Tensor threshold, float bandwidth,"
      " bool ste_to_input=False, bool needs_grad_pre=True, bool needs_grad_threshold=True)"
      " -> (Tensor, Tensor)");
  m.def(
      "step_backward(Tensor grad_step, Tensor pre, Tensor threshold, float bandwidth,"
      " bool ste_to_input=False, bool needs_grad_pre=True, bool needs_grad_threshold=True)"
      " -> (Tensor, Tensor)");
  m.def(
      "jumprelu_l0_backward(Tensor? grad_acts, Tensor? grad_l0, Tensor pre, Tensor threshold,"
      " float bandwidth, bool ste_to_input=False, bool needs_grad_pre=True,"
      " bool needs_grad_threshold=True) -> (Tensor, Tensor)");
}
