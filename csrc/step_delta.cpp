// step_delta on the CPU: per-image mean absolute difference, float32 accumulation.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"

namespace sipl_fast {

at::Tensor step_delta_cpu(const at::Tensor& prev, const at::Tensor& next) {
  check_image_pair("step_delta", prev, next);
  const auto a = prev.contiguous();
  const auto b = next.contiguous();
  const int64_t batch = a.size(0);
  const int64_t per_image = batch ? a.numel() / batch : 0;
  auto out = at::empty({batch}, a.options().dtype(at::kFloat));
  float* out_ptr = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "step_delta_cpu", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        // float64 running sum over a float32 term keeps the mean exact to float32 for
        // images of any size; the result is rounded to float32 once.
        double sum = 0.0;
        const scalar_t* xa = pa + i * per_image;
        const scalar_t* xb = pb + i * per_image;
        for (int64_t j = 0; j < per_image; ++j) {
          sum += std::fabs(static_cast<float>(xb[j]) - static_cast<float>(xa[j]));
        }
        out_ptr[i] = per_image ? static_cast<float>(sum / static_cast<double>(per_image)) : 0.f;
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(sipl_fast, CPU, m) { m.impl("step_delta", &step_delta_cpu); }

}  // namespace sipl_fast
