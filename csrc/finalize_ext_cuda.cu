// CUDA finalize for FP8 (e4m3) input with per-row / per-128-column-block scales, per-expert bias,
// and FP8 output with per-block scales (issue 7). Kept apart from finalize_cuda.cu so the tuned
// bf16/fp16/fp32 kernel keeps its exact code path: these kernels only run when input is FP8,
// a bias is given, or the output is FP8. Same design as the forward kernel: one block per
// (token, column slice), 16-byte loads, 8 source rows in flight per thread, fixed k-order fp32
// accumulation, slots read once per warp and handed out with shuffles.
//
// Arithmetic per valid slot (w: router weight, s: the row's / block's scale, q: the widened
// element, exact in fp32):   no bias:  acc = fma(w * s, q, acc)
//                              bias:    acc = fma(w, fma(q, s, b), acc)
// Folding the scale into the weight keeps the FP8 stream at one FMA per element after the
// hardware e4m3x2 -> f16x2 conversion; every kernel here and the CPU kernel use these formulas.
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

constexpr int kMaxThreads = 128;  // threads per block at most
constexpr int kMaxRowsInFlight = 8;  // source rows loaded before any is consumed (G <= this)
constexpr float kE4m3Max = 448.0f;

// FP8 input below this many tokens is read in 8-byte vectors (kFp8NarrowVec e4m3 per thread:
// twice the threads, half the registers and code per thread). Measured on H100 (benchmarks/
// HISTORY.md "Session 11"): T=16 8% faster (FP8 output 20%), T=64-192 0-5% (DeepSeek-V3
// T=128 7%, FP8 output 9%; FP8 output K=8 H=4096 T=128 3% slower); T=512 4% slower (FP8
// output 11%), T >= 4096 7-20% slower.
constexpr int64_t kFp8NarrowMaxTokens = 256;
constexpr int kFp8NarrowVec = 8;

// Whether a TIn kernel of VEC-element vectors is one of those decode kernels.
template <typename TIn, int VEC>
constexpr bool kFp8Narrow = std::is_same_v<TIn, __nv_fp8_e4m3> && VEC == kFp8NarrowVec;

// One top-k slot as the accumulation reads it (default: skipped). Each thread computes the row's
// element and scale offsets from `row`: shuffling both 64-bit offsets took 4 more registers per
// slot, and their spills cost the K=2 FP8-output kernel 2.5% (H100).
template <bool kBias, typename Row = int64_t>
struct Slot {
  Row row = -1;           // source row in input; -1: skip the slot (int32 for int32 maps)
  int64_t bias_off = -1;  // offset of the expert's bias row; -1: no bias (none given, or an
                          // expert id outside [0, E), never read; the CPU kernel raises instead)
  float w = 0.0f;
  __device__ __forceinline__ Slot from_lane(int src) const {
    Slot s;
    s.row = __shfl_sync(0xffffffffu, row, src);
    if constexpr (kBias) s.bias_off = __shfl_sync(0xffffffffu, bias_off, src);
    s.w = __shfl_sync(0xffffffffu, w, src);
    return s;
  }
};

// The slot type of a kernel: int32 rows for the common format's int32 map.
template <bool kBias, bool kCommonSlots>
using SlotOf = Slot<kBias, std::conditional_t<kCommonSlots, int32_t, int64_t>>;

// Slot (t, k). The weight and the expert id are read whatever the map holds ((t, k) is always in
// bounds), so their loads overlap the map load instead of waiting for it.
template <bool kBias, bool kCommonSlots = false>
__device__ __forceinline__ SlotOf<kBias, kCommonSlots> read_slot(const FinalizeProblem& p,
                                                                 int64_t t, int64_t k) {
  const int64_t row = load_row<kCommonSlots>(p, t, k);
  const float w = load_weight<kCommonSlots>(p, t, k);
  int64_t expert = -1;
  if constexpr (kBias) {
    const int64_t offset = t * p.expert_stride_t + k * p.expert_stride_k;
    expert = p.expert_ids_is_int64
                 ? static_cast<const int64_t*>(p.expert_ids)[offset]
                 : static_cast<int64_t>(static_cast<const int32_t*>(p.expert_ids)[offset]);
  }
  const bool valid = row_in_range<kCommonSlots>(row, p.num_rows);  // never read outside input
  SlotOf<kBias, kCommonSlots> s;
  s.row = valid ? row : -1;
  s.bias_off = valid && expert >= 0 && expert < p.num_experts ? expert * p.bias_row_stride : -1;
  s.w = w;
  return s;
}

