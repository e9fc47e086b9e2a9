// Shared argument checks of the extension's ops: one wording for every op.
#pragma once
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

namespace sipl_fast {

// prev and new images of one refinement step: same shape, dtype and device, batch first.
inline void check_image_pair(const char* op, const at::Tensor& prev, const at::Tensor& next) {
  TORCH_CHECK(prev.dim() >= 1, op, ": expected batched tensors, got a 0-d tensor");
  TORCH_CHECK(prev.sizes() == next.sizes(), op, ": shapes differ: ", prev.sizes(), " vs ", next.sizes());
  TORCH_CHECK(prev.scalar_type() == next.scalar_type(), op, ": dtypes differ: ", prev.scalar_type(),
              " vs ", next.scalar_type());
  TORCH_CHECK(prev.device() == next.device(), op, ": devices differ: ", prev.device(), " vs ", next.device());
  TORCH_CHECK(at::isFloatingType(prev.scalar_type()), op, ": expected floating tensors, got ",
              prev.scalar_type());
}

// Two tensors that must share dtype and device and agree in every dimension but the first
// (a batch of rows and the buffer the rows come from or go to).
inline void check_same_rows(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                            const at::Tensor& b) {
  TORCH_CHECK(a.dim() >= 1 && b.dim() >= 1, op, ": expected batched tensors, got ", name_a, " ",
              a.sizes(), " and ", name_b, " ", b.sizes());
  TORCH_CHECK(a.sizes().slice(1) == b.sizes().slice(1), op, ": ", name_a, " ", a.sizes(), " and ", name_b,
              " ", b.sizes(), " differ beyond the batch dimension");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": dtypes differ: ", name_a, " ", a.scalar_type(),
              " vs ", name_b, " ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op, ": devices differ: ", name_a, " ", a.device(), " vs ", name_b,
              " ", b.device());
}

// A buffer the op writes in place: the kernels address it as one dense block.
inline void check_writable(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " is written in place and must be contiguous");
}

// Tensors read and written by one pass must not share memory: an element written early
// would be read again as input later in the pass.
inline void check_no_overlap(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                             const at::Tensor& b) {
  TORCH_CHECK(at::get_overlap_status(a, b) == at::MemOverlapStatus::No, op, ": ", name_a, " and ", name_b,
              " share memory; pass separate buffers");
}

// A row index (one int64 entry per row of `rows_of`, same device). Values are checked only on
// the CPU (`limit` rows in the target, each used once); a device index is checked by its kernel.
inline void check_row_index(const char* op, const at::Tensor& index, int64_t count, int64_t limit,
                            const at::Tensor& rows_of) {
  TORCH_CHECK(index.dim() == 1 && index.size(0) == count, op, ": expected a 1-D index of ", count,
              " entries, got shape ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
  TORCH_CHECK(index.device() == rows_of.device(), op, ": index is on ", index.device(), " but the rows are on ",
              rows_of.device());
  if (!index.device().is_cpu()) return;
  const auto dense = index.contiguous();
  const int64_t* values = dense.const_data_ptr<int64_t>();
  std::vector<bool> used(static_cast<size_t>(limit), false);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t row = values[i];
    TORCH_CHECK(row >= 0 && row < limit, op, ": index ", row, " out of range for ", limit, " rows");
    TORCH_CHECK(!used[row], op, ": index ", row, " appears twice (each row may be written once)");
    used[row] = true;
  }
}

// Per-image deltas: a 1-D floating tensor.
inline void check_deltas(const char* op, const at::Tensor& deltas) {
  TORCH_CHECK(deltas.dim() == 1, op, ": expected 1-D deltas, got shape ", deltas.sizes());
  TORCH_CHECK(at::isFloatingType(deltas.scalar_type()), op, ": expected floating deltas, got ",
              deltas.scalar_type());
}

// scatter_rows(dst, index, src): src rows shaped like dst rows, one distinct target row each.
inline void check_scatter_rows(const at::Tensor& dst, const at::Tensor& index, const at::Tensor& src) {
  constexpr const char* op = "scatter_rows";
  check_same_rows(op, "dst", dst, "src", src);
  check_row_index(op, index, src.size(0), dst.size(0), dst);
  check_writable(op, "dst", dst);
  check_no_overlap(op, "dst", dst, "src", src);
}

}  // namespace sipl_fast
