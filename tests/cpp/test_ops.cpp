// C++ tests of the sipl_fast ops and IterationState on CPU tensors (run by ctest, see
// CMakeLists.txt). The ops are called through the dispatcher (csrc/ops.h:
// c10::Dispatcher::findSchemaOrThrow), as Python's torch.ops does, and checked against plain
// ATen arithmetic in float64.
//
// Usage: test_ops <case> runs one case; test_ops runs them all; exit status 1 on any failure.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/function.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <torch/custom_class.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "iteration_state.h"
#include "ops.h"

namespace {

int failures = 0;

#define EXPECT(cond)                                                            \
  do {                                                                          \
    if (!(cond)) {                                                              \
      std::cerr << __FILE__ << ":" << __LINE__ << ": expected " #cond << "\n"; \
      ++failures;                                                               \
    }                                                                           \
  } while (0)

// The statement must throw c10::Error whose message contains `fragment`.
#define EXPECT_THROWS(statement, fragment)                                                          \
  do {                                                                                              \
    bool thrown = false;                                                                            \
    try {                                                                                           \
      statement;                                                                                    \
    } catch (const c10::Error& error) {                                                             \
      thrown = std::string(error.what()).find(fragment) != std::string::npos;                       \
      if (!thrown) std::cerr << __FILE__ << ":" << __LINE__ << ": wrong message: " << error.what(); \
    }                                                                                               \
    if (!thrown) {                                                                                  \
      std::cerr << __FILE__ << ":" << __LINE__ << ": expected " #statement " to throw '" << fragment \
                << "'\n";                                                                           \
      ++failures;                                                                                   \
    }                                                                                               \
  } while (0)

at::Tensor index_of(const std::vector<int64_t>& values) {
  auto out = at::empty({static_cast<int64_t>(values.size())}, at::kLong);
  std::copy(values.begin(), values.end(), out.data_ptr<int64_t>());
  return out;
}

std::vector<int64_t> values_of(const at::Tensor& index) {
  const auto dense = index.contiguous();
  return {dense.const_data_ptr<int64_t>(), dense.const_data_ptr<int64_t>() + dense.numel()};
}

// Per-image mean |a - b| in float64.
at::Tensor mean_abs_diff64(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().flatten(1).mean({1});
}

bool close(const at::Tensor& got, const at::Tensor& expected, double rtol, double atol = 1e-7) {
  return got.to(at::kDouble).allclose(expected.to(at::kDouble), rtol, atol);
}

const std::vector<at::ScalarType> kFloatTypes = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
// Relative rounding of one stored value per dtype.
double storage_rtol(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return 1e-12;
    case at::kFloat: return 2e-7;
    case at::kHalf: return 1e-3;
    default: return 8e-3;
  }
}

at::Tensor images(at::IntArrayRef shape, at::ScalarType dtype) {
  return at::randn(shape, at::kDouble).to(dtype);
}

void test_step_delta() {
  for (const auto dtype : kFloatTypes) {
    const auto prev = images({3, 3, 17, 23}, dtype);
    const auto next = images({3, 3, 17, 23}, dtype);
    const auto got = sipl_fast::ops::step_delta(prev, next);
    EXPECT(got.scalar_type() == at::kFloat && got.size(0) == 3);
    EXPECT(close(got, mean_abs_diff64(next, prev), 1e-6));
  }
}

void test_step_update() {
  for (const auto dtype : kFloatTypes) {
    for (const double blend : {0.0, 0.3}) {
      // 2 x 3 x 129 x 131: more elements per image than one CPU chunk.
      auto current = images({2, 3, 129, 131}, dtype);
      auto previous = at::full({2, 3, 129, 131}, 7.0, current.options());
      const auto next = images({2, 3, 129, 131}, dtype);
      const auto old = current.clone();
      const auto next_before = next.clone();
      const auto deltas = sipl_fast::ops::step_update(current, previous, next, blend);
      const auto want = (next.to(at::kDouble) + (old.to(at::kDouble) - next.to(at::kDouble)) * blend).to(dtype);
      EXPECT(previous.equal(old));
      EXPECT(next.equal(next_before));
      EXPECT(blend != 0.0 || current.equal(next));
      EXPECT(close(current, want, storage_rtol(dtype), 1e-6));
      EXPECT(deltas.scalar_type() == at::kFloat);
      EXPECT(close(deltas, mean_abs_diff64(current, previous), 1e-6));
    }
  }
  // blend = 0 is step_delta of the old and the new image, bit for bit on the CPU.
  auto current = images({2, 3, 40, 37}, at::kFloat);
  auto previous = at::empty_like(current);
  const auto next = images({2, 3, 40, 37}, at::kFloat);
  const auto expected = sipl_fast::ops::step_delta(current, next);
  EXPECT(sipl_fast::ops::step_update(current, previous, next, 0.0).equal(expected));
}

