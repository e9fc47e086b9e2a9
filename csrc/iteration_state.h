// IterationState: the buffers of one refinement run, kept between steps and between calls.
//
// A refinement run (docs/design.md, "Refinement engine") feeds each step's output back as the next input. The state
// owns that image (current), the one before it (previous), per-image deltas, an active mask and
// any named feature maps the engine wants to keep (encoder features, privileged features). The
// buffers are allocated once per (batch, shape, dtype, device) and reused by later runs with the
// same shape, so a run's memory does not grow with its number of steps, and their addresses stay
// fixed (what CUDA graph capture needs).
//
// Exposed to Python as torch.classes.sipl_fast.IterationState (registration.cpp). Not thread-safe:
// one state per concurrent run.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include <map>
#include <string>

namespace sipl_fast {

class IterationState : public torch::CustomClassHolder {
 public:
  // Makes current/previous shaped like like_image (contiguous, same dtype and device), deltas
  // (float32, B) and active (bool, B). Returns true when it allocated, false when the buffers of
  // the previous run were reused (same storage). Either way deltas are reset to +inf and active to
  // true (a new run starts with every image active); image contents are left as they are.
  bool prepare(const at::Tensor& like_image);
  // prepare(image), then copies image into current: the state of a run before its first step.
  bool start(const at::Tensor& image);
  bool prepared() const { return current_.defined(); }

  at::Tensor current() const;
  at::Tensor previous() const;
  at::Tensor deltas() const;
  at::Tensor active() const;

  // A persistent buffer for the named feature map, shaped and typed like `like` (contiguous);
  // reused while the shape, dtype and device match, reallocated otherwise.
  at::Tensor feature(const std::string& name, const at::Tensor& like);

  // step_update on the whole batch: previous <- current, current <- next + blend*(current - next).
  // Stores and returns the per-image deltas (a new tensor, so callers may keep it).
  at::Tensor step(const at::Tensor& next, double blend);
  // The same for a subset: image i of next updates row rows[i]; other rows, and their deltas,
  // are untouched. Returns a copy of all B deltas.
  at::Tensor step_rows(const at::Tensor& rows, const at::Tensor& next, double blend);
  // Sets active = deltas > tol and returns the ascending indices of the active images.
  at::Tensor active_rows(double tol);

  // Bytes held by every buffer (images, deltas, mask, features).
  int64_t nbytes() const;
  // Frees every buffer; the next prepare allocates again.
  void release();

 private:
  at::Tensor current_, previous_, deltas_, active_;
  std::map<std::string, at::Tensor> features_;
};

}  // namespace sipl_fast
