// Operator schemas and the `_C` Python module that loads this library.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing jumprelu_ext._C runs the static TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

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