void test_step_update_rows() {
  auto current = images({5, 3, 11, 13}, at::kFloat);
  auto previous = images({5, 3, 11, 13}, at::kFloat);
  const auto next = images({3, 3, 11, 13}, at::kFloat);
  const auto rows = index_of({4, 0, 2});
  const auto untouched = index_of({1, 3});
  const auto current_before = current.clone();
  const auto previous_before = previous.clone();
  const auto deltas = sipl_fast::ops::step_update(current, previous, next, 0.5, rows);
  const auto old_rows = current_before.index_select(0, rows);
  const auto want = (next.to(at::kDouble) + (old_rows.to(at::kDouble) - next.to(at::kDouble)) * 0.5).to(at::kFloat);
  EXPECT(current.index_select(0, untouched).equal(current_before.index_select(0, untouched)));
  EXPECT(previous.index_select(0, untouched).equal(previous_before.index_select(0, untouched)));
  EXPECT(previous.index_select(0, rows).equal(old_rows));
  EXPECT(close(current.index_select(0, rows), want, 2e-7, 1e-6));
  EXPECT(deltas.size(0) == 3);
  EXPECT(close(deltas, mean_abs_diff64(current.index_select(0, rows), old_rows), 1e-6));
}

void test_active_indices() {
  for (const auto dtype : kFloatTypes) {
    const auto deltas = at::rand({1500}, at::kDouble).to(dtype);
    const auto got = sipl_fast::ops::active_indices(deltas, 0.4);
    EXPECT(got.scalar_type() == at::kLong);
    EXPECT(got.equal(deltas.gt(0.4).nonzero().flatten()));
  }
  auto edges = at::empty({6}, at::kFloat);
  const float values[] = {0.5f, std::numeric_limits<float>::quiet_NaN(), 0.2f,
                          std::numeric_limits<float>::infinity(), 0.50001f, 0.f};
  std::copy(std::begin(values), std::end(values), edges.data_ptr<float>());
  EXPECT(values_of(sipl_fast::ops::active_indices(edges, 0.5)) == (std::vector<int64_t>{3, 4}));
  EXPECT(values_of(sipl_fast::ops::active_indices(edges, -1.0)) == (std::vector<int64_t>{0, 2, 3, 4, 5}));
  EXPECT(sipl_fast::ops::active_indices(edges.narrow(0, 0, 0), 0.0).numel() == 0);
}

void test_scatter_rows() {
  for (const auto dtype : {at::kFloat, at::kHalf, at::kDouble, at::kLong, at::kByte, at::kBool}) {
    auto dst = (at::randn({6, 3, 5, 7}) * 10).to(dtype);
    const auto src = (at::randn({3, 3, 5, 7}) * 10).to(dtype);
    const auto index = index_of({5, 0, 3});
    const auto expected = dst.clone().index_copy_(0, index, src);
    sipl_fast::ops::scatter_rows(dst, index, src);
    EXPECT(dst.equal(expected));
  }
  // A transposed (non-contiguous) source.
  auto dst = at::zeros({4, 3});
  const auto src = at::randn({3, 2}).t();
  sipl_fast::ops::scatter_rows(dst, index_of({2, 0}), src);
  EXPECT(dst.select(0, 2).equal(src.select(0, 0)) && dst.select(0, 0).equal(src.select(0, 1)));
  EXPECT(dst.select(0, 1).abs().sum().item<float>() == 0.f);
}

