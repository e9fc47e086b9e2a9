// C++ entry points to the extension's ops through the dispatcher, so a call reaches the CPU or
// the CUDA kernel by the tensors' device (the schemas are in registration.cpp). Used by
// IterationState and by the C++ tests.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

namespace sipl_fast::ops {

template <typename Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline at::Tensor step_delta(const at::Tensor& prev, const at::Tensor& next) {
  static const auto op = handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("sipl_fast::step_delta");
  return op.call(prev, next);
}

inline at::Tensor step_update(at::Tensor& current, at::Tensor& previous, const at::Tensor& next, double blend,
                              const std::optional<at::Tensor>& rows = std::nullopt) {
  static const auto op = handle<at::Tensor(at::Tensor&, at::Tensor&, const at::Tensor&, double,
                                           const std::optional<at::Tensor>&)>("sipl_fast::step_update");
  return op.call(current, previous, next, blend, rows);
}

inline at::Tensor active_indices(const at::Tensor& deltas, double tol) {
  static const auto op = handle<at::Tensor(const at::Tensor&, double)>("sipl_fast::active_indices");
  return op.call(deltas, tol);
}

inline void scatter_rows(at::Tensor& dst, const at::Tensor& index, const at::Tensor& src) {
  static const auto op =
      handle<void(at::Tensor&, const at::Tensor&, const at::Tensor&)>("sipl_fast::scatter_rows");
  op.call(dst, index, src);
}

}  // namespace sipl_fast::ops
