// scatter_rows on CUDA: dst[index[i]] = src[i] along dim 0, any dtype. Rows are copied as the
// widest machine word (16 down to 1 bytes) that divides the row size and both base addresses.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../checks.h"

namespace sipl_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocksPerRow = 1024;

template <typename word_t>
__global__ void copy_rows(word_t* __restrict__ dst, const word_t* __restrict__ src,
                          const int64_t* __restrict__ index, int64_t row_words, int64_t dst_rows) {
  const int64_t row = blockIdx.y;
  const int64_t target = index[row];
  CUDA_KERNEL_ASSERT(target >= 0 && target < dst_rows);
  const word_t* from = src + row * row_words;
  word_t* to = dst + target * row_words;
  for (int64_t j = blockIdx.x * int64_t(kThreads) + threadIdx.x; j < row_words; j += gridDim.x * int64_t(kThreads)) {
    to[j] = from[j];
  }
}

template <typename word_t>
void launch(at::Tensor& dst, const at::Tensor& rows, const at::Tensor& targets, int64_t row_bytes) {
  const int64_t row_words = row_bytes / sizeof(word_t);
  const int64_t blocks = std::min(kMaxBlocksPerRow, std::max<int64_t>(1, (row_words + kThreads - 1) / kThreads));
  copy_rows<word_t><<<dim3(blocks, rows.size(0)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<word_t*>(dst.data_ptr()), static_cast<const word_t*>(rows.const_data_ptr()),
      targets.const_data_ptr<int64_t>(), row_words, dst.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool fits(int64_t bytes, const void* a, const void* b, int64_t word) {
  return bytes % word == 0 && reinterpret_cast<uintptr_t>(a) % word == 0 && reinterpret_cast<uintptr_t>(b) % word == 0;
}

}  // namespace

void scatter_rows_cuda(at::Tensor& dst, const at::Tensor& index, const at::Tensor& src) {
  check_scatter_rows(dst, index, src);
  const c10::cuda::CUDAGuard guard(dst.device());
  const auto rows = src.contiguous();
  const auto targets = index.contiguous();
  const int64_t count = rows.size(0);
  if (count == 0 || rows.nbytes() == 0) return;
  TORCH_CHECK(count <= 65535, "scatter_rows: at most 65535 rows per call on CUDA, got ", count);
  const int64_t row_bytes = rows.nbytes() / count;
  const void* from = rows.const_data_ptr();
  const void* to = dst.data_ptr();
  if (fits(row_bytes, from, to, 16)) {
    launch<uint4>(dst, rows, targets, row_bytes);
  } else if (fits(row_bytes, from, to, 8)) {
    launch<uint2>(dst, rows, targets, row_bytes);
  } else if (fits(row_bytes, from, to, 4)) {
    launch<uint32_t>(dst, rows, targets, row_bytes);
  } else if (fits(row_bytes, from, to, 2)) {
    launch<uint16_t>(dst, rows, targets, row_bytes);
  } else {
    launch<uint8_t>(dst, rows, targets, row_bytes);
  }
}

TORCH_LIBRARY_IMPL(sipl_fast, CUDA, m) { m.impl("scatter_rows", &scatter_rows_cuda); }

}  // namespace sipl_fast