void test_bad_inputs() {
  auto current = images({2, 3, 4, 5}, at::kFloat);
  auto previous = at::empty_like(current);
  const auto next = images({2, 3, 4, 5}, at::kFloat);
  EXPECT_THROWS(sipl_fast::ops::step_update(current, current, next, 0.0), "share memory");
  EXPECT_THROWS(sipl_fast::ops::step_update(current, previous, current, 0.0), "share memory");
  auto transposed = current.transpose(2, 3);
  auto transposed_prev = previous.transpose(2, 3);
  EXPECT_THROWS(sipl_fast::ops::step_update(transposed, transposed_prev, next.transpose(2, 3), 0.0), "contiguous");
  EXPECT_THROWS(sipl_fast::ops::step_update(current, previous, next.to(at::kDouble), 0.0), "dtypes differ");
  EXPECT_THROWS(sipl_fast::ops::step_update(current, previous, next.narrow(0, 0, 1), 0.0), "pass rows");
  EXPECT_THROWS(sipl_fast::ops::step_update(current, previous, next, 0.0, index_of({1, 1})), "twice");
  EXPECT_THROWS(sipl_fast::ops::step_update(current, previous, next, 0.0, index_of({0, 2})), "out of range");
  EXPECT_THROWS(sipl_fast::ops::step_delta(current, next.narrow(0, 0, 1)), "shapes differ");
  auto integers = at::zeros({2, 3}, at::kLong);
  EXPECT_THROWS(sipl_fast::ops::step_delta(integers, integers), "floating");
  EXPECT_THROWS(sipl_fast::ops::active_indices(at::rand({2, 2}), 0.1), "1-D");
  auto dst = at::zeros({4, 3});
  EXPECT_THROWS(sipl_fast::ops::scatter_rows(dst, index_of({0, 1}), at::ones({2, 4})), "beyond the batch");
  EXPECT_THROWS(sipl_fast::ops::scatter_rows(dst, index_of({0, 1}), dst.narrow(0, 2, 2)), "share memory");
  EXPECT_THROWS(sipl_fast::ops::scatter_rows(dst, index_of({0, -1}), at::ones({2, 3})), "out of range");
  EXPECT_THROWS(sipl_fast::ops::scatter_rows(dst, index_of({0}), at::ones({2, 3})), "entries");
}

// The per-image means use fixed chunks, so they do not change with the number of threads.
void test_thread_count() {
  const auto prev = images({2, 3, 200, 190}, at::kFloat);
  const auto next = images({2, 3, 200, 190}, at::kFloat);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const auto one = sipl_fast::ops::step_delta(prev, next);
  at::set_num_threads(std::max(2, threads));
  const auto many = sipl_fast::ops::step_delta(prev, next);
  at::set_num_threads(threads);
  EXPECT(one.equal(many));
}

