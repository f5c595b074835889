// Operator schemas. Schema `float` is C++ `double`.
#include <torch/library.h>

TORCH_LIBRARY(jumprelu_ext, m) {
  m.def("jumprelu(Tensor pre, Tensor threshold, float bandwidth) -> Tensor");
  m.def("step(Tensor pre, Tensor threshold, float bandwidth) -> Tensor");
  m.def("jumprelu_l0(Tensor pre, Tensor threshold, float bandwidth) -> (Tensor, Tensor)");
  m.def(
      "jumprelu_backward(Tensor grad_acts, Tensor pre, Tensor threshold, float bandwidth)"
      " -> (Tensor, Tensor)");
  m.def("step_backward(Tensor grad_step, Tensor pre, Tensor threshold, float bandwidth) -> Tensor");
  m.def(
      "jumprelu_l0_backward(Tensor? grad_acts, Tensor? grad_l0, Tensor pre, Tensor threshold,"
      " float bandwidth) -> (Tensor, Tensor)");
}
