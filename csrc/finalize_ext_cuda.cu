// CUDA finalize for FP8 (e4m3) input with per-row / per-128-column-block scales, per-expert bias,
// and FP8 output with per-block scales (issue 7). Kept apart from finalize_cuda.cu so the tuned
// bf16/fp16/fp32 kernel keeps its exact code path: these kernels only run when input is FP8,
// a bias is given, or the output is FP8. Same design as the forward kernel: one block per
// (token, column slice), slots staged in shared memory, fixed k-order fp32 accumulation.
#include <cuda_fp8.h>
#include <torch/csrc/stable/macros.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"
#include "finalize.h"

namespace moe_finalize {

template <>
struct Elem<__nv_fp8_e4m3> {
  static __device__ __forceinline__ float load(__nv_fp8_e4m3 x) { return static_cast<float>(x); }
};

namespace {

// Four e4m3 codes (one 32-bit word, lowest byte first) as fp32 values times 2^-120: sign and
// the 7 exponent/mantissa bits moved into place, three integer ops per element instead of the
// conversion pipe (which would cap a 16-element-per-load FP8 stream below HBM bandwidth).
// Exact for every code but NaN (0x7f/0xff); e4m3 subnormals become fp32 subnormals.
__host__ __device__ __forceinline__ uint32_t e4m3_bits_unscaled(uint32_t word, int i) {
  const uint32_t byte = (word >> (8 * i)) & 0xffu;
  return ((byte & 0x80u) << 24) | ((byte & 0x7fu) << 20);
}

// Nonzero when a byte of `word` is an e4m3 NaN code (low 7 bits all ones).
__host__ __device__ __forceinline__ uint32_t e4m3_nan_bytes(uint32_t word) {
  return ((word & 0x7f7f7f7fu) + 0x01010101u) & 0x80808080u;
}

// out[e] = float(pack[e]) * scale, rounded once. For e4m3 vectors the 2^120 of the bit trick
// folds into the scale: x * 2^-120 * (scale * 2^120) rounds exactly as x * scale (a power of
// two moves no rounding point), so both branches and the scalar tail give the same bits.
template <typename T, int W>
__device__ __forceinline__ void dequantize(const Pack<T, W>& pack, float scale, float* out) {
  if constexpr (std::is_same_v<T, __nv_fp8_e4m3> && W % 4 == 0) {
    uint32_t words[W / 4];
    memcpy(words, &pack, sizeof words);
    uint32_t nan_bytes = 0;
#pragma unroll
    for (int i = 0; i < W / 4; ++i) nan_bytes |= e4m3_nan_bytes(words[i]);
    const float folded = scale * 0x1p120f;
    if (nan_bytes == 0 && fabsf(folded) <= 3.402823466e38f) {  // finite: scale < 2^8
#pragma unroll
      for (int e = 0; e < W; ++e)
        out[e] = __uint_as_float(e4m3_bits_unscaled(words[e / 4], e % 4)) * folded;
      return;
    }
  }
#pragma unroll
  for (int e = 0; e < W; ++e) out[e] = Elem<T>::load(pack.v[e]) * scale;
}

constexpr int kSlotChunk = 64;    // slots staged in shared memory per pass
constexpr int kMaxThreads = 128;  // threads per block at most
constexpr float kE4m3Max = 448.0f;

struct ExtArgs {
  FinalizeProblem p;
  int64_t body_units;  // H / VEC full vectors per row
  int64_t units;       // body_units + H % VEC scalar tail columns
};

__device__ __forceinline__ float load_float(const void* base, ScalarType dtype, int64_t offset) {
  switch (dtype) {
    case ScalarType::Float: return __ldg(static_cast<const float*>(base) + offset);
    case ScalarType::BFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[offset]);
    default: return __half2float(static_cast<const __half*>(base)[offset]);
  }
}

// Slot (t, k) staged for the whole block: source row offset (-1 = skip), its scale row offset,
// and its bias row offset (-1 = no bias: no bias given, or an expert id outside [0, E), which is
// never read; the CPU kernel raises on those instead).
struct Slots {
  int64_t off[kSlotChunk];
  int64_t scale_off[kSlotChunk];
  int64_t bias_off[kSlotChunk];
  float w[kSlotChunk];
};

__device__ __forceinline__ void stage_slots(Slots& s, const FinalizeProblem& p, int64_t t,
                                            int64_t k0, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t k = k0 + i;
    const int64_t row = load_row(p, t, k);
    const bool valid = row >= 0 && row < p.num_rows;  // never read outside input
    s.off[i] = valid ? row * p.input_row_stride : -1;
    s.w[i] = valid ? load_weight(p, t, k) : 0.0f;
    s.scale_off[i] = valid && p.scales != nullptr ? row * p.scale_stride_row : 0;
    int64_t bias_off = -1;
    if (valid && p.bias != nullptr) {
      const int64_t offset = t * p.expert_stride_t + k * p.expert_stride_k;
      const int64_t e =
          p.expert_ids_is_int64
              ? static_cast<const int64_t*>(p.expert_ids)[offset]
              : static_cast<int64_t>(static_cast<const int32_t*>(p.expert_ids)[offset]);
      if (e >= 0 && e < p.num_experts) bias_off = e * p.bias_row_stride;
    }
    s.bias_off[i] = bias_off;
  }
}

