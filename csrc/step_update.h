// Argument checks of step_update, shared by its CPU and CUDA kernels.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "checks.h"

namespace sipl_fast {

inline void check_step_update(const at::Tensor& current, const at::Tensor& previous, const at::Tensor& next,
                              const std::optional<at::Tensor>& rows) {
  constexpr const char* op = "step_update";
  check_same_rows(op, "current", current, "previous", previous);
  TORCH_CHECK(current.sizes() == previous.sizes(), op, ": current ", current.sizes(), " and previous ",
              previous.sizes(), " must have the same shape");
  check_same_rows(op, "current", current, "new", next);
  TORCH_CHECK(at::isFloatingType(current.scalar_type()), op, ": expected floating tensors, got ",
              current.scalar_type());
  if (rows.has_value()) {
    check_row_index(op, *rows, next.size(0), current.size(0), current);
  } else {
    TORCH_CHECK(next.size(0) == current.size(0), op, ": new has ", next.size(0), " images but current has ",
                current.size(0), "; pass rows to update a subset");
  }
  check_writable(op, "current", current);
  check_writable(op, "previous", previous);
  check_no_overlap(op, "current", current, "previous", previous);
  check_no_overlap(op, "current", current, "new", next);
  check_no_overlap(op, "previous", previous, "new", next);
}

}  // namespace sipl_fast
