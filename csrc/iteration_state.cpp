// IterationState (see iteration_state.h). Its steps call the ops through the dispatcher, so the
// same class drives the CPU and the CUDA kernels.
#include "iteration_state.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/gt.h>
#include <c10/core/InferenceMode.h>

#include <limits>

#include "ops.h"

namespace sipl_fast {
namespace {

bool matches(const at::Tensor& buffer, const at::Tensor& like) {
  return buffer.defined() && buffer.sizes() == like.sizes() && buffer.scalar_type() == like.scalar_type() &&
         buffer.device() == like.device();
}

// Buffers are ordinary tensors even when allocated inside torch.inference_mode(), so a state
// prepared in inference mode can still be updated outside it (inference tensors cannot be).
at::Tensor allocate(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const c10::InferenceMode ordinary_tensors(false);
  return at::empty(sizes, options);
}

const at::Tensor& require(const at::Tensor& buffer) {
  TORCH_CHECK(buffer.defined(), "IterationState: no buffers yet; call prepare(image) first");
  return buffer;
}

}  // namespace

bool IterationState::prepare(const at::Tensor& like_image) {
  TORCH_CHECK(like_image.dim() >= 1 && at::isFloatingType(like_image.scalar_type()),
              "IterationState.prepare: expected a batched floating image tensor, got ", like_image.scalar_type(),
              " of shape ", like_image.sizes());
  const bool allocate_now = !matches(current_, like_image);
  if (allocate_now) {
    current_ = previous_ = at::Tensor();  // free the old pair before allocating the new one
    current_ = allocate(like_image.sizes(), like_image.options());
    previous_ = allocate(like_image.sizes(), like_image.options());
    deltas_ = allocate({like_image.size(0)}, like_image.options().dtype(at::kFloat));
    active_ = allocate({like_image.size(0)}, like_image.options().dtype(at::kBool));
  }
  deltas_.fill_(std::numeric_limits<double>::infinity());
  active_.fill_(true);
  return allocate_now;
}

bool IterationState::start(const at::Tensor& image) {
  const bool allocated = prepare(image);
  current_.copy_(image);
  return allocated;
}

at::Tensor IterationState::current() const { return require(current_); }
at::Tensor IterationState::previous() const { return require(previous_); }
at::Tensor IterationState::deltas() const { return require(deltas_); }
at::Tensor IterationState::active() const { return require(active_); }

at::Tensor IterationState::feature(const std::string& name, const at::Tensor& like) {
  at::Tensor& buffer = features_[name];
  if (!matches(buffer, like)) {
    buffer = at::Tensor();
    buffer = allocate(like.sizes(), like.options());
  }
  return buffer;
}

at::Tensor IterationState::step(const at::Tensor& next, double blend) {
  require(current_);
  auto deltas = ops::step_update(current_, previous_, next, blend);
  deltas_.copy_(deltas);
  return deltas;
}

at::Tensor IterationState::step_rows(const at::Tensor& rows, const at::Tensor& next, double blend) {
  require(current_);
  const auto deltas = ops::step_update(current_, previous_, next, blend, rows);
  ops::scatter_rows(deltas_, rows, deltas);
  return deltas_.clone();
}

at::Tensor IterationState::active_rows(double tol) {
  require(current_);
  active_.copy_(at::gt(deltas_, tol));
  return ops::active_indices(deltas_, tol);
}

int64_t IterationState::nbytes() const {
  int64_t total = 0;
  for (const auto* buffer : {&current_, &previous_, &deltas_, &active_}) {
    if (buffer->defined()) total += static_cast<int64_t>(buffer->nbytes());
  }
  for (const auto& [name, buffer] : features_) {
    if (buffer.defined()) total += static_cast<int64_t>(buffer.nbytes());
  }
  return total;
}

void IterationState::release() {
  current_ = previous_ = deltas_ = active_ = at::Tensor();
  features_.clear();
}

}  // namespace sipl_fast
