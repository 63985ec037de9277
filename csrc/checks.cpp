#include "checks.h"

#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <string>
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

// The dtype behind a shim dtype code, for the dtypes the checks name; Undefined for the rest
// (refused by every check, named "an unsupported dtype"). One shim call per tensor:
// Tensor::scalar_type() compares the code with up to 13 others, each a call into libtorch.
ScalarType dtype_from_code(int32_t code) {
  static const std::pair<int32_t, ScalarType> kKnown[] = {
      {aoti_torch_dtype_bfloat16(), ScalarType::BFloat16},
      {aoti_torch_dtype_float32(), ScalarType::Float},
      {aoti_torch_dtype_int32(), ScalarType::Int},
      {aoti_torch_dtype_float16(), ScalarType::Half},
      {aoti_torch_dtype_int64(), ScalarType::Long},
      {aoti_torch_dtype_float8_e4m3fn(), ScalarType::Float8_e4m3fn},
      {aoti_torch_dtype_float64(), ScalarType::Double}};
  for (const auto& [known, dtype] : kKnown) {
    if (known == code) return dtype;
  }
  return ScalarType::Undefined;
}

int64_t element_size(ScalarType t) {
  switch (t) {
    case ScalarType::Float8_e4m3fn: return 1;
    case ScalarType::BFloat16:
    case ScalarType::Half: return 2;
    case ScalarType::Float:
    case ScalarType::Int: return 4;
    default: return 8;  // Long, Double (Undefined never gets here: every dtype is checked first)
  }
}

// What the checks read of one tensor, fetched once per op call. Every stable-ABI accessor is a
// call into libtorch, and the checks read the same fields many times: perf had the accessors at
// ~15% of the raw op at T=1, which this took from 2.4-2.5 to 2.0-2.1 us (CPU, benchmarks/HISTORY.md
// "Session 9").
struct Meta {
  void* data;
  int64_t dim;
  const int64_t* sizes;
  const int64_t* strides;
  ScalarType dtype;
  bool cuda, cpu;
  int32_t device_index;

  explicit Meta(const Tensor& t) : data(t.data_ptr()), dim(t.dim()) {
    // The shim's arrays directly: Tensor::sizes() / strides() would each ask for dim() again.
    int64_t *sizes_array, *strides_array;
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_sizes(t.get(), &sizes_array));
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_strides(t.get(), &strides_array));
    sizes = sizes_array;
    strides = strides_array;
    int32_t code, device_type;
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_dtype(t.get(), &code));
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(t.get(), &device_type));
    dtype = dtype_from_code(code);
    cuda = device_type == aoti_torch_device_type_cuda();
    cpu = device_type == aoti_torch_device_type_cpu();
    device_index = t.get_device_index();
  }
  int64_t size(int64_t d) const { return sizes[d]; }
  int64_t stride(int64_t d) const { return strides[d]; }
};

std::optional<Meta> meta_of(const std::optional<Tensor>& t) {
  return t.has_value() ? std::optional<Meta>(Meta(*t)) : std::nullopt;
}

// Byte range [begin, end) spanned by a strided tensor; empty tensors span nothing.
std::pair<uintptr_t, uintptr_t> byte_span(const Meta& t) {
  int64_t low = 0, high = 0;
  for (int64_t d = 0; d < t.dim; ++d) {
    if (t.size(d) == 0) return {0, 0};
    int64_t extent = (t.size(d) - 1) * t.stride(d);
    (extent < 0 ? low : high) += extent;
  }
  const auto begin = reinterpret_cast<uintptr_t>(t.data);
  const int64_t elem = element_size(t.dtype);
  return {begin + low * elem, begin + (high + 1) * elem};
}

bool overlaps(const Meta& a, const Meta& b) {
  auto [a0, a1] = byte_span(a);
  auto [b0, b1] = byte_span(b);
  return a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1;
}

bool same_view(const Meta& a, const Meta& b) {
  if (a.data != b.data || a.dim != b.dim) return false;
  for (int64_t d = 0; d < a.dim; ++d) {
    if (a.size(d) != b.size(d) || (a.size(d) > 1 && a.stride(d) != b.stride(d))) return false;
  }
  return true;
}

// "[a, b, ...]" for messages.
std::string sizes_text(const Meta& t) {
  std::string text = "[";
  for (int64_t d = 0; d < t.dim; ++d) text += (d ? ", " : "") + std::to_string(t.size(d));
  return text + "]";
}

