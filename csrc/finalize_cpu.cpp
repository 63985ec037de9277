// CPU kernel: tokens x column-chunks spread over torch's intra-op thread pool; each chunk keeps
// an fp32 accumulator in L1 while the K source rows stream through it in fixed k-order.
#include "finalize.h"

#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace moe_finalize {
namespace {

// Accumulator chunk: 2048 floats (8 KiB) stay in L1 next to the streaming source rows.
constexpr int64_t kChunk = 2048;

// x86 builds get an AVX2 clone (F16C for half conversion, 8 lanes) picked at load time; the
// baseline clone keeps the binary portable. -ffp-contract=off keeps every clone's rounding
// identical, so results do not depend on the machine's ISA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MF_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MF_CLONES
#endif

inline float bf16_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, quiet NaN kept NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Eight fp32 lanes as a GCC vector: 256-bit ops in the AVX2 clone, two 128-bit ops in the
// baseline one. Loads widen bf16 / fp16 / fp32 to fp32 exactly.
typedef float v8f __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));
typedef _Float16 v8h __attribute__((vector_size(16)));

inline v8f load8(const uint16_t* ptr) {
  v8u16 bits;
  std::memcpy(&bits, ptr, sizeof bits);
  const v8u32 wide = __builtin_convertvector(bits, v8u32) << 16;
  v8f out;
  std::memcpy(&out, &wide, sizeof out);
  return out;
}
inline v8f load8(const _Float16* ptr) {
  v8h halves;
  std::memcpy(&halves, ptr, sizeof halves);
  return __builtin_convertvector(halves, v8f);
}
inline v8f load8(const float* ptr) {
  v8f out;
  std::memcpy(&out, ptr, sizeof out);
  return out;
}
inline float to_float(uint16_t x) { return bf16_to_float(x); }
inline float to_float(_Float16 x) { return static_cast<float>(x); }
inline float to_float(float x) { return x; }

// acc[i] = sum over the `count` given slots, in order, of w[k] * rows[k][i] (fp32, one multiply
// and one add per term, from 0). Columns go in blocks of 32 whose partial sums stay in four
// vector registers while all K source rows stream past (K hardware-prefetched streams at once);
// the tail columns take the same arithmetic, so every element is computed identically.
template <typename elem_t>
inline void gather_rows(float* acc, const elem_t* const* rows, const float* w, int64_t count,
                        int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    v8f a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t k = 0; k < count; ++k) {
      const elem_t* r = rows[k] + i;
      const v8f wk = v8f{} + w[k];
      a0 += wk * load8(r);
      a1 += wk * load8(r + 8);
      a2 += wk * load8(r + 16);
      a3 += wk * load8(r + 24);
    }
    std::memcpy(acc + i, &a0, sizeof a0);
    std::memcpy(acc + i + 8, &a1, sizeof a1);
    std::memcpy(acc + i + 16, &a2, sizeof a2);
    std::memcpy(acc + i + 24, &a3, sizeof a3);
  }
  for (; i < n; ++i) {
    float a = 0.0f;
    for (int64_t k = 0; k < count; ++k) a += w[k] * to_float(rows[k][i]);
    acc[i] = a;
  }
}

MF_CLONES void gather(float* acc, const uint16_t* const* rows, const float* w, int64_t count,
                           int64_t n) {
  gather_rows(acc, rows, w, count, n);
}
MF_CLONES void gather(float* acc, const _Float16* const* rows, const float* w, int64_t count,
                          int64_t n) {
  gather_rows(acc, rows, w, count, n);
}
MF_CLONES void gather(float* acc, const float* const* rows, const float* w, int64_t count,
                          int64_t n) {
  gather_rows(acc, rows, w, count, n);
}

