// step_update on CUDA: one pass per element moves current into previous, writes the blended
// new image into current and sums |current_new - previous_new| per image (deterministic
// two-pass sum, per_image_mean.cuh).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../step_update.h"
#include "per_image_mean.cuh"

namespace sipl_fast {
namespace {

template <typename scalar_t>
struct BlendStep {
  using acc_t = at::opmath_type<scalar_t>;  // float for half/bfloat16/float, double for double
  scalar_t* current;
  scalar_t* previous;
  const scalar_t* next;
  const int64_t* rows;  // row of current/previous written by image i of next; nullptr: row i
  int64_t row_count;    // rows in current, for the bounds check
  int64_t per_image;
  acc_t blend;

  __device__ float operator()(int64_t image, int64_t j) const {
    const int64_t row = rows ? rows[image] : image;
    CUDA_KERNEL_ASSERT(row >= 0 && row < row_count);
    const int64_t k = row * per_image + j;
    const acc_t old_value = static_cast<acc_t>(current[k]);
    const acc_t new_value = static_cast<acc_t>(next[image * per_image + j]);
    const scalar_t blended = static_cast<scalar_t>(new_value + blend * (old_value - new_value));
    previous[k] = current[k];
    current[k] = blended;
    const acc_t diff = static_cast<acc_t>(blended) - old_value;
    return static_cast<float>(diff < 0 ? -diff : diff);
  }
};

}  // namespace

at::Tensor step_update_cuda(at::Tensor& current, at::Tensor& previous, const at::Tensor& next, double blend,
                            const std::optional<at::Tensor>& rows) {
  check_step_update(current, previous, next, rows);
  const c10::cuda::CUDAGuard guard(current.device());
  const auto fresh = next.contiguous();
  const auto row_index = rows.has_value() ? rows->contiguous() : at::Tensor();
  const int64_t images = fresh.size(0);
  const int64_t per_image = current.size(0) ? current.numel() / current.size(0) : 0;
  auto deltas = at::empty({images}, current.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, current.scalar_type(), "step_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BlendStep<scalar_t> term{current.data_ptr<scalar_t>(),
                                   previous.data_ptr<scalar_t>(),
                                   fresh.const_data_ptr<scalar_t>(),
                                   rows.has_value() ? row_index.const_data_ptr<int64_t>() : nullptr,
                                   current.size(0),
                                   per_image,
                                   static_cast<acc_t>(blend)};
    cuda::per_image_mean(term, images, per_image, deltas);
  });
  return deltas;
}

TORCH_LIBRARY_IMPL(sipl_fast, CUDA, m) { m.impl("step_update", &step_update_cuda); }

}  // namespace sipl_fast