void check_same_device(const Meta& input, const Meta& other, const char* name) {
  STD_TORCH_CHECK(other.device_index == input.device_index && other.cuda == input.cuda,
                  "finalize: ", name, " must be on the same device as input (input on ",
                  input.cuda ? "cuda:" : "cpu:", static_cast<int>(input.device_index), ", ", name,
                  " on ", other.cuda ? "cuda:" : "cpu:", static_cast<int>(other.device_index),
                  ")");
}

void check_rows(const Meta& t, const char* name, int64_t rows, int64_t cols) {
  STD_TORCH_CHECK(t.dim == 2, "finalize: ", name, " must be 2-D [", rows, ", ", cols, "], got ",
                  t.dim, "-D");
  STD_TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, "finalize: ", name, " must be [", rows,
                  ", ", cols, "], got [", t.size(0), ", ", t.size(1), "]");
  STD_TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "finalize: ", name,
                  " must have unit stride in its last dimension, got stride ", t.stride(1));
}

// Output dtype: e4m3 for finalize_fp8_out; `out`'s for finalize_out; else out_dtype, defaulting
// to bf16 for FP8 input and to input's dtype otherwise (float input keeps its dtype).
ScalarType resolve_out_dtype(ScalarType input_dtype, const Meta* out,
                             const FinalizeExtras& extras) {
  const bool fp8_input = input_dtype == ScalarType::Float8_e4m3fn;
  if (extras.fp8_out) {
    STD_TORCH_CHECK(out == nullptr || out->dtype == ScalarType::Float8_e4m3fn,
                    "finalize: out must be float8_e4m3fn, got ", dtype_name(out->dtype));
    return ScalarType::Float8_e4m3fn;
  }
  if (out != nullptr) {
    if (fp8_input) {
      STD_TORCH_CHECK(is_float_dtype(out->dtype), "finalize: out must be bfloat16, "
                      "float16 or float32 for float8_e4m3fn input, got ",
                      dtype_name(out->dtype));
    } else {
      STD_TORCH_CHECK(out->dtype == input_dtype, "finalize: out must have the dtype of "
                      "input (", dtype_name(input_dtype), "), got ",
                      dtype_name(out->dtype));
    }
    return out->dtype;
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
void check_input_scales(FinalizeProblem& p, const Meta& input,
                        const std::optional<Meta>& input_scales, bool fp8_input) {
  if (!fp8_input) {
    STD_TORCH_CHECK(!input_scales.has_value(), "finalize: input_scales is only for "
                    "float8_e4m3fn input (input is ", dtype_name(input.dtype), ")");
    return;
  }
  STD_TORCH_CHECK(input_scales.has_value(), "finalize: float8_e4m3fn input needs input_scales "
                  "(fp32 [P] per row or [P, ceil(H/128)] per 128-column block)");
  const Meta& s = *input_scales;
  const int64_t blocks = (p.hidden + kScaleBlock - 1) / kScaleBlock;
  check_same_device(input, s, "input_scales");
  STD_TORCH_CHECK(s.dtype == ScalarType::Float, "finalize: input_scales must be "
                  "float32, got ", dtype_name(s.dtype));
  if (s.dim == 1) {
    STD_TORCH_CHECK(s.size(0) == p.num_rows, "finalize: input_scales must be [P] = [",
                    p.num_rows, "] or [P, ceil(H/128)] = [", p.num_rows, ", ", blocks, "], got [",
                    s.size(0), "]");
    p.scale_stride_row = s.stride(0);
    p.scale_stride_block = 0;
  } else {
    STD_TORCH_CHECK(s.dim == 2 && s.size(0) == p.num_rows && s.size(1) == blocks,
                    "finalize: input_scales must be [P] = [", p.num_rows,
                    "] or [P, ceil(H/128)] = [", p.num_rows, ", ", blocks, "] (any strides), got ",
                    s.dim, "-D with sizes ", sizes_text(s));
    p.scale_stride_row = s.stride(0);
    p.scale_stride_block = s.stride(1);
  }
  p.scales = static_cast<const float*>(s.data);
}

// bias [E, H] (any float dtype, unit last-dim stride) and expert_ids [T, K] come together.
void check_bias(FinalizeProblem& p, const Meta& input, const std::optional<Meta>& bias,
                const std::optional<Meta>& expert_ids) {
  STD_TORCH_CHECK(bias.has_value() == expert_ids.has_value(),
                  "finalize: bias and expert_ids must be given together (got ",
                  bias.has_value() ? "bias without expert_ids)" : "expert_ids without bias)");
  if (!bias.has_value()) return;
  const Meta& b = *bias;
  const Meta& e = *expert_ids;
  check_same_device(input, b, "bias");
  check_same_device(input, e, "expert_ids");
  STD_TORCH_CHECK(b.dim == 2 && b.size(1) == p.hidden, "finalize: bias must be 2-D [E, H] "
                  "with H = ", p.hidden, ", got ", b.dim, "-D");
  STD_TORCH_CHECK(is_float_dtype(b.dtype), "finalize: bias must be bfloat16, float16 "
                  "or float32, got ", dtype_name(b.dtype));
  STD_TORCH_CHECK(b.size(1) <= 1 || b.stride(1) == 1, "finalize: bias must have unit stride in "
                  "its last dimension, got stride ", b.stride(1));
  STD_TORCH_CHECK(e.dim == 2 && e.size(0) == p.num_tokens && e.size(1) == p.top_k,
                  "finalize: expert_ids must be [T, K] = [", p.num_tokens, ", ", p.top_k,
                  "], got ", e.dim, "-D with size(0) = ", e.dim > 0 ? e.size(0) : 0);
  STD_TORCH_CHECK(e.dtype == ScalarType::Int || e.dtype == ScalarType::Long,
                  "finalize: expert_ids must be int32 or int64, got ",
                  dtype_name(e.dtype));
  p.bias = b.data;
  p.bias_row_stride = b.stride(0);
  p.num_experts = b.size(0);
  p.bias_dtype = b.dtype;
  p.expert_ids = e.data;
  p.expert_stride_t = e.stride(0);
  p.expert_stride_k = e.stride(1);
  p.expert_ids_is_int64 = e.dtype == ScalarType::Long;
}

}  // namespace

void check_rows(const Tensor& t, const char* name, int64_t rows, int64_t cols) {
  check_rows(Meta(t), name, rows, cols);
}

FinalizeProblem check_finalize_args(const Tensor& input_tensor,
                                    const std::optional<Tensor>& row_map_tensor,
                                    const std::optional<Tensor>& weights_tensor,
                                    std::optional<int64_t> top_k,
                                    const std::optional<Tensor>& residual_tensor, double scale,
                                    const Tensor* out_tensor, const FinalizeExtras& extras) {
  FinalizeProblem p;
  const Meta input(input_tensor);
  const std::optional<Meta> row_map = meta_of(row_map_tensor), weights = meta_of(weights_tensor),
                            residual = meta_of(residual_tensor),
                            input_scales = meta_of(extras.input_scales),
                            bias = meta_of(extras.bias), expert_ids = meta_of(extras.expert_ids);
  const std::optional<Meta> out =
      out_tensor != nullptr ? std::optional<Meta>(Meta(*out_tensor)) : std::nullopt;
  STD_TORCH_CHECK(input.cpu || input.cuda,
                  "finalize: input must be a CPU or CUDA tensor");
  STD_TORCH_CHECK(input.dim == 2, "finalize: input must be 2-D [P, H], got ", input.dim,
                  "-D");
  const bool fp8_input = input.dtype == ScalarType::Float8_e4m3fn;
  STD_TORCH_CHECK(is_float_dtype(input.dtype) || fp8_input,
                  "finalize: input must be bfloat16, float16 or float32, got ",
                  dtype_name(input.dtype),
                  " (float8_e4m3fn is accepted too, with input_scales)");
  STD_TORCH_CHECK(input.size(1) <= 1 || input.stride(1) == 1,
                  "finalize: input must have unit stride in its last dimension, got stride ",
                  input.stride(1));
  p.num_rows = input.size(0);
  p.hidden = input.size(1);
  p.input = input.data;
  p.input_row_stride = input.stride(0);
  p.input_dtype = input.dtype;
  p.out_dtype = resolve_out_dtype(input.dtype, out ? &*out : nullptr, extras);
  p.residual_dtype = p.out_dtype;
  p.scale = static_cast<float>(scale);
  STD_TORCH_CHECK(!top_k.has_value() || *top_k >= 1, "finalize: top_k must be >= 1, got ",
                  top_k.value_or(0));

  if (row_map.has_value()) {
    const Meta& m = *row_map;
    check_same_device(input, m, "row_map");
    STD_TORCH_CHECK(m.dim == 2, "finalize: row_map must be 2-D [T, K], got ", m.dim, "-D");
    STD_TORCH_CHECK(m.dtype == ScalarType::Int || m.dtype == ScalarType::Long,
                    "finalize: row_map must be int32 or int64, got ", dtype_name(m.dtype));
    p.num_tokens = m.size(0);
    p.top_k = m.size(1);
    STD_TORCH_CHECK(p.top_k >= 1 || p.num_tokens == 0,
                    "finalize: row_map must have at least one column (K >= 1)");
    p.row_map = m.data;
    p.map_stride_t = m.stride(0);
    p.map_stride_k = m.stride(1);
    p.map_is_int64 = m.dtype == ScalarType::Long;
  } else if (weights.has_value()) {
    STD_TORCH_CHECK(weights->dim == 2, "finalize: weights must be 2-D [T, K], got ",
                    weights->dim, "-D");
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
    const Meta& w = *weights;
    check_same_device(input, w, "weights");
    STD_TORCH_CHECK(w.dim == 2, "finalize: weights must be 2-D [T, K], got ", w.dim, "-D");
    STD_TORCH_CHECK(w.size(0) == p.num_tokens && w.size(1) == p.top_k,
                    "finalize: weights must be [T, K] = [", p.num_tokens, ", ", p.top_k,
                    "] to match row_map, got [", w.size(0), ", ", w.size(1), "]");
    STD_TORCH_CHECK(is_float_dtype(w.dtype),
                    "finalize: weights must be float32, bfloat16 or float16, got ",
                    dtype_name(w.dtype));
    p.weights = w.data;
    p.weight_stride_t = w.stride(0);
    p.weight_stride_k = w.stride(1);
    p.weight_dtype = w.dtype;
  }

  if (residual.has_value()) {
    const Meta& r = *residual;
    check_same_device(input, r, "residual");
    check_rows(r, "residual", p.num_tokens, p.hidden);
    if (extras.fp8_out) {
      STD_TORCH_CHECK(is_float_dtype(r.dtype), "finalize: residual must be bfloat16, "
                      "float16 or float32, got ", dtype_name(r.dtype));
    } else if (!fp8_input) {
      STD_TORCH_CHECK(r.dtype == input.dtype, "finalize: residual must have the "
                      "dtype of input (", dtype_name(input.dtype), "), got ",
                      dtype_name(r.dtype));
    } else {
      STD_TORCH_CHECK(r.dtype == p.out_dtype, "finalize: residual must have the output "
                      "dtype (", dtype_name(p.out_dtype), "), got ", dtype_name(r.dtype));
    }
    p.residual = r.data;
    p.residual_row_stride = r.stride(0);
    p.residual_dtype = r.dtype;
  }

  check_input_scales(p, input, input_scales, fp8_input);
  check_bias(p, input, bias, expert_ids);

  if (out.has_value()) {
    check_same_device(input, *out, "out");
    check_rows(*out, "out", p.num_tokens, p.hidden);
    STD_TORCH_CHECK(!overlaps(*out, input), "finalize: out overlaps input");
    const std::pair<const std::optional<Meta>*, const char*> read_only[] = {
        {&row_map, "row_map"}, {&weights, "weights"}, {&input_scales, "input_scales"},
        {&bias, "bias"}, {&expert_ids, "expert_ids"}};
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
    bind_output(p, *out_tensor);
  }
  return p;
}

void check_out_scales(FinalizeProblem& p, const Tensor& input_tensor,
                      const Tensor& out_scales_tensor, const Tensor& out_tensor,
                      double amax_floor) {
  const Meta input(input_tensor), out_scales(out_scales_tensor), out(out_tensor);
  const int64_t blocks = (p.hidden + kScaleBlock - 1) / kScaleBlock;
  check_same_device(input, out_scales, "out_scales");
  STD_TORCH_CHECK(out_scales.dtype == ScalarType::Float,
                  "finalize: out_scales must be float32, got ",
                  dtype_name(out_scales.dtype));
  STD_TORCH_CHECK(out_scales.dim == 2 && out_scales.size(0) == p.num_tokens &&
                      out_scales.size(1) == blocks,
                  "finalize: out_scales must be [T, ceil(H/128)] = [", p.num_tokens, ", ", blocks,
                  "] (any strides; a transposed [ceil(H/128), T] buffer is passed as .t())");
  STD_TORCH_CHECK(amax_floor > 0.0, "finalize: amax_floor must be > 0, got ", amax_floor);
  STD_TORCH_CHECK(!overlaps(out_scales, out), "finalize: out_scales overlaps out");
  STD_TORCH_CHECK(!overlaps(out_scales, input), "finalize: out_scales overlaps input");
  p.out_scales = static_cast<float*>(out_scales.data);
  p.out_scale_stride_t = out_scales.stride(0);
  p.out_scale_stride_block = out_scales.stride(1);
  p.amax_floor = static_cast<float>(amax_floor);
}

void bind_output(FinalizeProblem& problem, const Tensor& out) {
  problem.out = out.data_ptr();
  problem.out_row_stride = out.stride(0);
}

}  // namespace moe_finalize
