// Device helpers shared by the forward and backward CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include <torch/csrc/stable/macros.h>

#include "checks.h"

namespace moe_finalize {

constexpr int kMaxDevices = 64;

// ---- element types -------------------------------------------------------------------------

template <typename T>
struct Elem;
template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Elem<__half> {
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Elem<float> {
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};

// W elements moved as one access: 16 bytes for the vector path, one element for the tail.
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

// One predicated load of 4 or 2 32-bit words, zero where !valid; INSTR is the load without its
// vector suffix. (An asm template must be a string literal, hence macros.)
#define MOE_FINALIZE_LOAD_V4(INSTR)                                                      \
  "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %5, 0;\n\tmov.b32 %0, 0;\n\tmov.b32 %1, 0;\n\t" \
  "mov.b32 %2, 0;\n\tmov.b32 %3, 0;\n\t@p " INSTR ".v4.u32 {%0, %1, %2, %3}, [%4];\n\t}"
#define MOE_FINALIZE_LOAD_V2(INSTR)                                                      \
  "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %3, 0;\n\tmov.b32 %0, 0;\n\tmov.b32 %1, 0;\n\t" \
  "@p " INSTR ".v2.u32 {%0, %1}, [%2];\n\t}"

// Source rows are read exactly once. Where !valid nothing is read and the pack is zero. One
// predicated instruction, no branch: with a branch per row the compiler consumed each row
// inside its branch, which serialised the loads of a batch (measured 1.8x slower on H100).
// kL1Allocate picks the flavour (measured on H100, benchmarks/HISTORY.md): plain, L1-allocating
// ld.global streams 1-4% faster at large T; the non-coherent, L1-bypassing
// ld.global.nc.L1::no_allocate returns sooner at small T (T=1: 2.5 vs 3.6 us). A run-time
// choice (both loads emitted, one predicated off) kept neither advantage, hence the template.
template <typename T, int W, bool kL1Allocate>
__device__ __forceinline__ Pack<T, W> load_stream(const T* ptr, bool valid) {
  Pack<T, W> out;
  const int pred = static_cast<int>(valid);
  if constexpr (sizeof(Pack<T, W>) == 16) {
    uint4 raw;
    if constexpr (kL1Allocate) {
      asm volatile(MOE_FINALIZE_LOAD_V4("ld.global")
                   : "=r"(raw.x), "=r"(raw.y), "=r"(raw.z), "=r"(raw.w)
                   : "l"(ptr), "r"(pred));
    } else {
      asm volatile(MOE_FINALIZE_LOAD_V4("ld.global.nc.L1::no_allocate")
                   : "=r"(raw.x), "=r"(raw.y), "=r"(raw.z), "=r"(raw.w)
                   : "l"(ptr), "r"(pred));
    }
    memcpy(&out, &raw, sizeof raw);
  } else if constexpr (sizeof(Pack<T, W>) == 8) {  // FP8 decode vectors, 4-element tails
    uint2 raw;
    if constexpr (kL1Allocate) {
      asm volatile(MOE_FINALIZE_LOAD_V2("ld.global") : "=r"(raw.x), "=r"(raw.y)
                   : "l"(ptr), "r"(pred));
    } else {
      asm volatile(MOE_FINALIZE_LOAD_V2("ld.global.nc.L1::no_allocate")
                   : "=r"(raw.x), "=r"(raw.y)
                   : "l"(ptr), "r"(pred));
    }
    memcpy(&out, &raw, sizeof raw);
  } else {
    memset(&out, 0, sizeof out);
    if (valid) out = *reinterpret_cast<const Pack<T, W>*>(ptr);
  }
  return out;
}

// ---- the output row ------------------------------------------------------------------------

// One chunk (16 bytes or less) of out[t, col..col+C): round(residual + scale * acc).
template <typename TOut, int C>
__device__ __forceinline__ Pack<TOut, C> output_chunk(const FinalizeProblem& p, int64_t t,
                                                      int64_t col, const float* acc) {
  Pack<TOut, C> result;
  if (p.residual != nullptr) {
    // Plain (coherent) load: residual may be `out` itself.
    const Pack<TOut, C> res = *reinterpret_cast<const Pack<TOut, C>*>(
        static_cast<const TOut*>(p.residual) + t * p.residual_row_stride + col);
#pragma unroll
    for (int e = 0; e < C; ++e)
      result.v[e] = Elem<TOut>::store(fmaf(p.scale, acc[e], Elem<TOut>::load(res.v[e])));
  } else {
#pragma unroll
    for (int e = 0; e < C; ++e) result.v[e] = Elem<TOut>::store(p.scale * acc[e]);
  }
  return result;
}

template <typename TOut, int C>
__device__ __forceinline__ void store_chunk(const FinalizeProblem& p, int64_t t, int64_t col,
                                            const Pack<TOut, C>& chunk) {
  *reinterpret_cast<Pack<TOut, C>*>(static_cast<TOut*>(p.out) + t * p.out_row_stride + col) =
      chunk;
}

// out[t, col..col+W) = round(residual + scale * acc), in accesses of at most 16 bytes (residual
// and out of dtype TOut; the host launches W > 1 only where their rows are W-aligned).
template <typename TOut, int W>
__device__ __forceinline__ void store_output(const FinalizeProblem& p, int64_t t, int64_t col,
                                             const float* acc) {
  constexpr int C = W * sizeof(TOut) >= 16 ? 16 / static_cast<int>(sizeof(TOut)) : W;
#pragma unroll
  for (int c = 0; c < W / C; ++c)
    store_chunk<TOut, C>(p, t, col + c * C, output_chunk<TOut, C>(p, t, col + c * C, acc + c * C));
}

// ---- programmatic dependent launch (sm_90+) ------------------------------------------------

__device__ __forceinline__ void wait_for_upstream() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void let_downstream_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Slot (t, k)'s weight and source row. kCommonSlots: the map is int32 and the weights fp32, both
// present with k-contiguous rows (vLLM's topk_ids / topk_weights; see common_slots), read
// without the general case's null / dtype branches and stride multiply. That reader is compiled
// separately because those branches measured up to 8% of bandwidth at K=2 and 0.3 us at decode
// (H100, benchmarks/HISTORY.md "Session 4").
template <bool kCommonSlots = false>
__device__ __forceinline__ float load_weight(const FinalizeProblem& p, int64_t t, int64_t k) {
  if constexpr (kCommonSlots) {
    return static_cast<const float*>(p.weights)[t * p.weight_stride_t + k];
  }
  if (p.weights == nullptr) return 1.0f;
  const int64_t offset = t * p.weight_stride_t + k * p.weight_stride_k;
  switch (p.weight_dtype) {
    case ScalarType::Float: return static_cast<const float*>(p.weights)[offset];
    case ScalarType::BFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p.weights)[offset]);
    default: return __half2float(static_cast<const __half*>(p.weights)[offset]);
  }
}

