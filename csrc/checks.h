// Shared argument checks of the extension's ops: one wording for every op.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace sipl_fast {

// prev and new images of one refinement step: same shape, dtype and device, batch first.
inline void check_image_pair(const char* op, const at::Tensor& prev, const at::Tensor& next) {
  TORCH_CHECK(prev.dim() >= 1, op, ": expected batched tensors, got a 0-d tensor");
  TORCH_CHECK(prev.sizes() == next.sizes(), op, ": shapes differ: ", prev.sizes(), " vs ", next.sizes());
  TORCH_CHECK(prev.scalar_type() == next.scalar_type(), op, ": dtypes differ: ", prev.scalar_type(),
              " vs ", next.scalar_type());
  TORCH_CHECK(prev.device() == next.device(), op, ": devices differ: ", prev.device(), " vs ", next.device());
  TORCH_CHECK(at::isFloatingType(prev.scalar_type()), op, ": expected floating tensors, got ",
              prev.scalar_type());
}

}  // namespace sipl_fast
