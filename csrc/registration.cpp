// Operator schemas of the sipl_fast extension and the Python module entry point.
//
// Kernels live next to their op (csrc/<op>.cpp for CPU, csrc/cuda/<op>.cu for CUDA) and
// register with TORCH_LIBRARY_IMPL; this file only declares what exists.
#include <Python.h>
#include <torch/library.h>

namespace sipl_fast {

bool built_with_cuda() {
#ifdef SIPL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(sipl_fast, m) {
  // Fake (meta) implementations of these ops live in sipl_fast/ops/extension.py.
  m.set_python_module("sipl_fast.ops.extension");
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  // Per-image mean |new - prev| over all non-batch elements, accumulated in float32.
  m.def("step_delta(Tensor prev, Tensor new) -> Tensor");
}

}  // namespace sipl_fast

// An importable module with no Python functions: the ops are reached through torch.ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