void test_iteration_state() {
  sipl_fast::IterationState state;
  EXPECT(!state.prepared() && state.nbytes() == 0);
  const auto x0 = images({3, 3, 16, 24}, at::kFloat);
  EXPECT(state.start(x0));
  EXPECT(state.current().equal(x0));
  EXPECT(state.deltas().isinf().all().item<bool>() && state.active().all().item<bool>());
  const int64_t image_bytes = 2 * x0.nbytes() + 3 * 4 + 3 * 1;
  EXPECT(state.nbytes() == image_bytes);

  // Reuse: same storage for the same shape.
  const void* current_ptr = state.current().data_ptr();
  const void* previous_ptr = state.previous().data_ptr();
  EXPECT(!state.prepare(x0.clone()));
  EXPECT(state.current().data_ptr() == current_ptr && state.previous().data_ptr() == previous_ptr);

  // Steps: step_update on the state's buffers; memory flat across steps.
  state.start(x0);
  auto ref_current = x0.clone();
  auto ref_previous = at::empty_like(x0);
  for (int step = 0; step < 5; ++step) {
    const auto next = images({3, 3, 16, 24}, at::kFloat);
    const auto deltas = state.step(next, 0.1);
    const auto expected = sipl_fast::ops::step_update(ref_current, ref_previous, next, 0.1);
    EXPECT(deltas.equal(expected) && state.deltas().equal(expected));
    EXPECT(state.current().equal(ref_current) && state.previous().equal(ref_previous));
    EXPECT(state.nbytes() == image_bytes);
  }

  // Early stop: only the active rows change.
  auto stored = state.deltas();
  stored.fill_(0.5);
  stored.narrow(0, 1, 1).fill_(1e-4);
  const auto active = state.active_rows(1e-3);
  EXPECT(values_of(active) == (std::vector<int64_t>{0, 2}));
  EXPECT(!state.active().select(0, 1).item<bool>() && state.active().select(0, 0).item<bool>());
  const auto frozen = state.current().select(0, 1).clone();
  const auto next = images({2, 3, 16, 24}, at::kFloat);
  const auto all_deltas = state.step_rows(active, next, 0.0);
  EXPECT(state.current().select(0, 1).equal(frozen));
  EXPECT(state.current().index_select(0, active).equal(next));
  EXPECT(std::abs(all_deltas.select(0, 1).item<float>() - 1e-4f) < 1e-9f);

  // Features: reused while the shape matches, counted in nbytes.
  const auto like = at::randn({3, 96, 4, 4}).to(at::kHalf);
  const auto feature = state.feature("enc_level2", like);
  EXPECT(feature.sizes() == like.sizes() && feature.scalar_type() == at::kHalf);
  EXPECT(state.feature("enc_level2", like.clone()).data_ptr() == feature.data_ptr());
  EXPECT(state.nbytes() == image_bytes + static_cast<int64_t>(feature.nbytes()));

  // A new shape allocates; release frees everything.
  EXPECT(state.prepare(x0.narrow(0, 0, 1)));
  EXPECT(state.current().size(0) == 1);
  state.release();
  EXPECT(state.nbytes() == 0 && !state.prepared());
  EXPECT_THROWS(state.current(), "prepare");
}

// The class is registered as torch.classes.sipl_fast.IterationState with every method, and a
// method called through the registry runs the C++ code.
void test_iteration_state_registered() {
  const auto type = torch::getCustomClass("__torch__.torch.classes.sipl_fast.IterationState");
  EXPECT(type != nullptr);
  if (!type) return;
  for (const char* method : {"prepare", "start", "prepared", "current", "previous", "deltas", "active", "feature",
                             "step", "step_rows", "active_rows", "nbytes", "release"}) {
    if (type->findMethod(method) == nullptr) {
      std::cerr << "IterationState method not registered: " << method << "\n";
      ++failures;
    }
  }
  auto state = c10::make_intrusive<sipl_fast::IterationState>();
  torch::jit::Stack stack{c10::IValue(state), c10::IValue(at::randn({2, 3, 8, 8}))};
  type->getMethod("prepare").run(stack);
  EXPECT(stack.size() == 1 && stack.back().toBool());
  stack = {c10::IValue(state)};
  type->getMethod("nbytes").run(stack);
  EXPECT(stack.back().toInt() == state->nbytes() && state->nbytes() > 0);
}

#ifdef SIPL_WITH_CUDA
constexpr int kSkipped = 77;  // ctest SKIP_RETURN_CODE

