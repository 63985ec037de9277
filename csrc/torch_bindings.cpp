// The op contract: every schema of namespace moe_finalize, and the device-generic op bodies.
// ops.py mirrors these schemas in typed wrappers and fake (meta) implementations.
#include <Python.h>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdio>
#include <optional>
#include <string>

#include "checks.h"
#include "finalize.h"

namespace moe_finalize {
namespace {

// A new contiguous [rows, cols] tensor on `like`'s device. The C shim skips the boxed dispatcher
// call that torch::stable::new_empty makes: it is on the per-call hot path.
Tensor allocate_like(const Tensor& like, int64_t rows, int64_t cols,
                     std::optional<ScalarType> dtype = std::nullopt) {
  int32_t device_type, torch_dtype;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  if (dtype.has_value()) {
    torch_dtype = torch::stable::detail::to<int32_t>(torch::stable::detail::from(*dtype));
  } else {
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_dtype(like.get(), &torch_dtype));
  }
  const int64_t sizes[2] = {rows, cols};
  const int64_t strides[2] = {cols, 1};
  AtenTensorHandle handle;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(
      2, sizes, strides, torch_dtype, device_type, like.get_device_index(), &handle));
  return Tensor(handle);
}

void launch(const FinalizeProblem& p, const Tensor& input) {
  if (p.num_tokens == 0 || p.hidden == 0) return;  // nothing to write: launch nothing
  if (input.is_cuda()) {
#ifdef USE_CUDA
    if (p.input_dtype == ScalarType::Float8_e4m3fn || p.bias != nullptr) {
      launch_finalize_ext_cuda(p, input.get_device_index());
    } else {
      launch_finalize_cuda(p, input.get_device_index());
    }
#else
    STD_TORCH_CHECK(false, "finalize: this build of moe_finalize_plugin has no CUDA kernels");
#endif
  } else {
    launch_finalize_cpu(p);
  }
}

Tensor finalize(Tensor input, std::optional<Tensor> row_map, std::optional<Tensor> weights,
                std::optional<int64_t> top_k, std::optional<Tensor> residual, double scale,
                std::optional<Tensor> input_scales, std::optional<ScalarType> out_dtype,
                std::optional<Tensor> bias, std::optional<Tensor> expert_ids) {
  const FinalizeExtras extras{input_scales, out_dtype, bias, expert_ids};
  FinalizeProblem p =
      check_finalize_args(input, row_map, weights, top_k, residual, scale, nullptr, extras);
  Tensor out = allocate_like(input, p.num_tokens, p.hidden, p.out_dtype);
  bind_output(p, out);
  launch(p, input);
  return out;
}

void finalize_out(Tensor out, Tensor input, std::optional<Tensor> row_map,
                  std::optional<Tensor> weights, std::optional<int64_t> top_k,
                  std::optional<Tensor> residual, double scale,
                  std::optional<Tensor> input_scales, std::optional<Tensor> bias,
                  std::optional<Tensor> expert_ids) {
  const FinalizeExtras extras{input_scales, std::nullopt, bias, expert_ids};
  FinalizeProblem p =
      check_finalize_args(input, row_map, weights, top_k, residual, scale, &out, extras);
  launch(p, input);
}

void finalize_fp8_out(Tensor out, Tensor out_scales, Tensor input, std::optional<Tensor> row_map,
                      std::optional<Tensor> weights, std::optional<int64_t> top_k,
                      std::optional<Tensor> residual, double scale,
                      std::optional<Tensor> input_scales, std::optional<Tensor> bias,
                      std::optional<Tensor> expert_ids, double amax_floor) {
  FinalizeExtras extras{input_scales, std::nullopt, bias, expert_ids};
  extras.fp8_out = true;
  FinalizeProblem p =
      check_finalize_args(input, row_map, weights, top_k, residual, scale, &out, extras);
  check_out_scales(p, input, out_scales, out, amax_floor);
  if (p.num_tokens == 0 || p.hidden == 0) return;
  if (input.is_cuda()) {
#ifdef USE_CUDA
    launch_finalize_fp8_out_cuda(p, input.get_device_index());
#else
    STD_TORCH_CHECK(false, "finalize: this build of moe_finalize_plugin has no CUDA kernels");
#endif
  } else {
    launch_finalize_fp8_out_cpu(p);
  }
}

