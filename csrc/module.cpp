// The `_C` Python module: importing jumprelu_ext._C loads this library, whose static
// TORCH_LIBRARY registrations define the ops. (CMake builds leave this file out and
// are loaded with torch.ops.load_library instead.)
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
