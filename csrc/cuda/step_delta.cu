// step_delta on CUDA: per-image mean |new - prev| (deterministic two-pass sum, per_image_mean.cuh).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "per_image_mean.cuh"

namespace sipl_fast {
namespace {

template <typename scalar_t>
struct AbsDiff {
  using acc_t = at::opmath_type<scalar_t>;  // float for half/bfloat16/float, double for double
  const scalar_t* prev;
  const scalar_t* next;
  int64_t per_image;

  __device__ float operator()(int64_t image, int64_t j) const {
    const int64_t k = image * per_image + j;
    const acc_t diff = static_cast<acc_t>(next[k]) - static_cast<acc_t>(prev[k]);
    return static_cast<float>(diff < 0 ? -diff : diff);
  }
};

}  // namespace

at::Tensor step_delta_cuda(const at::Tensor& prev, const at::Tensor& next) {
  check_image_pair("step_delta", prev, next);
  const c10::cuda::CUDAGuard guard(prev.device());
  const auto a = prev.contiguous();
  const auto b = next.contiguous();
  const int64_t batch = a.size(0);
  const int64_t per_image = batch ? a.numel() / batch : 0;
  auto out = at::empty({batch}, a.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "step_delta_cuda", [&] {
    const AbsDiff<scalar_t> term{a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), per_image};
    cuda::per_image_mean(term, batch, per_image, out);
  });
  return out;
}

TORCH_LIBRARY_IMPL(sipl_fast, CUDA, m) { m.impl("step_delta", &step_delta_cuda); }

}  // namespace sipl_fast