#ifdef USE_CUDA
// The forward's checks, plus grad_out: [T, H], dtype of input, on input's device.
FinalizeProblem check_backward_args(const Tensor& grad_out, const Tensor& input,
                                    const std::optional<Tensor>& row_map,
                                    const std::optional<Tensor>& weights,
                                    std::optional<int64_t> top_k, double scale) {
  FinalizeProblem p = check_finalize_args(input, row_map, weights, top_k, std::nullopt, scale,
                                          nullptr);
  STD_TORCH_CHECK(input.is_cuda() && grad_out.is_cuda() &&
                      grad_out.get_device_index() == input.get_device_index(),
                  "finalize backward: grad_out and input must be on the same CUDA device");
  check_rows(grad_out, "grad_out", p.num_tokens, p.hidden);
  STD_TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(),
                  "finalize backward: grad_out must have the dtype of input");
  p.residual = grad_out.data_ptr();
  p.residual_row_stride = grad_out.stride(0);
  return p;
}

Tensor finalize_grad_input(Tensor grad_out, Tensor input, std::optional<Tensor> row_map,
                           std::optional<Tensor> weights, std::optional<int64_t> top_k,
                           double scale) {
  FinalizeProblem p = check_backward_args(grad_out, input, row_map, weights, top_k, scale);
  Tensor grad_input = allocate_like(input, p.num_rows, p.hidden);
  bind_output(p, grad_input);
  if (p.num_rows == 0 || p.hidden == 0) return grad_input;
  // Scratch for the counting plan (zeroed by its kernels); decode-sized problems need none.
  std::optional<Tensor> count;
  if (grad_input_counts_slots(p)) {
    count = torch::stable::new_empty(input, {p.num_rows}, ScalarType::Int);
  }
  launch_grad_input_cuda(p, count ? static_cast<int32_t*>(count->data_ptr()) : nullptr,
                         input.get_device_index());
  return grad_input;
}

Tensor finalize_grad_weights(Tensor grad_out, Tensor input, std::optional<Tensor> row_map,
                             std::optional<Tensor> weights, std::optional<int64_t> top_k,
                             double scale) {
  FinalizeProblem p = check_backward_args(grad_out, input, row_map, weights, top_k, scale);
  Tensor grad_weights = allocate_like(input, p.num_tokens, p.top_k, ScalarType::Float);
  if (p.num_tokens > 0 && p.top_k > 0) {
    launch_grad_weights_cuda(p, static_cast<float*>(grad_weights.data_ptr()),
                             input.get_device_index());
  }
  return grad_weights;
}
#endif

}  // namespace
}  // namespace moe_finalize

