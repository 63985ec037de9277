// Argument checks shared by the CPU and CUDA paths, and the resolved problem both kernels read.
// Every rule of SPEC.md's "Bad input" section lives here once; ops.py's fake impl mirrors it.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <optional>

namespace moe_finalize {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Everything a kernel needs, with strides in elements and pointers already offset.
struct FinalizeProblem {
  int64_t num_tokens = 0;  // T
  int64_t top_k = 0;       // K
  int64_t hidden = 0;      // H
  int64_t num_rows = 0;    // P: rows of `input`; map entries outside [0, P) are skipped / rejected

  const void* input = nullptr;
  int64_t input_row_stride = 0;
  ScalarType input_dtype = ScalarType::BFloat16;

  const void* row_map = nullptr;  // nullptr: row of (t, k) is t * K + k
  int64_t map_stride_t = 0, map_stride_k = 0;
  bool map_is_int64 = false;

  const void* weights = nullptr;  // nullptr: every weight is 1.0
  int64_t weight_stride_t = 0, weight_stride_k = 0;
  ScalarType weight_dtype = ScalarType::Float;

  const void* residual = nullptr;
  int64_t residual_row_stride = 0;

  void* out = nullptr;
  int64_t out_row_stride = 0;
  ScalarType out_dtype = ScalarType::BFloat16;

  float scale = 1.0f;

  // FP8 input: element (r, h) is input[r, h] * scales[r * scale_stride_row + (h / 128) *
  // scale_stride_block]; per-row scales have scale_stride_block = 0. nullptr for float input.
  const float* scales = nullptr;
  int64_t scale_stride_row = 0, scale_stride_block = 0;

  // Per-expert bias: slot (t, k) adds bias[expert_ids[t, k]] to its row before weighting.
  const void* bias = nullptr;
  int64_t bias_row_stride = 0;
  int64_t num_experts = 0;
  ScalarType bias_dtype = ScalarType::Float;
  const void* expert_ids = nullptr;
  int64_t expert_stride_t = 0, expert_stride_k = 0;
  bool expert_ids_is_int64 = false;

  ScalarType residual_dtype = ScalarType::BFloat16;

  // finalize_fp8_out: one fp32 scale per 128-column block of each output row.
  float* out_scales = nullptr;
  int64_t out_scale_stride_t = 0, out_scale_stride_block = 0;
  float amax_floor = 0.0f;
};

// Columns per FP8 scale block (DeepSeek-V3 / FlashInfer block quantisation).
constexpr int64_t kScaleBlock = 128;

// The keyword arguments of issue 7; all absent means the plain bf16/fp16/fp32 op.
// Hidden like the stable Tensor it holds (it never crosses the library boundary).
struct __attribute__((visibility("hidden"))) FinalizeExtras {
  std::optional<Tensor> input_scales;
  std::optional<ScalarType> out_dtype;  // functional op only; finalize_out: out decides
  std::optional<Tensor> bias;
  std::optional<Tensor> expert_ids;
  bool fp8_out = false;  // finalize_fp8_out: out is e4m3, residual may be any float dtype
};

// Validates every argument (raising with the argument's name) and resolves T, K and strides.
// `out` is the preallocated output of finalize_out; pass nullptr for the functional op, whose
// output is allocated afterwards and filled in by `bind_output`.
FinalizeProblem check_finalize_args(const Tensor& input, const std::optional<Tensor>& row_map,
                                    const std::optional<Tensor>& weights,
                                    std::optional<int64_t> top_k,
                                    const std::optional<Tensor>& residual, double scale,
                                    const Tensor* out, const FinalizeExtras& extras = {});

// finalize_fp8_out's out_scales: fp32 [T, ceil(H/128)], any strides; binds it into `problem`.
void check_out_scales(FinalizeProblem& problem, const Tensor& input, const Tensor& out_scales,
                      const Tensor& out, double amax_floor);

void bind_output(FinalizeProblem& problem, const Tensor& out);

// `name` must be 2-D [rows, cols] with unit stride in its last dimension.
void check_rows(const Tensor& t, const char* name, int64_t rows, int64_t cols);

}  // namespace moe_finalize