// The CUDA kernels give the CPU kernels' results (bit for bit where the op only moves data or
// blends with blend = 0; to float32 rounding where the sums run in a different order).
void test_cuda_matches_cpu() {
  const auto cuda = at::Device(at::kCUDA);
  for (const auto dtype : kFloatTypes) {
    const auto prev = images({3, 3, 129, 131}, dtype);
    const auto next = images({3, 3, 129, 131}, dtype);
    EXPECT(close(sipl_fast::ops::step_delta(prev.to(cuda), next.to(cuda)).cpu(),
                 sipl_fast::ops::step_delta(prev, next), 2e-5));
    for (const double blend : {0.0, 0.3}) {
      auto cpu_current = prev.clone();
      auto cpu_previous = at::empty_like(prev);
      auto gpu_current = prev.to(cuda);
      auto gpu_previous = at::empty_like(gpu_current);
      const auto rows = index_of({2, 0});
      const auto subset = next.narrow(0, 0, 2);
      const auto cpu_deltas = sipl_fast::ops::step_update(cpu_current, cpu_previous, subset, blend, rows);
      const auto gpu_deltas =
          sipl_fast::ops::step_update(gpu_current, gpu_previous, subset.to(cuda), blend, rows.to(cuda));
      EXPECT(gpu_previous.cpu().index_select(0, rows).equal(cpu_previous.index_select(0, rows)));
      EXPECT(blend != 0.0 || gpu_current.cpu().equal(cpu_current));
      EXPECT(close(gpu_current.cpu(), cpu_current, storage_rtol(dtype), 1e-6));
      EXPECT(close(gpu_deltas.cpu(), cpu_deltas, 2e-5));
    }
    const auto deltas = at::rand({3000}, at::kDouble).to(dtype);
    EXPECT(sipl_fast::ops::active_indices(deltas.to(cuda), 0.4).cpu().equal(sipl_fast::ops::active_indices(deltas, 0.4)));
  }
  for (const auto dtype : {at::kFloat, at::kHalf, at::kByte}) {
    auto cpu_dst = (at::randn({6, 3, 5, 7}) * 10).to(dtype);
    auto gpu_dst = cpu_dst.to(cuda);
    const auto src = (at::randn({3, 3, 5, 7}) * 10).to(dtype);
    sipl_fast::ops::scatter_rows(cpu_dst, index_of({5, 0, 3}), src);
    sipl_fast::ops::scatter_rows(gpu_dst, index_of({5, 0, 3}).to(cuda), src.to(cuda));
    EXPECT(gpu_dst.cpu().equal(cpu_dst));
  }
  sipl_fast::IterationState state;
  const auto x0 = images({2, 3, 16, 24}, at::kFloat).to(cuda);
  EXPECT(state.start(x0) && state.current().is_cuda() && state.deltas().is_cuda());
  const auto next = images({2, 3, 16, 24}, at::kFloat).to(cuda);
  const auto deltas = state.step(next, 0.0);
  EXPECT(state.current().equal(next) && state.previous().equal(x0));
  EXPECT(close(deltas.cpu(), mean_abs_diff64(next.cpu(), x0.cpu()), 2e-5));
}
#endif

const std::map<std::string, std::function<void()>> kCases = {
    {"step_delta", test_step_delta},
    {"step_update", test_step_update},
    {"step_update_rows", test_step_update_rows},
    {"active_indices", test_active_indices},
    {"scatter_rows", test_scatter_rows},
    {"bad_inputs", test_bad_inputs},
    {"thread_count", test_thread_count},
    {"iteration_state", test_iteration_state},
    {"iteration_state_registered", test_iteration_state_registered},
#ifdef SIPL_WITH_CUDA
    {"cuda_matches_cpu", test_cuda_matches_cpu},
#endif
};

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && args[0] == "--check-list") {
    // ctest registers one test per case name; a case missing from that list would never run.
    if (args.size() - 1 != kCases.size()) {
      std::cerr << "CMakeLists.txt lists " << args.size() - 1 << " cases, test_ops.cpp has " << kCases.size() << "\n";
      return 1;
    }
    for (size_t i = 1; i < args.size(); ++i) {
      if (!kCases.count(args[i])) {
        std::cerr << "unknown case in CMakeLists.txt: " << args[i] << "\n";
        return 1;
      }
    }
    return 0;
  }
  at::manual_seed(0);
#ifdef SIPL_WITH_CUDA
  if (!args.empty() && args[0] == "cuda_matches_cpu" && !at::hasCUDA()) {
    std::cout << "SKIP cuda_matches_cpu: no CUDA device\n";
    return kSkipped;
  }
#endif
  for (const auto& [name, run] : kCases) {
    if (args.empty() && name == "cuda_matches_cpu" && !at::hasCUDA()) continue;
    if (!args.empty() && args[0] != name) continue;
    const int before = failures;
    try {
      run();
    } catch (const std::exception& error) {
      std::cerr << name << ": unexpected exception: " << error.what() << "\n";
      ++failures;
    }
    std::cout << (failures == before ? "PASS " : "FAIL ") << name << "\n";
  }
  if (!args.empty() && !kCases.count(args[0])) {
    std::cerr << "unknown case " << args[0] << "\n";
    return 2;
  }
  return failures ? 1 : 0;
}
