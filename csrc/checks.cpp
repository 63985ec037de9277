#include "checks.h"

#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <utility>

namespace moe_finalize {
namespace {

bool is_float_dtype(ScalarType t) {
  return t == ScalarType::BFloat16 || t == ScalarType::Half || t == ScalarType::Float;
}

const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Half: return "float16";
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    case ScalarType::Float8_e4m3fn: return "float8_e4m3fn";
    default: return "an unsupported dtype";
  }
}

// Byte range [begin, end) spanned by a strided tensor; empty tensors span nothing.
std::pair<uintptr_t, uintptr_t> byte_span(const Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t low = 0, high = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    int64_t extent = (t.size(d) - 1) * t.stride(d);
    (extent < 0 ? low : high) += extent;
  }
  auto elem = static_cast<int64_t>(t.element_size());
  return {begin + low * elem, begin + (high + 1) * elem};
}

bool overlaps(const Tensor& a, const Tensor& b) {
  auto [a0, a1] = byte_span(a);
  auto [b0, b1] = byte_span(b);
  return a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1;
}

bool same_view(const Tensor& a, const Tensor& b) {
  if (a.data_ptr() != b.data_ptr() || a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != b.size(d) || (a.size(d) > 1 && a.stride(d) != b.stride(d))) return false;
  }
  return true;
}

void check_same_device(const Tensor& input, const Tensor& other, const char* name) {
  STD_TORCH_CHECK(other.get_device_index() == input.get_device_index() &&
                      other.is_cuda() == input.is_cuda(),
                  "finalize: ", name, " must be on the same device as input (input on ",
                  input.is_cuda() ? "cuda:" : "cpu:", static_cast<int>(input.get_device_index()),
                  ", ", name, " on ", other.is_cuda() ? "cuda:" : "cpu:",
                  static_cast<int>(other.get_device_index()), ")");
}

// Output dtype: e4m3 for finalize_fp8_out; `out`'s for finalize_out; else out_dtype, defaulting
// to bf16 for FP8 input and to input's dtype otherwise (float input keeps its dtype).
ScalarType resolve_out_dtype(ScalarType input_dtype, const Tensor* out,
                             const FinalizeExtras& extras) {
  const bool fp8_input = input_dtype == ScalarType::Float8_e4m3fn;
  if (extras.fp8_out) {
    STD_TORCH_CHECK(out == nullptr || out->scalar_type() == ScalarType::Float8_e4m3fn,
                    "finalize: out must be float8_e4m3fn, got ", dtype_name(out->scalar_type()));
    return ScalarType::Float8_e4m3fn;
  }
  if (out != nullptr) {
    if (fp8_input) {
      STD_TORCH_CHECK(is_float_dtype(out->scalar_type()), "finalize: out must be bfloat16, "
                      "float16 or float32 for float8_e4m3fn input, got ",
                      dtype_name(out->scalar_type()));
    } else {
      STD_TORCH_CHECK(out->scalar_type() == input_dtype, "finalize: out must have the dtype of "
                      "input (", dtype_name(input_dtype), "), got ",
                      dtype_name(out->scalar_type()));
    }
    return out->scalar_type();
  }
  if (!extras.out_dtype.has_value()) return fp8_input ? ScalarType::BFloat16 : input_dtype;
  const ScalarType want = *extras.out_dtype;
  if (fp8_input) {
    STD_TORCH_CHECK(is_float_dtype(want), "finalize: out_dtype must be bfloat16, float16 or "
                    "float32 for float8_e4m3fn input, got ", dtype_name(want));
  } else {
    STD_TORCH_CHECK(want == input_dtype, "finalize: out_dtype must be None or the dtype of input ("
                    , dtype_name(input_dtype), ") for float input, got ", dtype_name(want));
  }
  return want;
}