// acc[0..W) += w * (dequant(row[col..col+W)) + bias[col..col+W)) for the n staged slots, in
// k-order, 8 rows in flight (as the bf16 kernel). Every element takes the same arithmetic
// whatever W is.
template <typename T, int W>
__device__ __forceinline__ void accumulate(float* acc, const FinalizeProblem& p, const Slots& s,
                                           int64_t col, int64_t scale_block_off, int n) {
  // 16 e4m3 values per lane: 4 rows in flight keep registers low enough for full occupancy.
  constexpr int G = sizeof(T) == 1 ? 4 : 8;
  const T* col_ptr = static_cast<const T*>(p.input) + col;
  for (int j = 0; j < n; j += G) {
    Pack<T, W> rows[G];
    float sc[G];
#pragma unroll
    for (int u = 0; u < G; ++u) {
      sc[u] = 1.0f;
      if (j + u < n && s.off[j + u] >= 0) {
        rows[u] = load_stream<T, W>(col_ptr + s.off[j + u]);
        if (p.scales != nullptr) sc[u] = __ldg(p.scales + s.scale_off[j + u] + scale_block_off);
      }
    }
#pragma unroll
    for (int u = 0; u < G; ++u) {
      if (j + u >= n || s.off[j + u] < 0) continue;
      const float w = s.w[j + u];
      const int64_t bias_off = s.bias_off[j + u];
      float x[W];
      dequantize<T, W>(rows[u], sc[u], x);
#pragma unroll
      for (int e = 0; e < W; ++e) {
        float v = x[e];
        if (bias_off >= 0) v += load_float(p.bias, p.bias_dtype, bias_off + col + e);
        acc[e] = fmaf(w, v, acc[e]);
      }
    }
  }
}

// out[t, col..col+W) = round(residual + scale * acc), in accesses of at most 16 bytes.
template <typename TOut, int W>
__device__ __forceinline__ void store(const FinalizeProblem& p, int64_t t, int64_t col,
                                      const float* acc) {
  constexpr int C = W * sizeof(TOut) >= 16 ? 16 / static_cast<int>(sizeof(TOut)) : W;
#pragma unroll
  for (int c = 0; c < W / C; ++c) {
    Pack<TOut, C> result;
    if (p.residual != nullptr) {
      // Plain (coherent) load: residual may be `out` itself.
      const Pack<TOut, C> res = *reinterpret_cast<const Pack<TOut, C>*>(
          static_cast<const TOut*>(p.residual) + t * p.residual_row_stride + col + c * C);
#pragma unroll
      for (int e = 0; e < C; ++e)
        result.v[e] = Elem<TOut>::store(fmaf(p.scale, acc[c * C + e], Elem<TOut>::load(res.v[e])));
    } else {
#pragma unroll
      for (int e = 0; e < C; ++e) result.v[e] = Elem<TOut>::store(p.scale * acc[c * C + e]);
    }
    *reinterpret_cast<Pack<TOut, C>*>(static_cast<TOut*>(p.out) + t * p.out_row_stride + col +
                                      c * C) = result;
  }
}