// W elements as exact fp32 values. e4m3 pairs go through the hardware e4m3x2 -> f16x2
// conversion (sm_89+; emulated, still exact, on older cards) and f16 -> f32, which is exact.
// The pairs are taken as the halves of 32-bit words: assembling each from its two bytes took
// 5 instructions per pair (H100 SASS), a fifth of the K=2 kernels' instructions.
template <typename T, int W>
__device__ __forceinline__ void widen(const Pack<T, W>& pack, float* out) {
  if constexpr (std::is_same_v<T, __nv_fp8_e4m3> && W % 4 == 0) {
    uint32_t words[W / 4];
    memcpy(words, &pack, sizeof words);
#pragma unroll
    for (int i = 0; i < W / 4; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const auto pair = static_cast<__nv_fp8x2_storage_t>(words[i] >> (16 * half));
        const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
        __half2 h;
        memcpy(&h, &raw, sizeof h);
        const float2 f = __half22float2(h);
        out[4 * i + 2 * half] = f.x;
        out[4 * i + 2 * half + 1] = f.y;
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) out[e] = Elem<T>::load(pack.v[e]);
  }
}

// The scale at `ptr`, or 1.0 (no access) where !valid: one predicated load, no branch, so the
// scale loads of a batch stay in flight with its row loads. Same L1 flavour as the rows (see
// load_stream).
template <bool kL1Allocate>
__device__ __forceinline__ float load_scale(const float* ptr, bool valid) {
  float v;
  if constexpr (kL1Allocate) {
    asm volatile(
        "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %2, 0;\n\tmov.b32 %0, 0f3F800000;\n\t"
        "@p ld.global.nc.f32 %0, [%1];\n\t}"
        : "=f"(v)
        : "l"(ptr), "r"(static_cast<int>(valid)));
  } else {
    asm volatile(
        "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %2, 0;\n\tmov.b32 %0, 0f3F800000;\n\t"
        "@p ld.global.nc.L1::no_allocate.f32 %0, [%1];\n\t}"
        : "=f"(v)
        : "l"(ptr), "r"(static_cast<int>(valid)));
  }
  return v;
}

// W consecutive elements of a float-typed row as fp32, in accesses of at most 16 bytes (the
// host only picks W > 1 when the base and row stride allow it).
template <typename T, int W>
__device__ __forceinline__ void load_floats(const T* ptr, float* out) {
  constexpr int C = W * sizeof(T) >= 16 ? 16 / static_cast<int>(sizeof(T)) : W;
#pragma unroll
  for (int c = 0; c < W / C; ++c) {
    const Pack<T, C> v = *reinterpret_cast<const Pack<T, C>*>(ptr + c * C);
    widen<T, C>(v, out + c * C);
  }
}

template <int W>
__device__ __forceinline__ void load_bias(const FinalizeProblem& p, int64_t offset, float* out) {
  switch (p.bias_dtype) {
    case ScalarType::Float:
      load_floats<float, W>(static_cast<const float*>(p.bias) + offset, out);
      break;
    case ScalarType::BFloat16:
      load_floats<__nv_bfloat16, W>(static_cast<const __nv_bfloat16*>(p.bias) + offset, out);
      break;
    default: load_floats<__half, W>(static_cast<const __half*>(p.bias) + offset, out);
  }
}

// acc[0..W) += the G slots `s` (row < 0: skipped) at columns col..col+W, in
// k-order; every row is loaded before any is consumed. Every element takes the same arithmetic
// whatever W is (bitwise equal vector and tail paths).
template <typename T, int W, int G, bool kBias, bool kL1Allocate = false, typename S>
__device__ __forceinline__ void accumulate(float* acc, const FinalizeProblem& p, int64_t col,
                                           int64_t scale_block_off, const S* s) {
  constexpr bool k32 = std::is_same_v<decltype(S::row), int32_t>;  // the common format's slots
  const T* col_ptr = static_cast<const T*>(p.input) + col;
  const float* scale_col = p.scales + scale_block_off;
  Pack<T, W> rows[G];
  float sc[G];
#pragma unroll
  for (int u = 0; u < G; ++u) {
    rows[u] = load_stream<T, W, kL1Allocate>(
        col_ptr + row_offset<k32>(s[u].row, p.input_row_stride), s[u].row >= 0);
  }
#pragma unroll
  for (int u = 0; u < G; ++u) {
    sc[u] = load_scale<kL1Allocate>(scale_col + row_offset<k32>(s[u].row, p.scale_stride_row),
                                    p.scales != nullptr && s[u].row >= 0);
  }
#pragma unroll
  for (int u = 0; u < G; ++u) {
    if (s[u].row < 0) continue;
    float x[W];
    widen<T, W>(rows[u], x);
    if constexpr (kBias) {
      float b[W];
      if (s[u].bias_off >= 0) {
        load_bias<W>(p, s[u].bias_off + col, b);
      } else {
#pragma unroll
        for (int e = 0; e < W; ++e) b[e] = 0.0f;
      }
#pragma unroll
      for (int e = 0; e < W; ++e) acc[e] = fmaf(s[u].w, fmaf(x[e], sc[u], b[e]), acc[e]);
    } else {
      const float ws = s[u].w * sc[u];
#pragma unroll
      for (int e = 0; e < W; ++e) acc[e] = fmaf(ws, x[e], acc[e]);
    }
  }
}