// Pulls the map entry and weight of this lane's slot (t, lane) into L2, for lanes < top_k. Meant
// to run before wait_for_upstream(), while the upstream grid still runs: the map is rarely
// written by the kernel right before finalize, and when it is, the load after the wait still
// sees that write, because L2 is where global memory is coherent and an L2 prefetch fills
// nothing nearer the SM. The slot reads after the wait then start from L2, not DRAM.
template <bool kCommonSlots = false>
__device__ __forceinline__ void prefetch_slot(const FinalizeProblem& p, int64_t t) {
  const int lane = threadIdx.x % 32;
  if (lane >= p.top_k) return;
  const char* map = nullptr;
  const char* weight = nullptr;
  if constexpr (kCommonSlots) {
    map = reinterpret_cast<const char*>(static_cast<const int32_t*>(p.row_map) +
                                        t * p.map_stride_t + lane);
    weight = reinterpret_cast<const char*>(static_cast<const float*>(p.weights) +
                                           t * p.weight_stride_t + lane);
  } else {
    if (p.row_map != nullptr) {
      map = static_cast<const char*>(p.row_map) +
            (t * p.map_stride_t + lane * p.map_stride_k) * (p.map_is_int64 ? 8 : 4);
    }
    if (p.weights != nullptr) {
      weight = static_cast<const char*>(p.weights) +
               (t * p.weight_stride_t + lane * p.weight_stride_k) *
                   (p.weight_dtype == ScalarType::Float ? 4 : 2);
    }
  }
  if (map != nullptr) asm volatile("prefetch.global.L2 [%0];" ::"l"(map));
  if (weight != nullptr) asm volatile("prefetch.global.L2 [%0];" ::"l"(weight));
}