template <typename TIn, typename TOut, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    finalize_ext_kernel(const __grid_constant__ ExtArgs args) {
  __shared__ Slots slots;
  const FinalizeProblem& p = args.p;
  const int64_t t = blockIdx.x;
  const int64_t unit = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const bool is_vector = unit < args.body_units;
  const int64_t col = is_vector ? unit * VEC : args.body_units * VEC + (unit - args.body_units);
  // VEC divides 128, so a vector never straddles two scale blocks.
  const int64_t scale_block_off = (col / kScaleBlock) * p.scale_stride_block;

  wait_for_upstream();  // input, scales, map, weights, bias and residual may be fresh
  let_downstream_launch();

  float acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;

  for (int64_t k0 = 0; k0 < p.top_k; k0 += kSlotChunk) {
    const int n = p.top_k - k0 < kSlotChunk ? static_cast<int>(p.top_k - k0) : kSlotChunk;
    if (k0 > 0) __syncthreads();  // previous chunk fully consumed
    stage_slots(slots, p, t, k0, n);
    __syncthreads();
    if (is_vector) {
      accumulate<TIn, VEC>(acc, p, slots, col, scale_block_off, n);
    } else if (unit < args.units) {
      accumulate<TIn, 1>(acc, p, slots, col, scale_block_off, n);
    }
  }

  if (is_vector) {
    store<TOut, VEC>(p, t, col, acc);
  } else if (unit < args.units) {
    store<TOut, 1>(p, t, col, acc);
  }
}

// FP8 output: one warp per (token, 128-column block), 4 columns per lane; the warp reduces the
// block's amax, writes the scale, then the e4m3 codes.
constexpr int kWarpsPerBlock = 4;

template <typename TIn>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    finalize_fp8_out_kernel(const __grid_constant__ FinalizeProblem p, int64_t num_blocks) {
  __shared__ Slots slots;
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x % 32;
  const int64_t block = static_cast<int64_t>(blockIdx.y) * kWarpsPerBlock + threadIdx.x / 32;
  const bool active = block < num_blocks;  // every thread still takes part in __syncthreads
  const int64_t col0 = block * kScaleBlock + lane * 4;
  const int64_t scale_block_off = block * p.scale_stride_block;
  const TIn* input = static_cast<const TIn*>(p.input);

  wait_for_upstream();
  let_downstream_launch();

  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t k0 = 0; k0 < p.top_k; k0 += kSlotChunk) {
    const int n = p.top_k - k0 < kSlotChunk ? static_cast<int>(p.top_k - k0) : kSlotChunk;
    if (k0 > 0) __syncthreads();
    stage_slots(slots, p, t, k0, n);
    __syncthreads();
    if (!active) continue;
    for (int j = 0; j < n; ++j) {  // fixed k-order
      const int64_t off = slots.off[j];
      if (off < 0) continue;
      const float sc = p.scales != nullptr ? __ldg(p.scales + slots.scale_off[j] + scale_block_off)
                                           : 1.0f;
      const float w = slots.w[j];
      const int64_t bias_off = slots.bias_off[j];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t c = col0 + e;
        if (c >= p.hidden) break;
        float v = Elem<TIn>::load(input[off + c]) * sc;
        if (bias_off >= 0) v += load_float(p.bias, p.bias_dtype, bias_off + c);
        acc[e] = fmaf(w, v, acc[e]);
      }
    }
  }
  if (!active) return;

  float amax = 0.0f;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t c = col0 + e;
    if (c >= p.hidden) break;
    acc[e] = p.residual != nullptr
                 ? fmaf(p.scale, acc[e],
                        load_float(p.residual, p.residual_dtype, t * p.residual_row_stride + c))
                 : p.scale * acc[e];
    amax = fmaxf(amax, fabsf(acc[e]));
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  const float s = fmaxf(amax, p.amax_floor) / kE4m3Max;
  auto* out = static_cast<__nv_fp8_e4m3*>(p.out) + t * p.out_row_stride;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t c = col0 + e;
    if (c >= p.hidden) break;
    out[c] = __nv_fp8_e4m3(acc[e] / s);  // round to nearest even, saturating to +-448
  }
  if (lane == 0) p.out_scales[t * p.out_scale_stride_t + block * p.out_scale_stride_block] = s;
}

// ---- host side -----------------------------------------------------------------------------