// acc[0..VEC) += this thread's columns of token c.t over all its slots, in k-order: the vector
// path, or acc[0] on the scalar tail where kTail (kernels whose H is a multiple of VEC have
// none). The body shared by finalize_ext_kernel and finalize_fp8_out_vec_kernel.
template <typename TIn, int VEC, int G, bool kBias, bool kL1Allocate, bool kCommonSlots,
          bool kTail>
__device__ __forceinline__ void accumulate_token(float* acc, const FinalizeProblem& p,
                                                 const Columns& c, int64_t scale_block_off) {
  using S = SlotOf<kBias, kCommonSlots>;
  auto read = [&](int64_t k) { return read_slot<kBias, kCommonSlots>(p, c.t, k); };
  auto consume = [&](const S* slots, int) {
    if (c.is_vector) {
      accumulate<TIn, VEC, G, kBias, kL1Allocate>(acc, p, c.col, scale_block_off, slots);
    } else if (kTail && c.is_tail) {
      accumulate<TIn, 1, G, kBias>(acc, p, c.col, scale_block_off, slots);
    }
  };
  // The decode kernels (8-byte FP8 vectors, T < kFp8NarrowMaxTokens) read a single batch of
  // slots directly (direct_slot_batch): H100, benchmarks/HISTORY.md "Session 12", FP8
  // DeepSeek-V3 T=128 5.34 -> 5.20 us, K=8 T=200 5.00 -> 4.84, K=8 T=16 2.41-2.46 -> 2.31-2.36.
  // Elsewhere G=2 serves top_k <= 2 only (with_rows_in_flight) and reads its one batch through
  // lanes: nothing is carried across a loop over batches (K=2 FP8 output 2-4% faster at
  // T=256-4096, FP8 input up to 3%, H100).
  if constexpr (kFp8Narrow<TIn, VEC>) {
    if (p.top_k <= G) {
      read_slots<SlotRead::kDirect, G, S>(p.top_k, read, consume);
    } else {
      read_slots<SlotRead::kBatches, G, S>(p.top_k, read, consume);
    }
  } else {
    read_slots<G == 2 ? SlotRead::kOneBatch : SlotRead::kBatches, G, S>(p.top_k, read, consume);
  }
}

