// CUDA finalize. One block per (token, column slice); every thread owns one 16-byte column
// vector (columns past the last full vector take a scalar tail path with the same arithmetic),
// keeps up to 8 source rows in flight and accumulates them in fp32 in fixed k-order, so every
// output element is computed identically whatever the batch or launch shape (batch invariance).
// The token's slots (row offset, weight) are read once per warp, lane i holding slot k0 + i,
// and handed to the whole warp with shuffles: no block barrier and no per-thread map reads.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/macros.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cuda_common.cuh"
#include "finalize.h"

namespace moe_finalize {
namespace {

constexpr int kMaxThreads = 256;  // launch bound (pick_threads uses at most 128; measured so)

// ---- the kernel ----------------------------------------------------------------------------

// Slot (t, k) as the accumulation reads it: the source row's element offset (-1: skip it) and
// its weight.
struct RowSlot {
  int64_t off = -1;
  float w = 0.0f;
  __device__ __forceinline__ RowSlot from_lane(int src) const {
    return {__shfl_sync(0xffffffffu, off, src), __shfl_sync(0xffffffffu, w, src)};
  }
};

// The weight is read whatever the map holds ((t, k) is always in bounds), so its load overlaps
// the map load instead of waiting for it: one dependent memory round trip less at small T.
template <bool kCommonSlots>
__device__ __forceinline__ RowSlot read_slot(const FinalizeProblem& p, int64_t t, int64_t k) {
  const int64_t row = load_row<kCommonSlots>(p, t, k);
  const float w = load_weight<kCommonSlots>(p, t, k);
  const bool valid = row >= 0 && row < p.num_rows;  // never read outside input
  // 64-bit arithmetic, unlike the FP8 kernels' row_offset<true>: its asm multiply here, inside
  // direct_slot_batch's per-slot branch, kept nvcc from predicating the slot loads, and the
  // serialised loads cost 0.2-0.5 us at K=8 (H100, benchmarks/HISTORY.md "Session 12").
  return {valid ? row * p.input_row_stride : -1, valid ? w : 0.0f};
}

// acc[0..W) += w * row[col..col+W) for the first `count` of the G slots, in k-order. Every row
// is loaded before any is consumed (G rows in flight per thread); a skipped slot reads nothing.
template <typename T, int W, int G, bool kL1Allocate>
__device__ __forceinline__ void accumulate_rows(float* acc, const T* col_ptr, const RowSlot* s,
                                                int count) {
  Pack<T, W> rows[G];
#pragma unroll
  for (int u = 0; u < G; ++u)
    rows[u] = load_stream<T, W, kL1Allocate>(col_ptr + s[u].off, u < count && s[u].off >= 0);
#pragma unroll
  for (int u = 0; u < G; ++u) {
    if (u < count) {
#pragma unroll
      for (int e = 0; e < W; ++e) acc[e] = fmaf(s[u].w, Elem<T>::load(rows[u].v[e]), acc[e]);
    }
  }
}

// G: rows in flight per thread (with_rows_in_flight). G=2 is bounded to 32 registers, a full SM.
// kL1Allocate: with_load_flavour. kRead: how the slots are read (launch_typed picks it).
template <typename T, int VEC, int G, bool kL1Allocate, bool kCommonSlots, SlotRead kRead>
__global__ void __launch_bounds__(kMaxThreads, G == 2 ? 8 : 1)
    finalize_kernel(const __grid_constant__ FinalizeProblem p, const RowSplit split) {
  const Columns c = my_columns(split, VEC);
  // As in finalize_ext_kernel: the slots go to L2 while the upstream grid runs (H100: T=1 6%,
  // T=16 1-5% faster; at K <= 2 no gain, so G=2 skips it).
  if constexpr (G >= 4) prefetch_slot<kCommonSlots>(p, c.t);
  wait_for_upstream();  // input, map, weights and residual may come from the previous kernel
  let_downstream_launch();

  float acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
  const T* col_ptr = static_cast<const T*>(p.input) + c.col;
  auto read = [&](int64_t k) { return read_slot<kCommonSlots>(p, c.t, k); };
  auto consume = [&](const RowSlot* slots, int count) {
    if (c.is_vector) {
      accumulate_rows<T, VEC, G, kL1Allocate>(acc, col_ptr, slots, count);
    } else if (c.is_tail) {
      accumulate_rows<T, 1, G, false>(acc, col_ptr, slots, count);
    }
  };
  read_slots<kRead, G, RowSlot>(p.top_k, read, consume);
  if (c.is_vector) {
    store_output<T, VEC>(p, c.t, c.col, acc);
  } else if (c.is_tail) {
    store_output<T, 1>(p, c.t, c.col, acc);
  }
}

// ---- host side -----------------------------------------------------------------------------

// Streaming launches (column-block-fastest, few rows in flight; H100, benchmarks/HISTORY.md
// "Session 10"): 2 rows in flight (32 registers, full occupancy) beat 8 from T=4096 on. With
// more than kFewSlots slots, 4 rows beat 2 by 0.2-0.4% on expert-grouped maps (K=8 T=16384
// 400.9 -> 399.8 us; at K=4, gpt-oss, they lost 0.7%), and streaming pays from T=2048 (K=8
// T=2048 53.1 -> 52.2 us; at T=1024 it is even at H=4096 and 2% slower at K=4).
constexpr int64_t kFewSlots = 4;

// Below this many tokens a kernel whose rows in flight cover top_k reads its slots directly
// (direct_slot_batch): H100, benchmarks/HISTORY.md "Session 12", DeepSeek-V3 T=16 2.53 ->
// 2.42 us, K=8 T=128 4.86 -> 4.78. From there on the G=2 kernel at K <= 2 reads them as one
// batch through lanes (one_slot_batch: 13.5% fewer instructions than batches, 1-3.5% faster
// at K <= 2 from T=256 to 1024, session 11); a one-batch G=4 / G=8 kernel there measured
// mixed (session 7).
constexpr int64_t kDirectSlotsMaxTokens = 256;
constexpr int64_t kStreamMinTokensManySlots = 2048;
static_assert(kStreamMinTokensManySlots >= kL1AllocateMinTokens, "streaming reads through L1");

template <typename T, int VEC>
void launch_typed(const FinalizeProblem& p, int device) {
  const bool many_slots = p.top_k > kFewSlots;
  const bool streaming =
      p.num_tokens >= (many_slots ? kStreamMinTokensManySlots : kStreamMinTokens);
  const RowLaunch l = row_launch(p.num_tokens, p.hidden, VEC, device_info(device).sm_count,
                                 streaming);
  auto launch = [&](auto rows_in_flight) {
    constexpr int G = decltype(rows_in_flight)::value;
    with_load_flavour<(VEC > 1)>(p.num_tokens, [&](auto l1_allocate) {
      with_slot_format<(VEC > 1)>(p, [&](auto common_slots) {
        auto go = [&](auto read) {
          launch_kernel(finalize_kernel<T, VEC, G, l1_allocate(), common_slots(), read()>,
                        l.grid, l.block, device, p, l.split);
        };
        // (Streaming also runs K = 3-4 on the G=2 kernel, in two batches.)
        if (p.top_k <= G && p.num_tokens < kDirectSlotsMaxTokens) {
          go(std::integral_constant<SlotRead, SlotRead::kDirect>{});
          return;
        }
        if constexpr (G == 2) {
          if (p.top_k <= G) {
            go(std::integral_constant<SlotRead, SlotRead::kOneBatch>{});
            return;
          }
        }
        go(std::integral_constant<SlotRead, SlotRead::kBatches>{});
      });
    });
  };
  if (streaming && many_slots) {
    with_rows_in_flight<4>(p.top_k, launch);
  } else if (streaming) {
    with_rows_in_flight<2>(p.top_k, launch);
  } else {
    with_rows_in_flight(p.top_k, launch);
  }
}

template <typename T>
void launch_for_dtype(const FinalizeProblem& p, int device) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorizable = aligned(p.input, p.input_row_stride, kVec, sizeof(T)) &&
                            aligned(p.out, p.out_row_stride, kVec, sizeof(T)) &&
                            (p.residual == nullptr ||
                             aligned(p.residual, p.residual_row_stride, kVec, sizeof(T)));
  if (vectorizable) {
    launch_typed<T, kVec>(p, device);
  } else {
    launch_typed<T, 1>(p, device);
  }
}

}  // namespace