// Whether map entry `row` names one of the input's rows, and the element offset of that row.
// The FP8 / bias kernels of the common format (kCommonSlots) take both in 32-bit arithmetic,
// which common_slots allows only where the row count and the row strides fit in int32: one
// unsigned compare and one 32 x 32 -> 64-bit multiply per slot instead of 64-bit compares and
// multiplies (5-6 instructions each in the SASS), on the dependent path from the map to the
// rows. H100 (benchmarks/HISTORY.md "Session 12"), on top of direct_slot_batch: FP8 K=8 T=128
// 4.07 -> 3.87 us, DeepSeek-V3 T=128 5.22 -> 5.12.
template <bool kCommonSlots>
__device__ __forceinline__ bool row_in_range(int64_t row, int64_t num_rows) {
  if constexpr (kCommonSlots) {
    return static_cast<uint32_t>(row) < static_cast<uint32_t>(num_rows);
  }
  return row >= 0 && row < num_rows;
}

template <bool kCommonSlots>
__device__ __forceinline__ int64_t row_offset(int64_t row, int64_t stride) {
  if constexpr (kCommonSlots) {
    // By hand: from the C++ product of two sign-extended int32, nvcc 13 emitted the 64-bit
    // multiply (three IMADs).
    int64_t offset;
    asm("mul.wide.s32 %0, %1, %2;"
        : "=l"(offset)
        : "r"(static_cast<int32_t>(row)), "r"(static_cast<int32_t>(stride)));
    return offset;
  }
  return row * stride;
}

template <bool kCommonSlots = false>
__device__ __forceinline__ int64_t load_row(const FinalizeProblem& p, int64_t t, int64_t k) {
  if constexpr (kCommonSlots) {
    return static_cast<const int32_t*>(p.row_map)[t * p.map_stride_t + k];
  }
  if (p.row_map == nullptr) return t * p.top_k + k;
  const int64_t offset = t * p.map_stride_t + k * p.map_stride_k;
  return p.map_is_int64 ? static_cast<const int64_t*>(p.row_map)[offset]
                        : static_cast<int64_t>(static_cast<const int32_t*>(p.row_map)[offset]);
}

// ---- host side ---------------------------------------------------------------------------------

struct DeviceInfo {
  int sm_count = 0;
  int cc_major = 0;
};

// Multiprocessor count and compute capability, read once per device.
const DeviceInfo& device_info(int device);

// Programmatic dependent launch: on unless MOE_FINALIZE_PDL=0 or set_pdl(false), and sm_90+.
bool pdl_enabled();

// The current torch CUDA stream of `device`.
cudaStream_t current_stream(int device);

// Makes `device` current for the scope; a no-op (one cudaGetDevice) when it already is, which
// is the common case, so the hot path skips creating a torch DeviceGuard.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    STD_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) STD_CUDA_CHECK(cudaSetDevice(device));
    else previous_ = -1;
  }
  ~DeviceScope() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = -1;
};

// Whether rows at `ptr` with `row_stride` (elements) allow `vec`-element aligned accesses.
inline bool aligned(const void* ptr, int64_t row_stride, int vec, size_t elem_size) {
  return reinterpret_cast<uintptr_t>(ptr) % (vec * elem_size) == 0 && row_stride % vec == 0;
}