// The vector store of a thread whose VEC results are two 16-byte halves (e4m3 in, 16-bit out:
// 32 bytes per lane, 1 KB per warp). Stored per lane, each of the warp's two store instructions
// writes half of every one of 32 sectors (Nsight Compute, K=2 T=16384: twice the L2 write
// sectors of the bf16 kernel, L2 at 91% of its peak while DRAM is at 76%). Where the whole warp
// holds vectors of one row, lanes exchange halves with shuffles instead, so that the first
// instruction writes the warp's first 512 bytes, lane j at 16 j (half j % 2 of lane j / 2), and
// the second the next 512. Measured on H100 (benchmarks/HISTORY.md "Session 8"): FP8 Mixtral
// T=16384 98.2 -> 96.0 us, T=1024 8.2 -> 8.0 us, 0.3-1.2% elsewhere. Same values as store_output();
// every lane of the warp must call this.
template <typename TOut, int VEC>
__device__ __forceinline__ void store_warp_rows(const FinalizeProblem& p, const Columns& c,
                                                const float* acc) {
  constexpr int C = VEC / 2;
  static_assert(C * sizeof(TOut) == 16, "two 16-byte halves per lane");
  if (!__all_sync(0xffffffffu, c.is_vector)) {
    if (c.is_vector) store_output<TOut, VEC>(p, c.t, c.col, acc);
    return;
  }
  const Pack<TOut, C> h0 = output_chunk<TOut, C>(p, c.t, c.col, acc);
  const Pack<TOut, C> h1 = output_chunk<TOut, C>(p, c.t, c.col + C, acc + C);
  uint32_t w0[4], w1[4];
  memcpy(w0, &h0, sizeof w0);
  memcpy(w1, &h1, sizeof w1);
  const int lane = threadIdx.x % 32;
  const bool second = lane & 1;  // this lane writes the second half of its source's 32 bytes
  const int64_t warp_col = c.col - static_cast<int64_t>(lane) * VEC;
#pragma unroll
  for (int part = 0; part < 2; ++part) {
    const int src = part * 16 + lane / 2;
    uint32_t out_words[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint32_t a = __shfl_sync(0xffffffffu, w0[w], src);
      const uint32_t b = __shfl_sync(0xffffffffu, w1[w], src);
      out_words[w] = second ? b : a;
    }
    // One st.global.v4 by hand: from these shuffled words nvcc 13 split store_chunk's plain
    // 16-byte store into 8 + 4 + 4 bytes in every such kernel, each part writing into all 16
    // sectors of the warp's 512 bytes (Nsight Compute, FP8 Mixtral T=16384: 1.31x the output's
    // L2 write sectors).
    TOut* ptr = static_cast<TOut*>(p.out) + c.t * p.out_row_stride + warp_col +
                (part * 32 + lane) * C;
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(out_words[0]),
                 "r"(out_words[1]), "r"(out_words[2]), "r"(out_words[3])
                 : "memory");
  }
}

// Blocks per SM the registers of a G-row kernel are bounded for, measured on H100: G=8 at most
// 80 registers, 6 blocks (more bytes in flight than 4 blocks of the unbounded 102-register
// build); G<=4 at most 64, 8 blocks, or when streaming (T >= kStreamMinTokens) 56, 9 blocks:
// FP8 1-4% faster there, 5-7% slower at T=512; 48 registers (10 blocks) measured within 1%.
// G=2 when streaming: 40 registers, 12 blocks (K=2 moves few bytes per thread, so occupancy
// decides: FP8 Mixtral T=16384 103.2 -> 98.7 us; 32 registers spill 16-24 bytes: 116.6 us).
// Unbounded (1): bias kernels, and narrow ones (decode only: few blocks, no spills).
constexpr int min_blocks_per_sm(int rows_in_flight, bool bounded, bool stream) {
  if (!bounded) return 1;
  if (rows_in_flight == 8) return 6;
  if (stream) return rows_in_flight == 4 ? 9 : rows_in_flight == 2 ? 12 : 8;
  return 8;
}

// Calls launch(std::integral_constant<int, blocks>{}) with min_blocks_per_sm for this launch;
// a separate streaming instantiation only where its bound differs.
template <int G, bool kBounded, bool kL1Allocate, typename Launch>
void with_register_bound(int64_t num_tokens, Launch&& launch) {
  static_assert(kStreamMinTokens >= kL1AllocateMinTokens, "streaming launches read through L1");
  constexpr int kDefault = min_blocks_per_sm(G, kBounded, false);
  constexpr int kStream = min_blocks_per_sm(G, kBounded, true);
  if constexpr (kStream != kDefault && kL1Allocate) {
    if (num_tokens >= kStreamMinTokens) {
      launch(std::integral_constant<int, kStream>{});
      return;
    }
  }
  launch(std::integral_constant<int, kDefault>{});
}

// Reads, before the upstream wait, the kernel parameters the decode kernels first need after
// it (scales, residual and out pointers and strides), so that their constant-bank lines are
// cached by then: read after the wait, each line missed on the dependent path. The values feed a
// volatile shared store under a condition that only decides whether the store happens (it
// writes nothing anyone reads), because nvcc drops reads whose results go unused. H100
// (benchmarks/HISTORY.md "Session 12"): FP8 K=8 T=128 3.84 -> 3.66 us, DeepSeek-V3 T=128
// 5.12 -> 4.95, K=8 T=200 4.75 -> 4.60, FP8 output likewise; no shape slower.
__device__ __forceinline__ void cache_late_params(const FinalizeProblem& p) {
  __shared__ volatile int sink;
  const uint64_t mix = reinterpret_cast<uint64_t>(p.scales) ^ reinterpret_cast<uint64_t>(p.out) ^
                       reinterpret_cast<uint64_t>(p.residual) ^
                       static_cast<uint64_t>(p.scale_stride_row) ^
                       static_cast<uint64_t>(p.scale_stride_block) ^
                       static_cast<uint64_t>(p.out_row_stride);
  if (mix == 0x123456789ULL) sink = 1;
}