STABLE_TORCH_LIBRARY(moe_finalize, m) {
  // out[t] = cast(residual[t] + scale * sum_{k: row_map[t,k] >= 0} weights[t,k] * input[row_map[t,k]]),
  // fp32 accumulation in fixed k-order. row_map=None: input is [T*K, H] token-major.
  m.def(
      "finalize(Tensor input, Tensor? row_map, Tensor? weights, *, int? top_k=None, "
      "Tensor? residual=None, float scale=1.0, Tensor? input_scales=None, "
      "ScalarType? out_dtype=None, Tensor? bias=None, Tensor? expert_ids=None) -> Tensor");
  // Same, written into a preallocated `out` (vLLM's output buffer, CUDA graphs); out may be residual.
  // out's dtype is the output dtype (no out_dtype argument).
  m.def(
      "finalize_out(Tensor(a!) out, Tensor input, Tensor? row_map, Tensor? weights, *, "
      "int? top_k=None, Tensor? residual=None, float scale=1.0, Tensor? input_scales=None, "
      "Tensor? bias=None, Tensor? expert_ids=None) -> ()");
  // Same sum, quantised: out (e4m3 [T, H]) and out_scales (fp32 [T, ceil(H/128)], any strides),
  // out_scales[t, b] = max(amax of block b, amax_floor) / 448, out = e4m3(value / out_scales).
  m.def(
      "finalize_fp8_out(Tensor(a!) out, Tensor(b!) out_scales, Tensor input, Tensor? row_map, "
      "Tensor? weights, *, int? top_k=None, Tensor? residual=None, float scale=1.0, "
      "Tensor? input_scales=None, Tensor? bias=None, Tensor? expert_ids=None, "
      "float amax_floor=1e-10) -> ()");
  // Backward, CUDA only: grad_input[row_map[t,k]] += scale * weights[t,k] * grad_out[t]
  // ([P, H], dtype of input; deterministic, no float atomics).
  m.def(
      "finalize_grad_input(Tensor grad_out, Tensor input, Tensor? row_map, Tensor? weights, *, "
      "int? top_k=None, float scale=1.0) -> Tensor");
  // Backward, CUDA only: grad_weights[t,k] = scale * <grad_out[t], input[row_map[t,k]]> (fp32 [T, K]).
  m.def(
      "finalize_grad_weights(Tensor grad_out, Tensor input, Tensor? row_map, Tensor? weights, *, "
      "int? top_k=None, float scale=1.0) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(moe_finalize, CPU, m) {
  m.impl("finalize", TORCH_BOX(&moe_finalize::finalize));
  m.impl("finalize_out", TORCH_BOX(&moe_finalize::finalize_out));
  m.impl("finalize_fp8_out", TORCH_BOX(&moe_finalize::finalize_fp8_out));
}

#ifdef USE_CUDA
STABLE_TORCH_LIBRARY_IMPL(moe_finalize, CUDA, m) {
  m.impl("finalize", TORCH_BOX(&moe_finalize::finalize));
  m.impl("finalize_out", TORCH_BOX(&moe_finalize::finalize_out));
  m.impl("finalize_fp8_out", TORCH_BOX(&moe_finalize::finalize_fp8_out));
  m.impl("finalize_grad_input", TORCH_BOX(&moe_finalize::finalize_grad_input));
  m.impl("finalize_grad_weights", TORCH_BOX(&moe_finalize::finalize_grad_weights));
}
#endif

// What this binary contains, for `moe-finalize` (read through ctypes: no Python API needed).
extern "C" __attribute__((visibility("default"))) const char* moe_finalize_build_info() {
#ifdef USE_CUDA
  return "cpu,cuda";
#else
  return "cpu";
#endif
}

// The commit this binary was built from (setup.py passes it as hex digits and a dirty bit):
// "4a4f841", "4a4f841-dirty" for uncommitted changes, "unknown" without git.
#ifndef MOE_FINALIZE_SOURCE_REV
#define MOE_FINALIZE_SOURCE_REV 0
#define MOE_FINALIZE_SOURCE_DIRTY 0
#endif
extern "C" __attribute__((visibility("default"))) const char* moe_finalize_source_rev() {
  static const std::string text = [] {  // formatted once; a function-local static is thread-safe
    const unsigned long long rev = MOE_FINALIZE_SOURCE_REV;
    if (rev == 0) return std::string("unknown");
    char buffer[32];
    std::snprintf(buffer, sizeof buffer, "%07llx%s", rev,
                  MOE_FINALIZE_SOURCE_DIRTY ? "-dirty" : "");
    return std::string(buffer);
  }();
  return text.c_str();
}

// An importable module, so `import moe_finalize_plugin._C` loads the library and its ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