const DeviceInfo& device_info(int device) {
  static DeviceInfo cache[kMaxDevices];
  DeviceInfo& info = cache[device];
  if (info.sm_count == 0) {  // benign race: every writer stores the same values
    int sms = 0, major = 0;
    STD_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    STD_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    info.cc_major = major;
    info.sm_count = sms;
  }
  return info;
}

// -1: not read yet; then 0/1. MOE_FINALIZE_PDL=0 turns PDL off; set_pdl() overrides at run time.
static std::atomic<int> g_pdl_enabled{-1};

bool pdl_enabled() {
  int state = g_pdl_enabled.load(std::memory_order_relaxed);
  if (state < 0) {
    const char* env = std::getenv("MOE_FINALIZE_PDL");
    state = (env != nullptr && std::strcmp(env, "0") == 0) ? 0 : 1;
    g_pdl_enabled.store(state, std::memory_order_relaxed);
  }
  return state == 1;
}

cudaStream_t current_stream(int device) {
  cudaStream_t stream;
  STABLE_TORCH_ERROR_CODE_CHECK(
      aoti_torch_get_current_cuda_stream(device, reinterpret_cast<void**>(&stream)));
  return stream;
}

void launch_finalize_cuda(const FinalizeProblem& p, int device_index) {
  STD_TORCH_CHECK(p.num_tokens <= 0x7fffffffLL, "finalize: too many tokens for one launch");
  STD_TORCH_CHECK(device_index >= 0 && device_index < kMaxDevices, "finalize: bad device index");
  DeviceScope scope(device_index);
  switch (p.input_dtype) {
    case ScalarType::BFloat16: launch_for_dtype<__nv_bfloat16>(p, device_index); break;
    case ScalarType::Half: launch_for_dtype<__half>(p, device_index); break;
    case ScalarType::Float: launch_for_dtype<float>(p, device_index); break;
    default: STD_TORCH_CHECK(false, "finalize: unsupported input dtype on CUDA");
  }
}

}  // namespace moe_finalize

// Run-time PDL switch for benchmarks and debugging; returns the previous setting.
extern "C" __attribute__((visibility("default"))) int moe_finalize_set_pdl(int enabled) {
  const int previous = moe_finalize::pdl_enabled() ? 1 : 0;
  moe_finalize::g_pdl_enabled.store(enabled ? 1 : 0, std::memory_order_relaxed);
  return previous;
}