// FP8 input needs fp32 scales [P] (per row) or [P, ceil(H/128)] (per block), any strides.
void check_input_scales(FinalizeProblem& p, const Tensor& input,
                        const std::optional<Tensor>& input_scales, bool fp8_input) {
  if (!fp8_input) {
    STD_TORCH_CHECK(!input_scales.has_value(), "finalize: input_scales is only for "
                    "float8_e4m3fn input (input is ", dtype_name(input.scalar_type()), ")");
    return;
  }
  STD_TORCH_CHECK(input_scales.has_value(), "finalize: float8_e4m3fn input needs input_scales "
                  "(fp32 [P] per row or [P, ceil(H/128)] per 128-column block)");
  const Tensor& s = *input_scales;
  const int64_t blocks = (p.hidden + kScaleBlock - 1) / kScaleBlock;
  check_same_device(input, s, "input_scales");
  STD_TORCH_CHECK(s.scalar_type() == ScalarType::Float, "finalize: input_scales must be "
                  "float32, got ", dtype_name(s.scalar_type()));
  if (s.dim() == 1) {
    STD_TORCH_CHECK(s.size(0) == p.num_rows, "finalize: input_scales must be [P] = [",
                    p.num_rows, "] or [P, ceil(H/128)] = [", p.num_rows, ", ", blocks, "], got [",
                    s.size(0), "]");
    p.scale_stride_row = s.stride(0);
    p.scale_stride_block = 0;
  } else {
    STD_TORCH_CHECK(s.dim() == 2 && s.size(0) == p.num_rows && s.size(1) == blocks,
                    "finalize: input_scales must be [P] = [", p.num_rows,
                    "] or [P, ceil(H/128)] = [", p.num_rows, ", ", blocks, "] (any strides), got ",
                    s.dim(), "-D with sizes [", s.size(0), s.dim() == 2 ? ", " : "",
                    s.dim() == 2 ? s.size(1) : 0, "]");
    p.scale_stride_row = s.stride(0);
    p.scale_stride_block = s.stride(1);
  }
  p.scales = static_cast<const float*>(s.data_ptr());
}

// bias [E, H] (any float dtype, unit last-dim stride) and expert_ids [T, K] come together.
void check_bias(FinalizeProblem& p, const Tensor& input, const std::optional<Tensor>& bias,
                const std::optional<Tensor>& expert_ids) {
  STD_TORCH_CHECK(bias.has_value() == expert_ids.has_value(),
                  "finalize: bias and expert_ids must be given together (got ",
                  bias.has_value() ? "bias without expert_ids)" : "expert_ids without bias)");
  if (!bias.has_value()) return;
  const Tensor& b = *bias;
  const Tensor& e = *expert_ids;
  check_same_device(input, b, "bias");
  check_same_device(input, e, "expert_ids");
  STD_TORCH_CHECK(b.dim() == 2 && b.size(1) == p.hidden, "finalize: bias must be 2-D [E, H] "
                  "with H = ", p.hidden, ", got ", b.dim(), "-D");
  STD_TORCH_CHECK(is_float_dtype(b.scalar_type()), "finalize: bias must be bfloat16, float16 "
                  "or float32, got ", dtype_name(b.scalar_type()));
  STD_TORCH_CHECK(b.size(1) <= 1 || b.stride(1) == 1, "finalize: bias must have unit stride in "
                  "its last dimension, got stride ", b.stride(1));
  STD_TORCH_CHECK(e.dim() == 2 && e.size(0) == p.num_tokens && e.size(1) == p.top_k,
                  "finalize: expert_ids must be [T, K] = [", p.num_tokens, ", ", p.top_k,
                  "], got ", e.dim(), "-D with size(0) = ", e.dim() > 0 ? e.size(0) : 0);
  STD_TORCH_CHECK(e.scalar_type() == ScalarType::Int || e.scalar_type() == ScalarType::Long,
                  "finalize: expert_ids must be int32 or int64, got ",
                  dtype_name(e.scalar_type()));
  p.bias = b.data_ptr();
  p.bias_row_stride = b.stride(0);
  p.num_experts = b.size(0);
  p.bias_dtype = b.scalar_type();
  p.expert_ids = e.data_ptr();
  p.expert_stride_t = e.stride(0);
  p.expert_stride_k = e.stride(1);
  p.expert_ids_is_int64 = e.scalar_type() == ScalarType::Long;
}

}  // namespace

void check_rows(const Tensor& t, const char* name, int64_t rows, int64_t cols) {
  STD_TORCH_CHECK(t.dim() == 2, "finalize: ", name, " must be 2-D [", rows, ", ", cols,
                  "], got ", t.dim(), "-D");
  STD_TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, "finalize: ", name, " must be [", rows,
                  ", ", cols, "], got [", t.size(0), ", ", t.size(1), "]");
  STD_TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "finalize: ", name,
                  " must have unit stride in its last dimension, got stride ", t.stride(1));
}