template <typename TIn, typename TOut, int VEC, int G, bool kBias, bool kL1Allocate,
          bool kCommonSlots, int kMinBlocks>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    finalize_ext_kernel(const __grid_constant__ FinalizeProblem p, const RowSplit split) {
  const Columns c = my_columns(split, VEC);
  // VEC divides 128, so a vector never straddles two scale blocks.
  const int64_t scale_block_off = (c.col / kScaleBlock) * p.scale_stride_block;

  // The slots' map entries and weights go to L2 while the upstream grid still runs. Measured on
  // H100 (benchmarks/HISTORY.md "Session 7"): FP8 at K >= 4 5-10% faster at T=16, 2-4% at
  // T=128-256. The G=2 (K <= 2) kernels gained nothing or lost up to 3%, so they skip it.
  if constexpr (G >= 4) prefetch_slot<kCommonSlots>(p, c.t);
  if constexpr (kFp8Narrow<TIn, VEC>) cache_late_params(p);
  wait_for_upstream();  // input, scales, map, weights, bias and residual may be fresh
  let_downstream_launch();

  float acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
  accumulate_token<TIn, VEC, G, kBias, kL1Allocate, kCommonSlots, true>(acc, p, c,
                                                                      scale_block_off);

  if constexpr (VEC * sizeof(TOut) == 32) {
    store_warp_rows<TOut, VEC>(p, c, acc);
  } else if (c.is_vector) {
    store_output<TOut, VEC>(p, c.t, c.col, acc);
  }
  if (c.is_tail) store_output<TOut, 1>(p, c.t, c.col, acc);
}

