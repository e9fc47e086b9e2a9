// active_indices on CUDA: ascending int64 indices of the entries of deltas greater than tol.
//
// One block walks the deltas tile by tile; within a tile each warp ranks its kept entries with
// a ballot, and warps are offset by the kept counts of the warps before them, so the output
// keeps the input order. The count is read back to size the result (one device sync, like
// torch.nonzero): call it between steps, not inside a captured CUDA graph.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"

namespace sipl_fast {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void compact_above(const scalar_t* __restrict__ deltas, int64_t count, scalar_t tol,
                              int64_t* __restrict__ out, int64_t* __restrict__ kept_count) {
  __shared__ int kept_per_warp[kWarps];
  __shared__ int64_t written;  // entries written by earlier tiles
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (threadIdx.x == 0) written = 0;
  __syncthreads();
  for (int64_t tile = 0; tile < count; tile += kThreads) {
    const int64_t i = tile + threadIdx.x;
    // Both sides in float (double for double): tol was rounded to the deltas' dtype on the host.
    const bool keep = i < count && static_cast<acc_t>(deltas[i]) > static_cast<acc_t>(tol);
    const unsigned kept_in_warp = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) kept_per_warp[warp] = __popc(kept_in_warp);
    __syncthreads();
    if (keep) {
      int64_t slot = written + __popc(kept_in_warp & ((1u << lane) - 1u));
      for (int w = 0; w < warp; ++w) slot += kept_per_warp[w];
      out[slot] = i;
    }
    __syncthreads();  // every thread has read `written` and kept_per_warp of this tile
    if (threadIdx.x == 0) {
      for (int w = 0; w < kWarps; ++w) written += kept_per_warp[w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *kept_count = written;
}

}  // namespace

at::Tensor active_indices_cuda(const at::Tensor& deltas, double tol) {
  check_deltas("active_indices", deltas);
  const c10::cuda::CUDAGuard guard(deltas.device());
  const auto values = deltas.contiguous();
  const int64_t count = values.numel();
  auto out = at::empty({count}, values.options().dtype(at::kLong));
  auto kept = at::empty({1}, out.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "active_indices_cuda", [&] {
    // Compared in the deltas' own dtype, as torch compares a tensor with a Python float.
    compact_above<scalar_t><<<1, kThreads, 0, stream>>>(values.const_data_ptr<scalar_t>(), count,
                                                         static_cast<scalar_t>(tol), out.data_ptr<int64_t>(),
                                                         kept.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.narrow(0, 0, kept.item<int64_t>());
}

TORCH_LIBRARY_IMPL(sipl_fast, CUDA, m) { m.impl("active_indices", &active_indices_cuda); }

}  // namespace sipl_fast
