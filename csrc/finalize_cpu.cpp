// CPU kernel: tokens x column-chunks spread over torch's intra-op thread pool; each chunk keeps
// an fp32 accumulator in L1 while the K source rows stream through it in fixed k-order.
#include "finalize.h"

#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

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

MF_CLONES void axpy_bf16(float* acc, const uint16_t* row, float w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * bf16_to_float(row[i]);
}
MF_CLONES void axpy_f16(float* acc, const _Float16* row, float w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<float>(row[i]);
}
MF_CLONES void axpy_f32(float* acc, const float* row, float w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * row[i];
}

// out = residual + scale * acc, computed in fp32 and rounded once.
MF_CLONES void store_bf16(uint16_t* out, const float* acc, const uint16_t* res, float scale,
                          int64_t n) {
  if (res != nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(bf16_to_float(res[i]) + scale * acc[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(scale * acc[i]);
  }
}
MF_CLONES void store_f16(_Float16* out, const float* acc, const _Float16* res, float scale,
                         int64_t n) {
  if (res != nullptr) {
    for (int64_t i = 0; i < n; ++i)
      out[i] = static_cast<_Float16>(static_cast<float>(res[i]) + scale * acc[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<_Float16>(scale * acc[i]);
  }
}
MF_CLONES void store_f32(float* out, const float* acc, const float* res, float scale, int64_t n) {
  if (res != nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] = res[i] + scale * acc[i];
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = scale * acc[i];
  }
}

template <typename elem_t>
struct RowOps;
template <>
struct RowOps<uint16_t> {  // bfloat16 bits
  static void axpy(float* a, const uint16_t* r, float w, int64_t n) { axpy_bf16(a, r, w, n); }
  static void store(uint16_t* o, const float* a, const uint16_t* r, float s, int64_t n) {
    store_bf16(o, a, r, s, n);
  }
};
template <>
struct RowOps<_Float16> {
  static void axpy(float* a, const _Float16* r, float w, int64_t n) { axpy_f16(a, r, w, n); }
  static void store(_Float16* o, const float* a, const _Float16* r, float s, int64_t n) {
    store_f16(o, a, r, s, n);
  }
};
template <>
struct RowOps<float> {
  static void axpy(float* a, const float* r, float w, int64_t n) { axpy_f32(a, r, w, n); }
  static void store(float* o, const float* a, const float* r, float s, int64_t n) {
    store_f32(o, a, r, s, n);
  }
};

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
  // One work item streams K * kChunk elements; ask for ~64K elements per task.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, p.top_k * kChunk));
  const auto* input = static_cast<const elem_t*>(p.input);
  const auto* residual = static_cast<const elem_t*>(p.residual);
  auto* out = static_cast<elem_t*>(p.out);
  torch::stable::parallel_for(0, work_items, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kChunk];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / chunks_per_token;
      const int64_t col = (item % chunks_per_token) * kChunk;
      const int64_t n = std::min(kChunk, p.hidden - col);
      std::fill(acc, acc + n, 0.0f);
      for (int64_t k = 0; k < p.top_k; ++k) {  // fixed k-order: batch invariant
        const int64_t row = map_entry(p, t, k);
        if (row < 0) continue;
        RowOps<elem_t>::axpy(acc, input + row * p.input_row_stride + col, weight_entry(p, t, k),
                             n);
      }
      RowOps<elem_t>::store(out + t * p.out_row_stride + col, acc,
                            residual ? residual + t * p.residual_row_stride + col : nullptr,
                            p.scale, n);
    }
  });
}

}  // namespace

void launch_finalize_cpu(const FinalizeProblem& p) {
  check_map_in_range(p);
  switch (p.input_dtype) {
    case ScalarType::BFloat16: finalize_rows<uint16_t>(p); break;
    case ScalarType::Half: finalize_rows<_Float16>(p); break;
    case ScalarType::Float: finalize_rows<float>(p); break;
    default: STD_TORCH_CHECK(false, "finalize: unsupported input dtype on CPU");
  }
}

}  // namespace moe_finalize