// out = residual + scale * acc, computed in fp32 and rounded once.
MF_CLONES void store_row(uint16_t* out, const float* acc, const uint16_t* res, float scale,
                          int64_t n) {
  if (res != nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(bf16_to_float(res[i]) + scale * acc[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(scale * acc[i]);
  }
}
MF_CLONES void store_row(_Float16* out, const float* acc, const _Float16* res, float scale,
                         int64_t n) {
  if (res != nullptr) {
    for (int64_t i = 0; i < n; ++i)
      out[i] = static_cast<_Float16>(static_cast<float>(res[i]) + scale * acc[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<_Float16>(scale * acc[i]);
  }
}
MF_CLONES void store_row(float* out, const float* acc, const float* res, float scale, int64_t n) {
  if (res != nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] = res[i] + scale * acc[i];
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = scale * acc[i];
  }
}


int64_t map_entry(const FinalizeProblem& p, int64_t t, int64_t k) {
  if (p.row_map == nullptr) return t * p.top_k + k;
  int64_t offset = t * p.map_stride_t + k * p.map_stride_k;
  return p.map_is_int64 ? static_cast<const int64_t*>(p.row_map)[offset]
                        : static_cast<const int32_t*>(p.row_map)[offset];
}

float weight_entry(const FinalizeProblem& p, int64_t t, int64_t k) {
  if (p.weights == nullptr) return 1.0f;
  int64_t offset = t * p.weight_stride_t + k * p.weight_stride_k;
  switch (p.weight_dtype) {
    case ScalarType::Float: return static_cast<const float*>(p.weights)[offset];
    case ScalarType::BFloat16: return bf16_to_float(static_cast<const uint16_t*>(p.weights)[offset]);
    default: return static_cast<float>(static_cast<const _Float16*>(p.weights)[offset]);
  }
}

// Runs before anything is written, so a bad map leaves `out` untouched.
void check_map_in_range(const FinalizeProblem& p) {
  if (p.row_map == nullptr) return;
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    for (int64_t k = 0; k < p.top_k; ++k) {
      int64_t row = map_entry(p, t, k);
      STD_TORCH_CHECK(row < p.num_rows, "finalize: row_map[", t, ", ", k, "] = ", row,
                      " is out of range for input with ", p.num_rows,
                      " rows (valid: 0..P-1, or negative to skip)");
    }
  }
}

template <typename elem_t>
void finalize_rows(const FinalizeProblem& p) {
  const int64_t chunks_per_token = (p.hidden + kChunk - 1) / kChunk;
  const int64_t work_items = p.num_tokens * chunks_per_token;
  // Every (token, chunk) is its own task: a few hundred items at T=256 still split evenly.
  const int64_t grain = 1;
  const auto* input = static_cast<const elem_t*>(p.input);
  const auto* residual = static_cast<const elem_t*>(p.residual);
  auto* out = static_cast<elem_t*>(p.out);
  torch::stable::parallel_for(0, work_items, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kChunk];
    std::vector<const elem_t*> rows(p.top_k);  // the token's valid slots, in k-order
    std::vector<float> weights(p.top_k);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / chunks_per_token;
      const int64_t col = (item % chunks_per_token) * kChunk;
      const int64_t n = std::min(kChunk, p.hidden - col);
      int64_t count = 0;
      for (int64_t k = 0; k < p.top_k; ++k) {  // fixed k-order: batch invariant
        const int64_t row = map_entry(p, t, k);
        if (row < 0) continue;
        rows[count] = input + row * p.input_row_stride + col;
        weights[count++] = weight_entry(p, t, k);
      }
      gather(acc, rows.data(), weights.data(), count, n);
      store_row(out + t * p.out_row_stride + col, acc,
                residual ? residual + t * p.residual_row_stride + col : nullptr,
                            p.scale, n);
    }
  });
}

// ---- FP8 input, per-expert bias, FP8 output (issue 7) -----------------------------------------
// A separate path so the plain rows above keep their tight loops: each source chunk is first
// widened to fp32 (dequantised, bias added), then accumulated in the same fixed k-order.