// codes[e] = e4m3(x[e] / s) for e < W, s > 0 the block's scale: the quotient rounded to fp32,
// then to e4m3 (nearest even, saturating to +-448), as the CPU kernel does. A full fp32 division
// per element made the K=2 FP8-output kernel issue-bound (Nsight Compute, H100), so where s is
// in [2^-60, 2^60] the quotient takes three FMA-pipe instructions: with r = RN(1 / s), q = x * r
// is within an ulp of x / s, and q + RN(x - s q) r rounds to exactly RN(x / s) (Markstein's
// theorem; the fma makes x - s q exact). That holds while nothing underflows: |x| <= 448 s by
// construction, and codes other than 0 need |x / s| >= 2^-10, so |x| >= 2^-70. The sign is x's
// (s > 0), which also keeps -0 as -0. Outside that range (an infinite amax, a tiny amax_floor):
// the full division.
template <int W>
__device__ __forceinline__ void quantize_e4m3(const float* x, float s, __nv_fp8_e4m3* codes) {
  static_assert(W % 2 == 0, "codes are converted in pairs");
  float q[W];
  if (s >= 0x1p-60f && s <= 0x1p60f) {
    const float r = 1.0f / s;
#pragma unroll
    for (int e = 0; e < W; ++e) {
      const float approx = x[e] * r;
      q[e] = copysignf(fmaf(fmaf(-approx, s, x[e]), r, approx), x[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) q[e] = x[e] / s;
  }
#pragma unroll
  for (int e = 0; e < W; e += 2) {
    const __nv_fp8x2_storage_t pair =
        __nv_cvt_float2_to_fp8x2(make_float2(q[e], q[e + 1]), __NV_SATFINITE, __NV_E4M3);
    memcpy(&codes[e], &pair, sizeof pair);
  }
}

// FP8 output: one warp per (token, 128-column block), 4 columns per lane (one 4-element access
// where kVec4 and the lane's 4 columns are inside the row, else one column at a time); the warp
// reduces the block's amax, writes the scale, then the e4m3 codes.
constexpr int kWarpsPerBlock = 4;

// acc[e] = fp32 value of output element t, col + e (e < n): residual (bf16, fp16 or fp32) plus
// scale * acc, or scale * acc without one. The residual dtype is switched on once, not per element
// (per element it cost a branch each in the K=2 kernel's SASS).
template <typename T, int W>
__device__ __forceinline__ void add_residual(const T* row, float scale, float* acc, int n) {
#pragma unroll
  for (int e = 0; e < W; ++e) {
    if (e < n) acc[e] = fmaf(scale, acc[e], Elem<T>::load(row[e]));
  }
}

template <int W>
__device__ __forceinline__ void output_values(const FinalizeProblem& p, int64_t t, int64_t col,
                                              float* acc, int n = W) {
  if (p.residual == nullptr) {
#pragma unroll
    for (int e = 0; e < W; ++e) acc[e] = p.scale * acc[e];
    return;
  }
  const int64_t offset = t * p.residual_row_stride + col;
  switch (p.residual_dtype) {
    case ScalarType::Float:
      add_residual<float, W>(static_cast<const float*>(p.residual) + offset, p.scale, acc, n);
      break;
    case ScalarType::BFloat16:
      add_residual<__nv_bfloat16, W>(static_cast<const __nv_bfloat16*>(p.residual) + offset,
                                     p.scale, acc, n);
      break;
    default:
      add_residual<__half, W>(static_cast<const __half*>(p.residual) + offset, p.scale, acc, n);
  }
}

template <typename TIn, bool kBias, bool kVec4>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    finalize_fp8_out_kernel(const __grid_constant__ FinalizeProblem p, int64_t num_blocks) {
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x % 32;
  const int64_t block = static_cast<int64_t>(blockIdx.y) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t col0 = block * kScaleBlock + lane * 4;
  const int64_t scale_block_off = block * p.scale_stride_block;
  const bool whole = kVec4 && col0 + 4 <= p.hidden;

  prefetch_slot(p, t);  // kMaxRowsInFlight (8) rows in flight: see finalize_ext_kernel
  wait_for_upstream();
  let_downstream_launch();
  if (block >= num_blocks) return;  // the whole warp: no shuffle waits for it

  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for_each_slot_batch<kMaxRowsInFlight, Slot<kBias>>(
      p.top_k, [&](int64_t k) { return read_slot<kBias>(p, t, k); },
      [&](const auto* slots, int) {
        if (whole) {
          accumulate<TIn, 4, kMaxRowsInFlight, kBias>(acc, p, col0, scale_block_off, slots);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (col0 + e < p.hidden)
              accumulate<TIn, 1, kMaxRowsInFlight, kBias>(acc + e, p, col0 + e, scale_block_off,
                                                           slots);
          }
        }
      });

  const int n = col0 + 4 <= p.hidden ? 4 : static_cast<int>(std::max<int64_t>(p.hidden - col0, 0));
  output_values<4>(p, t, col0, acc, n);
  float amax = 0.0f;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if (e < n) amax = fmaxf(amax, fabsf(acc[e]));
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  const float s = fmaxf(amax, p.amax_floor) / kE4m3Max;
  __nv_fp8_e4m3 codes[4];
  quantize_e4m3<4>(acc, s, codes);
  auto* out = static_cast<__nv_fp8_e4m3*>(p.out) + t * p.out_row_stride;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if (e < n) out[col0 + e] = codes[e];
  }
  if (lane == 0) p.out_scales[t * p.out_scale_stride_t + block * p.out_scale_stride_block] = s;
}

// FP8 output, vector path (input rows 16-byte aligned, H % VEC == 0, output rows VEC-byte
// aligned): finalize_ext_kernel's layout and accumulation, one VEC-column vector per thread.
// VEC divides 128 and blocks are whole warps, so the 128 / VEC threads of a scale block are
// consecutive lanes of one warp: they reduce its amax with xor shuffles (threads past H take
// part with 0), then each writes its VEC codes and the block's first thread its scale.
// Registers bounded as finalize_ext_kernel's.
template <typename TIn, int VEC, int G, bool kBias, bool kL1Allocate, bool kCommonSlots,
          int kMinBlocks>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    finalize_fp8_out_vec_kernel(const __grid_constant__ FinalizeProblem p, const RowSplit split) {
  const Columns c = my_columns(split, VEC);
  const int64_t block = c.col / kScaleBlock;
  const int64_t scale_block_off = block * p.scale_stride_block;

  if constexpr (G >= 4) prefetch_slot<kCommonSlots>(p, c.t);  // see finalize_ext_kernel
  if constexpr (kFp8Narrow<TIn, VEC>) cache_late_params(p);
  wait_for_upstream();
  let_downstream_launch();

  float acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
  accumulate_token<TIn, VEC, G, kBias, kL1Allocate, kCommonSlots, false>(acc, p, c,
                                                                       scale_block_off);

  float amax = 0.0f;
  if (c.is_vector) {
    output_values<VEC>(p, c.t, c.col, acc);
#pragma unroll
    for (int e = 0; e < VEC; ++e) amax = fmaxf(amax, fabsf(acc[e]));
  }
#pragma unroll
  for (int offset = kScaleBlock / VEC / 2; offset > 0; offset /= 2)
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  if (!c.is_vector) return;
  const float s = fmaxf(amax, p.amax_floor) / kE4m3Max;
  Pack<__nv_fp8_e4m3, VEC> codes;
  quantize_e4m3<VEC>(acc, s, codes.v);
  *reinterpret_cast<Pack<__nv_fp8_e4m3, VEC>*>(static_cast<__nv_fp8_e4m3*>(p.out) +
                                               c.t * p.out_row_stride + c.col) = codes;
  if (c.col % kScaleBlock == 0)
    p.out_scales[c.t * p.out_scale_stride_t + block * p.out_scale_stride_block] = s;
}

