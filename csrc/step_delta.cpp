// step_delta on the CPU: per-image mean |new - prev|, float64 accumulation, float32 result.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "per_image_mean.h"

namespace sipl_fast {

at::Tensor step_delta_cpu(const at::Tensor& prev, const at::Tensor& next) {
  check_image_pair("step_delta", prev, next);
  const auto a = prev.contiguous();
  const auto b = next.contiguous();
  const int64_t batch = a.size(0);
  const int64_t per_image = batch ? a.numel() / batch : 0;
  auto out = at::empty({batch}, a.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "step_delta_cpu", [&] {
    // Differences in the op-math type (float for half/bfloat16/float, double for double), so
    // float64 images keep their precision; the sum is float64 (per_image_mean).
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    per_image_mean(batch, per_image, out.data_ptr<float>(), [&](int64_t image, int64_t begin, int64_t end) {
      const scalar_t* xa = pa + image * per_image;
      const scalar_t* xb = pb + image * per_image;
      double sum = 0.0;
      for (int64_t j = begin; j < end; ++j) {
        sum += std::abs(static_cast<acc_t>(xb[j]) - static_cast<acc_t>(xa[j]));
      }
      return sum;
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(sipl_fast, CPU, m) { m.impl("step_delta", &step_delta_cpu); }

}  // namespace sipl_fast