// e4m3fn -> fp32 for all 256 codes: exponent bias 7, no infinities, 0x7f/0xff are NaN.
struct E4m3Table {
  float value[256];
  E4m3Table() {
    for (int code = 0; code < 256; ++code) {
      const int exponent = (code >> 3) & 0xf, mantissa = code & 0x7;
      float v = exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -9)
                              : std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
      if ((code & 0x7f) == 0x7f) v = std::numeric_limits<float>::quiet_NaN();
      value[code] = (code & 0x80) ? -v : v;
    }
  }
};
const E4m3Table kE4m3;

// fp32 -> e4m3fn, round to nearest even, saturating to +-448 (as __NV_SATFINITE); NaN stays NaN.
uint8_t float_to_e4m3(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7f;
  if (a >= 464.0f) return sign | 0x7e;  // 464 is the tie between 448 and the (absent) 480
  if (a < 0.015625f) {  // below 2^-6: subnormal steps of 2^-9 (8 rounds up to the first normal)
    return sign | static_cast<uint8_t>(std::nearbyint(a * 512.0f));
  }
  uint32_t bits;
  std::memcpy(&bits, &a, sizeof bits);
  bits += 0x7ffffu + ((bits >> 20) & 1u);  // round the 23-bit mantissa to 3 bits
  return sign | static_cast<uint8_t>((bits >> 20) - ((127 - 7) << 3));
}

float load_float(const void* base, ScalarType dtype, int64_t offset) {
  switch (dtype) {
    case ScalarType::Float: return static_cast<const float*>(base)[offset];
    case ScalarType::BFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[offset]);
    case ScalarType::Half: return static_cast<float>(static_cast<const _Float16*>(base)[offset]);
    default: return kE4m3.value[static_cast<const uint8_t*>(base)[offset]];
  }
}

int64_t expert_entry(const FinalizeProblem& p, int64_t t, int64_t k) {
  const int64_t offset = t * p.expert_stride_t + k * p.expert_stride_k;
  return p.expert_ids_is_int64 ? static_cast<const int64_t*>(p.expert_ids)[offset]
                               : static_cast<const int32_t*>(p.expert_ids)[offset];
}

// Runs before anything is written. Skipped slots may hold any id (e.g. -1).
void check_experts_in_range(const FinalizeProblem& p) {
  if (p.bias == nullptr) return;
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    for (int64_t k = 0; k < p.top_k; ++k) {
      if (map_entry(p, t, k) < 0) continue;
      const int64_t e = expert_entry(p, t, k);
      STD_TORCH_CHECK(e >= 0 && e < p.num_experts, "finalize: expert_ids[", t, ", ", k, "] = ", e,
                      " is out of range for bias with ", p.num_experts,
                      " experts (valid: 0..E-1 for every slot whose row_map entry is >= 0)");
    }
  }
}

// acc[0..n) = residual[t, col..] + scale * sum_k w[t, k] * (dequant(input[row, col..]) +
//             bias[expert, col..]), computed in fp32; `row` is scratch. As the CUDA kernel
// (finalize_ext_cuda.cu): without bias the scale s folds into the weight, acc += (w * s) * q;
// with bias acc += w * (q * s + b).
void finalize_chunk_fp32(const FinalizeProblem& p, int64_t t, int64_t col, int64_t n, float* acc,
                         float* row) {
  std::fill(acc, acc + n, 0.0f);
  for (int64_t k = 0; k < p.top_k; ++k) {  // fixed k-order: batch invariant
    const int64_t r = map_entry(p, t, k);
    if (r < 0) continue;
    const int64_t base = r * p.input_row_stride + col;
    for (int64_t i = 0; i < n; ++i) row[i] = load_float(p.input, p.input_dtype, base + i);
    const float w = weight_entry(p, t, k);
    const float* s = p.scales != nullptr ? p.scales + r * p.scale_stride_row : nullptr;
    const auto scale_of = [&](int64_t i) {
      return s[((col + i) / kScaleBlock) * p.scale_stride_block];
    };
    if (p.bias == nullptr) {
      for (int64_t i = 0; i < n; ++i) acc[i] += (s != nullptr ? w * scale_of(i) : w) * row[i];
      continue;
    }
    if (s != nullptr) {
      for (int64_t i = 0; i < n; ++i) row[i] *= scale_of(i);
    }
    const int64_t b = expert_entry(p, t, k) * p.bias_row_stride + col;
    for (int64_t i = 0; i < n; ++i) row[i] += load_float(p.bias, p.bias_dtype, b + i);
    for (int64_t i = 0; i < n; ++i) acc[i] += w * row[i];
  }
  for (int64_t i = 0; i < n; ++i) acc[i] *= p.scale;
  if (p.residual != nullptr) {
    const int64_t base = t * p.residual_row_stride + col;
    for (int64_t i = 0; i < n; ++i) {
      acc[i] = load_float(p.residual, p.residual_dtype, base + i) + acc[i];
    }
  }
}