// ---- host side -----------------------------------------------------------------------------

// Whether `vec`-element accesses into the bias rows are aligned (true without a bias).
bool bias_aligned(const FinalizeProblem& p, int vec) {
  if (p.bias == nullptr) return true;
  const size_t size = p.bias_dtype == ScalarType::Float ? 4 : 2;
  return aligned(p.bias, p.bias_row_stride, std::min<int>(vec, 16 / static_cast<int>(size)), size);
}

// Rows in flight per thread for FP8 input: K=8 in two batches of 4 from this many tokens on
// (measured on H100: 13% faster at T=256, 1-5% at T=512-16384; one batch of 8 keeps the
// dependency chain shortest at decode).
constexpr int64_t kFp8HalfBatchMinTokens = 256;

// Whether a VEC-element TIn kernel moves whole 16-byte vectors: only those choose a load
// flavour by T (with_load_flavour); narrow and scalar kernels keep the non-allocating one.
template <typename TIn, int VEC>
constexpr bool full_vector() {
  return VEC * sizeof(TIn) == 16;
}

template <typename TIn, typename Launch>
void with_input_rows_in_flight(const FinalizeProblem& p, Launch&& launch) {
  if (std::is_same_v<TIn, __nv_fp8_e4m3> && p.num_tokens >= kFp8HalfBatchMinTokens) {
    with_rows_in_flight<4>(p.top_k, launch);
  } else {
    with_rows_in_flight(p.top_k, launch);
  }
}

// The per-launch choices of a VEC-element kernel of this file: calls
// launch(rows_in_flight, l1_allocate, common_slots, min_blocks), each a std::integral_constant
// (with_input_rows_in_flight, with_load_flavour, with_slot_format, with_register_bound).
template <typename TIn, int VEC, bool kBias, typename Launch>
void with_launch_choices(const FinalizeProblem& p, Launch&& launch) {
  with_input_rows_in_flight<TIn>(p, [&](auto rows_in_flight) {
    with_load_flavour<full_vector<TIn, VEC>()>(p.num_tokens, [&](auto l1_allocate) {
      constexpr int G = decltype(rows_in_flight)::value;
      constexpr bool kL1 = decltype(l1_allocate)::value;
      constexpr bool kBounded = !kBias && (VEC == 1 || full_vector<TIn, VEC>());
      with_register_bound<G, kBounded, kL1>(p.num_tokens, [&](auto min_blocks) {
        with_slot_format<(VEC > 1 && !kBias)>(p, [&](auto common_slots) {
          launch(rows_in_flight, l1_allocate, common_slots, min_blocks);
        });
      });
    });
  });
}

template <typename TIn, typename TOut, int VEC, bool kBias>
void launch_ext_typed(const FinalizeProblem& p, int device) {
  const RowLaunch l = row_launch(p.num_tokens, p.hidden, VEC, device_info(device).sm_count,
                                 p.num_tokens >= kStreamMinTokens);
  with_launch_choices<TIn, VEC, kBias>(p, [&](auto g, auto l1, auto common_slots, auto blocks) {
    launch_kernel(finalize_ext_kernel<TIn, TOut, VEC, g(), kBias, l1(), common_slots(), blocks()>,
                  l.grid, l.block, device, p, l.split);
  });
}

template <typename TIn, typename TOut, int VEC>
void launch_ext_vec(const FinalizeProblem& p, int device) {
  if (p.bias != nullptr) {
    launch_ext_typed<TIn, TOut, VEC, true>(p, device);
  } else if constexpr (std::is_same_v<TIn, __nv_fp8_e4m3>) {  // float input comes here for bias
    launch_ext_typed<TIn, TOut, VEC, false>(p, device);
  }
}

