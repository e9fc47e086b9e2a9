// step_delta on CUDA: per-image mean absolute difference in two deterministic passes
// (per-chunk partial sums, then a fixed-order sum per image), float32 accumulation.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"

namespace sipl_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 64 * 1024;  // elements per block: enough work to hide latency

template <typename scalar_t>
__global__ void partial_abs_diff(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                 int64_t per_image, int64_t chunks, float* __restrict__ partial) {
  const int64_t image = blockIdx.y;
  const int64_t begin = blockIdx.x * kChunk;
  const int64_t end = min(begin + kChunk, per_image);
  const scalar_t* xa = a + image * per_image;
  const scalar_t* xb = b + image * per_image;
  float sum = 0.f;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    sum += fabsf(static_cast<float>(xb[j]) - static_cast<float>(xa[j]));
  }
  __shared__ float shared[kThreads];
  shared[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[image * chunks + blockIdx.x] = shared[0];
}

__global__ void finish_mean(const float* __restrict__ partial, int64_t chunks, int64_t per_image,
                            float* __restrict__ out) {
  const int64_t image = blockIdx.x;
  float sum = 0.f;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) sum += partial[image * chunks + c];
  __shared__ float shared[kThreads];
  shared[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[image] = per_image ? shared[0] / static_cast<float>(per_image) : 0.f;
}

}  // namespace

at::Tensor step_delta_cuda(const at::Tensor& prev, const at::Tensor& next) {
  check_image_pair("step_delta", prev, next);
  const c10::cuda::CUDAGuard guard(prev.device());
  const auto a = prev.contiguous();
  const auto b = next.contiguous();
  const int64_t batch = a.size(0);
  const int64_t per_image = batch ? a.numel() / batch : 0;
  auto out = at::empty({batch}, a.options().dtype(at::kFloat));
  if (batch == 0) return out;
  const int64_t chunks = std::max<int64_t>(1, (per_image + kChunk - 1) / kChunk);
  auto partial = at::empty({batch, chunks}, out.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "step_delta_cuda", [&] {
    partial_abs_diff<scalar_t><<<dim3(chunks, batch), kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), per_image, chunks,
        partial.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finish_mean<<<batch, kThreads, 0, stream>>>(partial.const_data_ptr<float>(), chunks, per_image,
                                               out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(sipl_fast, CUDA, m) { m.impl("step_delta", &step_delta_cuda); }

}  // namespace sipl_fast