// Threads per block (one column unit each): enough blocks to cover every SM about twice even
// at tiny T (the row split across blocks), but no block wider than the row or 128 threads.
// The row's units are then spread evenly over that many blocks (whole warps): gpt-oss FP8
// rows (180 units) take 2 blocks of 96 threads, not 128 with 30% of the lanes idle.
inline int pick_threads(int64_t num_tokens, int64_t units, int sm_count) {
  const int64_t target_blocks = 2LL * sm_count;
  int64_t threads = (num_tokens * units + target_blocks - 1) / target_blocks;
  threads = std::max<int64_t>(32, std::min<int64_t>(128, threads));
  threads = std::min<int64_t>(threads, ((units + 31) / 32) * 32);
  threads = (threads + 31) / 32 * 32;
  const int64_t blocks = std::max<int64_t>(1, (units + threads - 1) / threads);
  const int64_t even = (units + blocks - 1) / blocks;
  return static_cast<int>(std::max<int64_t>(32, (even + 31) / 32 * 32));
}

// ---- one block per (token, column slice) ----------------------------------------------------

// A row of H columns as thread units: H / vec full vectors, then H % vec scalar tail columns.
struct RowSplit {
  int32_t body_units;  // 32-bit (H < 2^31): fewer registers, see Columns
  int32_t units;
  // 0: 2-D grid (token, column block). Otherwise a 1-D grid of num_tokens * col_blocks blocks,
  // the column block varying fastest (see row_launch); block / col_blocks is
  // umulhi(block, div_multiplier) >> div_shift (exact below 2^31, see column_divisor).
  uint32_t col_blocks;
  uint32_t div_multiplier, div_shift;
};

// This thread's token and columns: one vec-wide vector, or one scalar tail column. 32-bit
// fields (T < 2^31 and H < 2^31 are checked at launch): two registers less than int64, which
// keeps the 32-register G=2 kernels free of spills. Offsets computed from them are int64.
struct Columns {
  uint32_t t;
  uint32_t col;
  bool is_vector, is_tail;
};

__device__ __forceinline__ Columns my_columns(const RowSplit& split, int vec) {
  uint32_t t = blockIdx.x, col_block = blockIdx.y;
  if (split.col_blocks != 0) {
    t = split.col_blocks == 1 ? blockIdx.x
                              : __umulhi(blockIdx.x, split.div_multiplier) >> split.div_shift;
    col_block = blockIdx.x - t * split.col_blocks;
  }
  const uint32_t unit = col_block * blockDim.x + threadIdx.x;
  Columns c;
  c.t = t;
  c.is_vector = unit < static_cast<uint32_t>(split.body_units);
  c.is_tail = !c.is_vector && unit < static_cast<uint32_t>(split.units);
  c.col = c.is_vector ? unit * vec : split.body_units * vec + (unit - split.body_units);
  return c;
}

struct RowLaunch {
  RowSplit split;
  dim3 grid, block;
};

// From this many tokens on, launches are tuned for streaming (measured on H100,
// benchmarks/HISTORY.md "Session 4"): blocks in column-block-fastest order (a token's whole row is
// read and written by neighbouring blocks), bf16 rows 2 in flight per thread, FP8 kernels at
// 56 registers. Below it those cost 1-6%.
constexpr int64_t kStreamMinTokens = 4096;

// Division of block indices n < 2^31 by d >= 2 as a multiply-high and a shift (a divide is ~20
// instructions): l = ceil(log2 d), m = ceil(2^(31+l) / d) < 2^32, n / d = (n * m) >> (31 + l).
// Exact: m * d - 2^(31+l) < d, so n * m / 2^(31+l) exceeds n / d by less than n / 2^(31+l)
// < 1 / d, too little to reach the next integer. (d = 1 is the kernel's own branch.)
inline void column_divisor(RowSplit& split, uint32_t d) {
  int l = 0;
  while ((1ULL << l) < d) ++l;
  split.col_blocks = d;
  split.div_multiplier = static_cast<uint32_t>(((1ULL << (31 + l)) + d - 1) / d);
  split.div_shift = l > 0 ? static_cast<uint32_t>(l - 1) : 0;
}

