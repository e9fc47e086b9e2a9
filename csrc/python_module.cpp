// The Python module entry point of sipl_fast._C: an importable module with no Python functions.
// Importing it runs the TORCH_LIBRARY registrations; the ops are reached through torch.ops and
// the classes through torch.classes.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