void store_float(void* out, ScalarType dtype, int64_t offset, const float* v, int64_t n) {
  switch (dtype) {
    case ScalarType::Float: std::copy(v, v + n, static_cast<float*>(out) + offset); break;
    case ScalarType::BFloat16: {
      auto* o = static_cast<uint16_t*>(out) + offset;
      for (int64_t i = 0; i < n; ++i) o[i] = float_to_bf16(v[i]);
      break;
    }
    default: {
      auto* o = static_cast<_Float16*>(out) + offset;
      for (int64_t i = 0; i < n; ++i) o[i] = static_cast<_Float16>(v[i]);
    }
  }
}

// Each 128-column block of `v` (starting at column `col`) becomes e4m3 codes and one scale.
void quantize_chunk(const FinalizeProblem& p, int64_t t, int64_t col, int64_t n, const float* v) {
  auto* out = static_cast<uint8_t*>(p.out) + t * p.out_row_stride + col;
  for (int64_t b0 = 0; b0 < n; b0 += kScaleBlock) {
    const int64_t len = std::min(kScaleBlock, n - b0);
    float amax = 0.0f;
    for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::fabs(v[b0 + i]));
    const float s = std::max(amax, p.amax_floor) / 448.0f;
    for (int64_t i = 0; i < len; ++i) out[b0 + i] = float_to_e4m3(v[b0 + i] / s);
    const int64_t block = (col + b0) / kScaleBlock;
    p.out_scales[t * p.out_scale_stride_t + block * p.out_scale_stride_block] = s;
  }
}

void finalize_rows_fp32(const FinalizeProblem& p, bool fp8_out) {
  const int64_t chunks_per_token = (p.hidden + kChunk - 1) / kChunk;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, p.top_k * kChunk));
  torch::stable::parallel_for(0, p.num_tokens * chunks_per_token, grain,
                              [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kChunk];
    alignas(64) float row[kChunk];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / chunks_per_token;
      const int64_t col = (item % chunks_per_token) * kChunk;  // kChunk is a multiple of 128
      const int64_t n = std::min(kChunk, p.hidden - col);
      finalize_chunk_fp32(p, t, col, n, acc, row);
      if (fp8_out) {
        quantize_chunk(p, t, col, n, acc);
      } else {
        store_float(p.out, p.out_dtype, t * p.out_row_stride + col, acc, n);
      }
    }
  });
}

}  // namespace

void launch_finalize_cpu(const FinalizeProblem& p) {
  check_map_in_range(p);
  check_experts_in_range(p);
  if (p.input_dtype == ScalarType::Float8_e4m3fn || p.bias != nullptr) {
    finalize_rows_fp32(p, /*fp8_out=*/false);
    return;
  }
  switch (p.input_dtype) {
    case ScalarType::BFloat16: finalize_rows<uint16_t>(p); break;
    case ScalarType::Half: finalize_rows<_Float16>(p); break;
    case ScalarType::Float: finalize_rows<float>(p); break;
    default: STD_TORCH_CHECK(false, "finalize: unsupported input dtype on CPU");
  }
}

void launch_finalize_fp8_out_cpu(const FinalizeProblem& p) {
  check_map_in_range(p);
  check_experts_in_range(p);
  finalize_rows_fp32(p, /*fp8_out=*/true);
}

}  // namespace moe_finalize
