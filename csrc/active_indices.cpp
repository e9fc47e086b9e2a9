// active_indices on the CPU: ascending int64 indices of the images whose delta exceeds tol
// (the active set of an early-stopping refinement).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"

namespace sipl_fast {

at::Tensor active_indices_cpu(const at::Tensor& deltas, double tol) {
  check_deltas("active_indices", deltas);
  const auto values = deltas.contiguous();
  const int64_t count = values.numel();
  // One sequential pass: the batch is small and the order of the output is the order of the input.
  std::vector<int64_t> kept;
  kept.reserve(static_cast<size_t>(count));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "active_indices_cpu", [&] {
    // Compared in the deltas' own dtype, as torch compares a tensor with a Python float.
    const scalar_t threshold = static_cast<scalar_t>(tol);
    const scalar_t* data = values.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < count; ++i) {
      if (data[i] > threshold) kept.push_back(i);
    }
  });
  auto out = at::empty({static_cast<int64_t>(kept.size())}, values.options().dtype(at::kLong));
  std::copy(kept.begin(), kept.end(), out.data_ptr<int64_t>());
  return out;
}

TORCH_LIBRARY_IMPL(sipl_fast, CPU, m) { m.impl("active_indices", &active_indices_cpu); }

}  // namespace sipl_fast