// The launch of a kernel that reads my_columns(split, vec); column_fastest asks for the 1-D,
// column-block-fastest grid (kept 2-D where num_tokens * column blocks would not fit).
inline RowLaunch row_launch(int64_t num_tokens, int64_t hidden, int vec, int sm_count,
                            bool column_fastest) {
  STD_TORCH_CHECK(num_tokens <= 0x7fffffffLL && hidden <= 0x7fffffffLL,
                  "finalize: too many tokens or columns for one launch");
  RowLaunch l;
  l.split.body_units = static_cast<int32_t>(hidden / vec);
  l.split.units = static_cast<int32_t>(hidden / vec + hidden % vec);
  const int threads = pick_threads(num_tokens, l.split.units, sm_count);
  const int64_t col_blocks = (l.split.units + threads - 1) / threads;
  STD_TORCH_CHECK(col_blocks <= 65535, "finalize: hidden size ", hidden, " is too large");
  l.block = dim3(threads);
  l.split.col_blocks = l.split.div_multiplier = l.split.div_shift = 0;
  if (column_fastest && num_tokens * col_blocks <= 0x7fffffffLL) {
    column_divisor(l.split, static_cast<uint32_t>(col_blocks));
    l.grid = dim3(static_cast<unsigned>(num_tokens * col_blocks));
  } else {
    l.grid = dim3(static_cast<unsigned>(num_tokens), static_cast<unsigned>(col_blocks));
  }
  return l;
}

// Rows in flight per thread: top-k rounded up to 2, 4 or 8, at most kMaxG. A smaller G needs
// fewer registers, so small-K models (Mixtral, K=2) keep more warps, and bytes, in flight per
// SM. Calls launch(std::integral_constant<int, G>{}).
template <int kMaxG = 8, typename Launch>
void with_rows_in_flight(int64_t top_k, Launch&& launch) {
  if (top_k <= 2 || kMaxG == 2) {
    launch(std::integral_constant<int, 2>{});
  } else if (top_k <= 4 || kMaxG == 4) {
    launch(std::integral_constant<int, 4>{});
  } else {
    launch(std::integral_constant<int, 8>{});
  }
}

// From this many tokens on, vector kernels read source rows through L1 (see load_stream).
constexpr int64_t kL1AllocateMinTokens = 1024;

// Calls launch(std::bool_constant<kL1Allocate>{}): L1-allocating loads for vector kernels
// (kVector) from kL1AllocateMinTokens tokens on; scalar kernels get one instantiation.
template <bool kVector, typename Launch>
void with_load_flavour(int64_t num_tokens, Launch&& launch) {
  if constexpr (kVector) {
    if (num_tokens >= kL1AllocateMinTokens) {
      launch(std::true_type{});
      return;
    }
  }
  launch(std::false_type{});
}

// Token t's top-k slots in k-order, G at a time. Lane i of the warp reads slot k0 + i
// (read(k) returns a Slot) and shuffles hand it to the whole warp, so the map is read once per
// warp, with no block barrier. consume(slots, count): slots[u] is slot k0 + j + u for u < count,
// Slot{} (skipped) past it. Slot: default-constructed = skipped; from_lane(src) = lane src's
// slot. Every lane of the warp must call this (the loop bounds are warp-uniform).
template <int G, typename Slot, typename Read, typename Consume>
__device__ __forceinline__ void for_each_slot_batch(int64_t top_k, Read read, Consume consume) {
  const int lane = threadIdx.x % 32;
  for (int64_t k0 = 0; k0 < top_k; k0 += 32) {
    const int n = top_k - k0 < 32 ? static_cast<int>(top_k - k0) : 32;
    const Slot mine = lane < n ? read(k0 + lane) : Slot{};
    for (int j = 0; j < n; j += G) {  // G divides 32, so j + u < 32: lanes >= n hold Slot{}
      Slot slots[G];
#pragma unroll
      for (int u = 0; u < G; ++u) slots[u] = mine.from_lane(j + u);
      consume(slots, n - j < G ? n - j : G);
    }
  }
}

