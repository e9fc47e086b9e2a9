// scatter_rows on the CPU: dst[index[i]] = src[i] along dim 0, any dtype (rows are copied as bytes).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>

#include "checks.h"

namespace sipl_fast {

void scatter_rows_cpu(at::Tensor& dst, const at::Tensor& index, const at::Tensor& src) {
  check_scatter_rows(dst, index, src);
  const auto rows = src.contiguous();
  const auto targets = index.contiguous();
  const int64_t count = rows.size(0);
  const int64_t row_bytes = count ? rows.nbytes() / count : 0;
  const int64_t* target = targets.const_data_ptr<int64_t>();
  const auto* from = static_cast<const char*>(rows.const_data_ptr());
  auto* to = static_cast<char*>(dst.data_ptr());
  // Rows go to distinct targets (checked), so they can be copied in any order.
  at::parallel_for(0, count, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      std::memcpy(to + target[i] * row_bytes, from + i * row_bytes, static_cast<size_t>(row_bytes));
    }
  });
}

TORCH_LIBRARY_IMPL(sipl_fast, CPU, m) { m.impl("scatter_rows", &scatter_rows_cpu); }

}  // namespace sipl_fast