template <typename TIn, typename TOut, int VEC>
void launch_ext_typed(const FinalizeProblem& p, int device) {
  const DeviceInfo& info = device_info(device);
  ExtArgs args{p, p.hidden / VEC, p.hidden / VEC + p.hidden % VEC};
  const int threads = pick_threads(p.num_tokens, args.units, info.sm_count);
  const int64_t col_blocks = (args.units + threads - 1) / threads;
  STD_TORCH_CHECK(col_blocks <= 65535, "finalize: hidden size ", p.hidden, " is too large");
  launch_kernel(finalize_ext_kernel<TIn, TOut, VEC>,
                dim3(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(col_blocks)),
                dim3(threads), device, args);
}

template <typename TIn, typename TOut>
void launch_ext_for_dtypes(const FinalizeProblem& p, int device) {
  constexpr int kVec = 16 / sizeof(TIn);  // 16 e4m3 elements per 16-byte load
  constexpr int kOutVec = std::min<int>(kVec, 16 / sizeof(TOut));
  const bool vectorizable = aligned(p.input, p.input_row_stride, kVec, sizeof(TIn)) &&
                            aligned(p.out, p.out_row_stride, kOutVec, sizeof(TOut)) &&
                            (p.residual == nullptr ||
                             aligned(p.residual, p.residual_row_stride, kOutVec, sizeof(TOut)));
  if (vectorizable) {
    launch_ext_typed<TIn, TOut, kVec>(p, device);
  } else {
    launch_ext_typed<TIn, TOut, 1>(p, device);
  }
}

template <typename TIn>
void launch_fp8_out_typed(const FinalizeProblem& p, int device) {
  const int64_t num_blocks = (p.hidden + kScaleBlock - 1) / kScaleBlock;
  const int64_t grid_y = (num_blocks + kWarpsPerBlock - 1) / kWarpsPerBlock;
  STD_TORCH_CHECK(grid_y <= 65535, "finalize: hidden size ", p.hidden, " is too large");
  launch_kernel(finalize_fp8_out_kernel<TIn>,
                dim3(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(grid_y)),
                dim3(32 * kWarpsPerBlock), device, p, num_blocks);
}

void check_launch(const FinalizeProblem& p, int device_index) {
  STD_TORCH_CHECK(p.num_tokens <= 0x7fffffffLL, "finalize: too many tokens for one launch");
  STD_TORCH_CHECK(device_index >= 0 && device_index < kMaxDevices, "finalize: bad device index");
}

}  // namespace

void launch_finalize_ext_cuda(const FinalizeProblem& p, int device_index) {
  check_launch(p, device_index);
  DeviceScope scope(device_index);
  if (p.input_dtype == ScalarType::Float8_e4m3fn) {
    switch (p.out_dtype) {
      case ScalarType::BFloat16:
        launch_ext_for_dtypes<__nv_fp8_e4m3, __nv_bfloat16>(p, device_index);
        break;
      case ScalarType::Half: launch_ext_for_dtypes<__nv_fp8_e4m3, __half>(p, device_index); break;
      case ScalarType::Float: launch_ext_for_dtypes<__nv_fp8_e4m3, float>(p, device_index); break;
      default: STD_TORCH_CHECK(false, "finalize: unsupported output dtype for FP8 input");
    }
    return;
  }
  switch (p.input_dtype) {  // bias on float input: output dtype is input's
    case ScalarType::BFloat16:
      launch_ext_for_dtypes<__nv_bfloat16, __nv_bfloat16>(p, device_index);
      break;
    case ScalarType::Half: launch_ext_for_dtypes<__half, __half>(p, device_index); break;
    case ScalarType::Float: launch_ext_for_dtypes<float, float>(p, device_index); break;
    default: STD_TORCH_CHECK(false, "finalize: unsupported input dtype on CUDA");
  }
}

void launch_finalize_fp8_out_cuda(const FinalizeProblem& p, int device_index) {
  check_launch(p, device_index);
  DeviceScope scope(device_index);
  switch (p.input_dtype) {
    case ScalarType::Float8_e4m3fn: launch_fp8_out_typed<__nv_fp8_e4m3>(p, device_index); break;
    case ScalarType::BFloat16: launch_fp8_out_typed<__nv_bfloat16>(p, device_index); break;
    case ScalarType::Half: launch_fp8_out_typed<__half>(p, device_index); break;
    case ScalarType::Float: launch_fp8_out_typed<float>(p, device_index); break;
    default: STD_TORCH_CHECK(false, "finalize: unsupported input dtype on CUDA");
  }
}

}  // namespace moe_finalize