FinalizeProblem check_finalize_args(const Tensor& input, const std::optional<Tensor>& row_map,
                                    const std::optional<Tensor>& weights,
                                    std::optional<int64_t> top_k,
                                    const std::optional<Tensor>& residual, double scale,
                                    const Tensor* out, const FinalizeExtras& extras) {
  FinalizeProblem p;
  STD_TORCH_CHECK(input.is_cpu() || input.is_cuda(),
                  "finalize: input must be a CPU or CUDA tensor");
  STD_TORCH_CHECK(input.dim() == 2, "finalize: input must be 2-D [P, H], got ", input.dim(),
                  "-D");
  const bool fp8_input = input.scalar_type() == ScalarType::Float8_e4m3fn;
  STD_TORCH_CHECK(is_float_dtype(input.scalar_type()) || fp8_input,
                  "finalize: input must be bfloat16, float16 or float32, got ",
                  dtype_name(input.scalar_type()),
                  " (float8_e4m3fn is accepted too, with input_scales)");
  STD_TORCH_CHECK(input.size(1) <= 1 || input.stride(1) == 1,
                  "finalize: input must have unit stride in its last dimension, got stride ",
                  input.stride(1));
  p.num_rows = input.size(0);
  p.hidden = input.size(1);
  p.input = input.data_ptr();
  p.input_row_stride = input.stride(0);
  p.input_dtype = input.scalar_type();
  p.out_dtype = resolve_out_dtype(input.scalar_type(), out, extras);
  p.residual_dtype = p.out_dtype;
  p.scale = static_cast<float>(scale);
  STD_TORCH_CHECK(!top_k.has_value() || *top_k >= 1, "finalize: top_k must be >= 1, got ",
                  top_k.value_or(0));

  if (row_map.has_value()) {
    const Tensor& m = *row_map;
    check_same_device(input, m, "row_map");
    STD_TORCH_CHECK(m.dim() == 2, "finalize: row_map must be 2-D [T, K], got ", m.dim(), "-D");
    STD_TORCH_CHECK(m.scalar_type() == ScalarType::Int || m.scalar_type() == ScalarType::Long,
                    "finalize: row_map must be int32 or int64, got ", dtype_name(m.scalar_type()));
    p.num_tokens = m.size(0);
    p.top_k = m.size(1);
    STD_TORCH_CHECK(p.top_k >= 1 || p.num_tokens == 0,
                    "finalize: row_map must have at least one column (K >= 1)");
    p.row_map = m.data_ptr();
    p.map_stride_t = m.stride(0);
    p.map_stride_k = m.stride(1);
    p.map_is_int64 = m.scalar_type() == ScalarType::Long;
  } else if (weights.has_value()) {
    STD_TORCH_CHECK(weights->dim() == 2, "finalize: weights must be 2-D [T, K], got ",
                    weights->dim(), "-D");
    p.num_tokens = weights->size(0);
    p.top_k = weights->size(1);
    STD_TORCH_CHECK(p.top_k >= 1, "finalize: weights must have at least one column (K >= 1)");
    STD_TORCH_CHECK(p.num_rows == p.num_tokens * p.top_k, "finalize: with row_map=None, input "
                    "must hold T*K = ", p.num_tokens * p.top_k, " rows (weights is [",
                    p.num_tokens, ", ", p.top_k, "]), got ", p.num_rows);
  } else {
    STD_TORCH_CHECK(top_k.has_value(),
                    "finalize: top_k is required when row_map and weights are both None");
    p.top_k = *top_k;
    STD_TORCH_CHECK(p.num_rows % p.top_k == 0, "finalize: with row_map=None, input rows (",
                    p.num_rows, ") must be a multiple of top_k (", p.top_k, ")");
    p.num_tokens = p.num_rows / p.top_k;
  }
  STD_TORCH_CHECK(!top_k.has_value() || *top_k == p.top_k, "finalize: top_k (", *top_k,
                  ") does not match K = ", p.top_k, " of row_map/weights");
  STD_TORCH_CHECK(p.num_rows > 0 || p.num_tokens == 0 || !row_map.has_value(),
                  "finalize: input is empty (P = 0) but row_map is [", p.num_tokens, ", ",
                  p.top_k, "]");

  if (weights.has_value()) {
    const Tensor& w = *weights;
    check_same_device(input, w, "weights");
    STD_TORCH_CHECK(w.dim() == 2, "finalize: weights must be 2-D [T, K], got ", w.dim(), "-D");
    STD_TORCH_CHECK(w.size(0) == p.num_tokens && w.size(1) == p.top_k,
                    "finalize: weights must be [T, K] = [", p.num_tokens, ", ", p.top_k,
                    "] to match row_map, got [", w.size(0), ", ", w.size(1), "]");
    STD_TORCH_CHECK(is_float_dtype(w.scalar_type()),
                    "finalize: weights must be float32, bfloat16 or float16, got ",
                    dtype_name(w.scalar_type()));
    p.weights = w.data_ptr();
    p.weight_stride_t = w.stride(0);
    p.weight_stride_k = w.stride(1);
    p.weight_dtype = w.scalar_type();
  }

  if (residual.has_value()) {
    const Tensor& r = *residual;
    check_same_device(input, r, "residual");
    check_rows(r, "residual", p.num_tokens, p.hidden);
    if (extras.fp8_out) {
      STD_TORCH_CHECK(is_float_dtype(r.scalar_type()), "finalize: residual must be bfloat16, "
                      "float16 or float32, got ", dtype_name(r.scalar_type()));
    } else if (!fp8_input) {
      STD_TORCH_CHECK(r.scalar_type() == input.scalar_type(), "finalize: residual must have the "
                      "dtype of input (", dtype_name(input.scalar_type()), "), got ",
                      dtype_name(r.scalar_type()));
    } else {
      STD_TORCH_CHECK(r.scalar_type() == p.out_dtype, "finalize: residual must have the output "
                      "dtype (", dtype_name(p.out_dtype), "), got ", dtype_name(r.scalar_type()));
    }
    p.residual = r.data_ptr();
    p.residual_row_stride = r.stride(0);
    p.residual_dtype = r.scalar_type();
  }

  check_input_scales(p, input, extras.input_scales, fp8_input);
  check_bias(p, input, extras.bias, extras.expert_ids);

  if (out != nullptr) {
    check_same_device(input, *out, "out");
    check_rows(*out, "out", p.num_tokens, p.hidden);
    STD_TORCH_CHECK(!overlaps(*out, input), "finalize: out overlaps input");
    const std::pair<const std::optional<Tensor>*, const char*> read_only[] = {
        {&row_map, "row_map"}, {&weights, "weights"}, {&extras.input_scales, "input_scales"},
        {&extras.bias, "bias"}, {&extras.expert_ids, "expert_ids"}};
    for (const auto& [tensor, name] : read_only) {
      if (tensor->has_value()) {
        STD_TORCH_CHECK(!overlaps(*out, **tensor), "finalize: out overlaps ", name);
      }
    }
    if (residual.has_value()) {
      STD_TORCH_CHECK(same_view(*out, *residual) || !overlaps(*out, *residual),
                      "finalize: out partially overlaps residual (out may be residual itself, "
                      "nothing else)");
    }
    bind_output(p, *out);
  }
  return p;
}