// The VEC-element vector kernel where rows, out, residual and bias allow it; true if launched.
template <typename TIn, typename TOut, int VEC>
bool launch_ext_vectorized(const FinalizeProblem& p, int device) {
  constexpr int kOutVec = std::min<int>(VEC, 16 / sizeof(TOut));
  const bool vectorizable = aligned(p.input, p.input_row_stride, VEC, sizeof(TIn)) &&
                            aligned(p.out, p.out_row_stride, kOutVec, sizeof(TOut)) &&
                            (p.residual == nullptr ||
                             aligned(p.residual, p.residual_row_stride, kOutVec, sizeof(TOut))) &&
                            bias_aligned(p, VEC);
  if (vectorizable) launch_ext_vec<TIn, TOut, VEC>(p, device);
  return vectorizable;
}

template <typename TIn, typename TOut>
void launch_ext_for_dtypes(const FinalizeProblem& p, int device) {
  if constexpr (std::is_same_v<TIn, __nv_fp8_e4m3>) {
    if (p.num_tokens < kFp8NarrowMaxTokens &&
        launch_ext_vectorized<TIn, TOut, kFp8NarrowVec>(p, device)) {
      return;
    }
  }
  if (!launch_ext_vectorized<TIn, TOut, 16 / sizeof(TIn)>(p, device)) {
    launch_ext_vec<TIn, TOut, 1>(p, device);
  }
}

template <typename TIn, bool kBias>
void launch_fp8_out_bias(const FinalizeProblem& p, int device, dim3 grid, int64_t num_blocks) {
  const bool vec4 = aligned(p.input, p.input_row_stride, 4, sizeof(TIn)) && bias_aligned(p, 4);
  if (vec4) {
    launch_kernel(finalize_fp8_out_kernel<TIn, kBias, true>, grid, dim3(32 * kWarpsPerBlock),
                  device, p, num_blocks);
  } else {
    launch_kernel(finalize_fp8_out_kernel<TIn, kBias, false>, grid, dim3(32 * kWarpsPerBlock),
                  device, p, num_blocks);
  }
}

// The vector kernel where its conditions hold (see finalize_fp8_out_vec_kernel), true if launched.
template <typename TIn, int kVec, bool kBias>
bool launch_fp8_out_vec(const FinalizeProblem& p, int device) {
  const bool vectorizable = p.hidden % kVec == 0 &&
                            aligned(p.input, p.input_row_stride, kVec, sizeof(TIn)) &&
                            aligned(p.out, p.out_row_stride, kVec, 1) && bias_aligned(p, kVec);
  if (!vectorizable) return false;
  // Token-major order at every T: column-fastest measured 1-4% slower here at K=2/4 (H100).
  const RowLaunch l = row_launch(p.num_tokens, p.hidden, kVec, device_info(device).sm_count,
                                 false);
  with_launch_choices<TIn, kVec, kBias>(p, [&](auto g, auto l1, auto common_slots, auto blocks) {
    launch_kernel(
        finalize_fp8_out_vec_kernel<TIn, kVec, g(), kBias, l1(), common_slots(), blocks()>,
        l.grid, l.block, device, p, l.split);
  });
  return true;
}

template <typename TIn>
void launch_fp8_out_typed(const FinalizeProblem& p, int device) {
  auto vector_kernel = [&](auto vec) {
    return p.bias != nullptr ? launch_fp8_out_vec<TIn, vec(), true>(p, device)
                             : launch_fp8_out_vec<TIn, vec(), false>(p, device);
  };
  if constexpr (std::is_same_v<TIn, __nv_fp8_e4m3>) {
    if (p.num_tokens < kFp8NarrowMaxTokens &&
        vector_kernel(std::integral_constant<int, kFp8NarrowVec>{})) {
      return;
    }
  }
  if (vector_kernel(std::integral_constant<int, 16 / sizeof(TIn)>{})) return;
  const int64_t num_blocks = (p.hidden + kScaleBlock - 1) / kScaleBlock;
  const int64_t grid_y = (num_blocks + kWarpsPerBlock - 1) / kWarpsPerBlock;
  STD_TORCH_CHECK(grid_y <= 65535, "finalize: hidden size ", p.hidden, " is too large");
  const dim3 grid(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(grid_y));
  if (p.bias != nullptr) {
    launch_fp8_out_bias<TIn, true>(p, device, grid, num_blocks);
  } else {
    launch_fp8_out_bias<TIn, false>(p, device, grid, num_blocks);
  }
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
  STD_TORCH_CHECK(p.bias != nullptr, "finalize: float input takes the plain kernel without bias");
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