// The one batch for_each_slot_batch would hand out when top_k <= G, without its loops (13.5%
// fewer instructions in the G=2 kernels; H100, benchmarks/HISTORY.md "Session 11"): lane i
// reads slot i, shuffles give every lane slots 0..G-1 (Slot{} past top_k), then
// consume(slots, top_k). Every lane of the warp must call this.
template <int G, typename Slot, typename Read, typename Consume>
__device__ __forceinline__ void one_slot_batch(int64_t top_k, Read read, Consume consume) {
  const int lane = threadIdx.x % 32;
  const Slot mine = lane < top_k ? read(lane) : Slot{};
  Slot slots[G];
#pragma unroll
  for (int u = 0; u < G; ++u) slots[u] = mine.from_lane(u);
  consume(slots, static_cast<int>(top_k));
}

// The same batch (top_k <= G) with every lane reading all of its slots itself: G map and
// weight loads per thread, each to one address across the warp, and no shuffles. The slot
// loads start the dependent chain of a decode call, and without the shuffles the rows' loads
// start sooner: tools/chain_probe.py --fp8 (H100, benchmarks/HISTORY.md "Session 12") measured
// 0.1-0.2 us per call at K=8 T=16. Every lane of the warp must call this.
template <int G, typename Slot, typename Read, typename Consume>
__device__ __forceinline__ void direct_slot_batch(int64_t top_k, Read read, Consume consume) {
  Slot slots[G];
#pragma unroll
  for (int u = 0; u < G; ++u) slots[u] = u < top_k ? read(u) : Slot{};
  consume(slots, static_cast<int>(top_k));
}

// How a kernel reads its token's slots: in batches of G (for_each_slot_batch, any top_k), or
// as one batch (top_k <= G) through lanes and shuffles (one_slot_batch) or by every lane
// (direct_slot_batch).
enum class SlotRead { kBatches, kOneBatch, kDirect };

template <SlotRead kRead, int G, typename Slot, typename Read, typename Consume>
__device__ __forceinline__ void read_slots(int64_t top_k, Read read, Consume consume) {
  if constexpr (kRead == SlotRead::kDirect) {
    direct_slot_batch<G, Slot>(top_k, read, consume);
  } else if constexpr (kRead == SlotRead::kOneBatch) {
    one_slot_batch<G, Slot>(top_k, read, consume);
  } else {
    for_each_slot_batch<G, Slot>(top_k, read, consume);
  }
}

// Whether the map and weights have the common format load_row<true> / load_weight<true> read
// (with K = 1 the k-stride is never used), and the row count and row strides fit the 32-bit
// arithmetic of row_in_range<true> / row_offset<true>.
inline bool common_slots(const FinalizeProblem& p) {
  constexpr int64_t kInt32Max = 0x7fffffffLL;
  const bool k_contiguous = p.top_k == 1 || (p.map_stride_k == 1 && p.weight_stride_k == 1);
  const bool rows_32bit = p.num_rows <= kInt32Max && p.input_row_stride <= kInt32Max &&
                          p.scale_stride_row <= kInt32Max;
  return p.row_map != nullptr && !p.map_is_int64 && p.weights != nullptr &&
         p.weight_dtype == ScalarType::Float && k_contiguous && rows_32bit;
}

// Calls launch(std::bool_constant<kCommonSlots>{}): true where kAllowed and common_slots(p).
template <bool kAllowed, typename Launch>
void with_slot_format(const FinalizeProblem& p, Launch&& launch) {
  if constexpr (kAllowed) {
    if (common_slots(p)) {
      launch(std::true_type{});
      return;
    }
  }
  launch(std::false_type{});
}

// Launches on the current stream of `device`, as a programmatic dependent launch where enabled.
// Every kernel launched this way calls wait_for_upstream() before its first global load (only
// prefetch_slot's L2 prefetches may come before it).
template <typename... KernelParams, typename... Args>
void launch_kernel(void (*kernel)(KernelParams...), dim3 grid, dim3 block, int device,
                   Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.stream = current_stream(device);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  if (device_info(device).cc_major >= 9 && pdl_enabled()) {
    config.attrs = attr;
    config.numAttrs = 1;
  }
  STD_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace moe_finalize
