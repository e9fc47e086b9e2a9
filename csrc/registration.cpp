// Operator schemas and custom classes of the sipl_fast extension.
//
// Kernels live next to their op (csrc/<op>.cpp for CPU, csrc/cuda/<op>.cu for CUDA) and
// register with TORCH_LIBRARY_IMPL; this file only declares what exists. The Python module
// entry point is in python_module.cpp, so this file also builds without Python (CMake tests).
#include <torch/library.h>

#include "iteration_state.h"

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
  // Per-image mean |new - prev| over all non-batch elements, accumulated in float32 or wider.
  m.def("step_delta(Tensor prev, Tensor new) -> Tensor");
  // One refinement step in one pass: previous <- current, current <- new + blend*(current - new);
  // returns per-image float32 mean |current - previous| after the update. With rows, image i of
  // new updates row rows[i] (distinct) and the result has one delta per image of new.
  m.def("step_update(Tensor(a!) current, Tensor(b!) previous, Tensor new, float blend, Tensor? rows=None) -> Tensor");
  // Ascending int64 indices of the entries of deltas greater than tol (the still-active images).
  m.def("active_indices(Tensor deltas, float tol) -> Tensor");
  // dst[index[i]] = src[i] along dim 0; index entries distinct and in range.
  m.def("scatter_rows(Tensor(a!) dst, Tensor index, Tensor src) -> ()");

  m.class_<IterationState>("IterationState")
      .def(torch::init<>())
      .def("prepare", &IterationState::prepare)
      .def("start", &IterationState::start)
      .def("prepared", &IterationState::prepared)
      .def("current", &IterationState::current)
      .def("previous", &IterationState::previous)
      .def("deltas", &IterationState::deltas)
      .def("active", &IterationState::active)
      .def("feature", &IterationState::feature)
      .def("step", &IterationState::step)
      .def("step_rows", &IterationState::step_rows)
      .def("active_rows", &IterationState::active_rows)
      .def("nbytes", &IterationState::nbytes)
      .def("release", &IterationState::release);
}

}  // namespace sipl_fast
