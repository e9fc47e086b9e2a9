// Deterministic per-image mean of a per-element term on the CPU, shared by step_delta and
// step_update.
//
// Each image is cut into fixed chunks of kMeanChunk elements; chunks are summed in parallel in
// float64 and the chunk sums of an image are then added in chunk order. The chunking does not
// depend on the thread count, so the result is bit-identical for any number of threads.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sipl_fast {

constexpr int64_t kMeanChunk = 32 * 1024;  // elements per task: large enough to amortise scheduling

// chunk_sum(image, begin, end) returns the float64 sum of the term over elements [begin, end)
// of `image` (and may write outputs for those elements). out[image] = that sum / per_image,
// rounded to float32 once; an image with no elements gets 0.
template <typename ChunkSum>
void per_image_mean(int64_t batch, int64_t per_image, float* out, const ChunkSum& chunk_sum) {
  const int64_t chunks = per_image ? (per_image + kMeanChunk - 1) / kMeanChunk : 0;
  std::vector<double> partial(static_cast<size_t>(batch * chunks), 0.0);
  at::parallel_for(0, batch * chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t image = task / chunks;
      const int64_t begin = (task % chunks) * kMeanChunk;
      const int64_t end = std::min(begin + kMeanChunk, per_image);
      partial[task] = chunk_sum(image, begin, end);
    }
  });
  for (int64_t image = 0; image < batch; ++image) {
    double sum = 0.0;
    for (int64_t c = 0; c < chunks; ++c) sum += partial[image * chunks + c];
    out[image] = per_image ? static_cast<float>(sum / static_cast<double>(per_image)) : 0.f;
  }
}

}  // namespace sipl_fast
