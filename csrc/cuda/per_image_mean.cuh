// Deterministic per-image mean of a per-element term on CUDA, shared by step_delta and
// step_update.
//
// Pass 1: block (chunk, image) sums the term over kChunk elements of the image (a fixed-order
// shared-memory tree) into partial[image][chunk]. Pass 2: one block per image adds its chunk
// sums in a fixed order and divides. Float32 accumulation; no atomics, so the result is
// bit-identical from run to run.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

namespace sipl_fast::cuda {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 64 * 1024;  // elements per block: enough work to hide latency
constexpr int64_t kMaxImages = 65535;  // images go on gridDim.y

// Sum of the per-thread values of a block, in a fixed order; valid in thread 0.
__device__ inline float block_sum(float value) {
  __shared__ float shared[kThreads];
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  return shared[0];
}

// Term: a copyable functor, `__device__ float operator()(int64_t image, int64_t j) const`
// returning the term of element j of the image (and writing that element's outputs, if any).
template <typename Term>
__global__ void partial_sums(Term term, int64_t per_image, int64_t chunks, float* __restrict__ partial) {
  const int64_t image = blockIdx.y;
  const int64_t begin = blockIdx.x * kChunk;
  const int64_t end = min(begin + kChunk, per_image);
  float sum = 0.f;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) sum += term(image, j);
  const float total = block_sum(sum);
  if (threadIdx.x == 0) partial[image * chunks + blockIdx.x] = total;
}

// static: a non-template kernel defined in a header gets one copy per .cu file.
static __global__ void finish_mean(const float* __restrict__ partial, int64_t chunks, int64_t per_image,
                                   float* __restrict__ out) {
  const int64_t image = blockIdx.x;
  float sum = 0.f;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) sum += partial[image * chunks + c];
  const float total = block_sum(sum);
  if (threadIdx.x == 0) out[image] = per_image ? total / static_cast<float>(per_image) : 0.f;
}

// Writes the per-image means of term into out (float32, `images` entries) on the current stream.
template <typename Term>
void per_image_mean(const Term& term, int64_t images, int64_t per_image, at::Tensor& out) {
  if (images == 0) return;
  TORCH_CHECK(images <= kMaxImages, "sipl_fast: at most ", kMaxImages, " images per call on CUDA, got ", images);
  const int64_t chunks = std::max<int64_t>(1, (per_image + kChunk - 1) / kChunk);
  auto partial = at::empty({images, chunks}, out.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  partial_sums<<<dim3(chunks, images), kThreads, 0, stream>>>(term, per_image, chunks, partial.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_mean<<<images, kThreads, 0, stream>>>(partial.const_data_ptr<float>(), chunks, per_image,
                                                out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sipl_fast::cuda