void check_out_scales(FinalizeProblem& p, const Tensor& input, const Tensor& out_scales,
                      const Tensor& out, double amax_floor) {
  const int64_t blocks = (p.hidden + kScaleBlock - 1) / kScaleBlock;
  check_same_device(input, out_scales, "out_scales");
  STD_TORCH_CHECK(out_scales.scalar_type() == ScalarType::Float,
                  "finalize: out_scales must be float32, got ",
                  dtype_name(out_scales.scalar_type()));
  STD_TORCH_CHECK(out_scales.dim() == 2 && out_scales.size(0) == p.num_tokens &&
                      out_scales.size(1) == blocks,
                  "finalize: out_scales must be [T, ceil(H/128)] = [", p.num_tokens, ", ", blocks,
                  "] (any strides; a transposed [ceil(H/128), T] buffer is passed as .t())");
  STD_TORCH_CHECK(amax_floor > 0.0, "finalize: amax_floor must be > 0, got ", amax_floor);
  STD_TORCH_CHECK(!overlaps(out_scales, out), "finalize: out_scales overlaps out");
  STD_TORCH_CHECK(!overlaps(out_scales, input), "finalize: out_scales overlaps input");
  p.out_scales = static_cast<float*>(out_scales.data_ptr());
  p.out_scale_stride_t = out_scales.stride(0);
  p.out_scale_stride_block = out_scales.stride(1);
  p.amax_floor = static_cast<float>(amax_floor);
}

void bind_output(FinalizeProblem& problem, const Tensor& out) {
  problem.out = out.data_ptr();
  problem.out_row_stride = out.stride(0);
}

}  // namespace moe_finalize
