// step_update on the CPU: one pass per element moves current into previous, writes the
// blended new image into current and sums |current_new - previous_new| per image.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "per_image_mean.h"
#include "step_update.h"

namespace sipl_fast {

at::Tensor step_update_cpu(at::Tensor& current, at::Tensor& previous, const at::Tensor& next, double blend,
                           const std::optional<at::Tensor>& rows) {
  check_step_update(current, previous, next, rows);
  const auto fresh = next.contiguous();
  const auto row_index = rows.has_value() ? rows->contiguous() : at::Tensor();
  const int64_t* row_of = rows.has_value() ? row_index.const_data_ptr<int64_t>() : nullptr;
  const int64_t images = fresh.size(0);
  const int64_t per_image = current.size(0) ? current.numel() / current.size(0) : 0;
  auto deltas = at::empty({images}, current.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, current.scalar_type(), "step_update_cpu", [&] {
    // Blend and differences in the op-math type (float for half/bfloat16/float, double for
    // double), the blended value rounded to the storage type once, as torch's fallback does.
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t weight = static_cast<acc_t>(blend);
    scalar_t* cur = current.data_ptr<scalar_t>();
    scalar_t* prev = previous.data_ptr<scalar_t>();
    const scalar_t* src = fresh.const_data_ptr<scalar_t>();
    per_image_mean(images, per_image, deltas.data_ptr<float>(), [&](int64_t image, int64_t begin, int64_t end) {
      const int64_t row = row_of ? row_of[image] : image;
      scalar_t* cur_row = cur + row * per_image;
      scalar_t* prev_row = prev + row * per_image;
      const scalar_t* new_row = src + image * per_image;
      double sum = 0.0;
      for (int64_t j = begin; j < end; ++j) {
        const acc_t old_value = static_cast<acc_t>(cur_row[j]);
        const acc_t new_value = static_cast<acc_t>(new_row[j]);
        const scalar_t blended = static_cast<scalar_t>(new_value + weight * (old_value - new_value));
        prev_row[j] = cur_row[j];
        cur_row[j] = blended;
        sum += std::abs(static_cast<acc_t>(blended) - old_value);
      }
      return sum;
    });
  });
  return deltas;
}

TORCH_LIBRARY_IMPL(sipl_fast, CPU, m) { m.impl("step_update", &step_update_cpu); }

}  // namespace sipl_fast
