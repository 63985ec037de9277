// CUDA backward of finalize, deterministic and without floating-point atomics.
//
// grad_input[row] = sum over the slots (t, k) pointing at row, in (t, k) order, of
// scale * w[t, k] * grad_out[t]; zeros where none does. Two launch plans:
// * few slots (decode): one kernel; each block reads the whole map (it sits in L2) and writes a
//   group of kScanRows rows. One block per row instead was 3x slower at T=64, K=8 (H100): every
//   block read the same few map lines.
// * otherwise: a dependent zero-fill and a counting pass record how many valid slots point at
//   each row; then one kernel whose token blocks read each grad_out[t] once and write every
//   row only its slot (t, k) points at (the MoE case: the map is a permutation), and whose first
//   blocks write the other rows: zeros (no slot) or the sum over the slots that share the row
//   (found by scanning the map: slow, but duplicates are rare and the sum stays bitwise
//   reproducible). Reading grad_out row-major instead re-read each grad_out row K times from
//   DRAM: 55% of the copy floor at K=8 on H100 (benchmarks/bench_backward.py).
// grad_weights: one warp per slot, a dot product of grad_out[t] and input[row] reduced in a fixed
// shuffle tree.
#include <torch/csrc/stable/macros.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "finalize.h"

namespace moe_finalize {
namespace {

constexpr int kRowThreads = 128;
constexpr int kWarpsPerBlock = 8;
constexpr int kMaxSlotsPerBatch = 8;  // token blocks: slots shuffled to the warp at a time
// The scanning plan: every block reads the whole map (at most kScanMaxSlots entries, one load
// per thread per kRowThreads slots) and writes kScanRows rows. Used while the map reads, rows *
// slots / kScanRows entries per column slice, stay at most kScanMaxPairs / kScanRows.
// 1024 (T=128 at K=8): 512 was 18% slower there, 2048 9% slower at T=256 (H100).
constexpr int kScanMaxSlots = 1024;
constexpr int kScanSlotsPerThread = kScanMaxSlots / kRowThreads;
constexpr int kScanRows = 8;
constexpr int64_t kScanMaxPairs = int64_t{kScanMaxSlots} * kScanMaxSlots;
// grad_input_counted's 16-byte bf16/fp16 build is bounded to 32 registers (16 blocks per SM):
// 2-20% faster than unbounded at T >= 1024 on H100. Other builds spill at that bound.
template <typename T, int VEC>
constexpr int counted_min_blocks() {
  return sizeof(T) == 2 && VEC * sizeof(T) == 16 ? 16 : 1;
}

bool scans_map(const FinalizeProblem& p) {
  const int64_t slots = p.num_tokens * p.top_k;
  return slots <= kScanMaxSlots && p.num_rows * slots <= kScanMaxPairs;
}

// The counting plan's scratch, zeroed by a dependent launch (a memset would not overlap).
__global__ void zero_counts(int32_t* count, int64_t n) {
  wait_for_upstream();  // the previous user of this memory may still read it
  let_downstream_launch();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    count[i] = 0;
  }
}

__global__ void count_row_slots(const FinalizeProblem p, int32_t* count) {
  wait_for_upstream();
  let_downstream_launch();
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (slot >= p.num_tokens * p.top_k) return;
  const int64_t row = load_row(p, slot / p.top_k, slot % p.top_k);
  if (row < 0 || row >= p.num_rows) return;
  atomicAdd(count + row, 1);
}

// Block-wide compaction in thread order: the threads whose `keep` is set write `value` to
// list[0..); returns how many did. Every thread of the (kRowThreads) block must call it.
__device__ __forceinline__ int compact_in_order(bool keep, int32_t value, int32_t* list,
                                                int32_t* warp_totals) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, keep);
  if (lane == 0) warp_totals[warp] = __popc(ballot);
  __syncthreads();
  int before = 0;
  int total = 0;
#pragma unroll
  for (int w = 0; w < kRowThreads / 32; ++w) {
    before += w < warp ? warp_totals[w] : 0;
    total += warp_totals[w];
  }
  if (keep) list[before + __popc(ballot & ((1u << lane) - 1u))] = value;
  __syncthreads();  // the list is complete
  return total;
}

// grad_input[row, col..col+W) = the fp32 sum, over the slots for_each_slot hands to its
// argument (in (t, k) order), of scale * w[t, k] * grad_out[t, col..col+W); zeros for none.
// `p.residual` holds grad_out, `p.out` grad_input.
template <typename T, int W, typename ForEachSlot>
__device__ __forceinline__ void write_row_sum(const FinalizeProblem& p, int64_t row, int64_t col,
                                              ForEachSlot for_each_slot) {
  const T* grad_out = static_cast<const T*>(p.residual);
  float acc[W];
#pragma unroll
  for (int e = 0; e < W; ++e) acc[e] = 0.0f;
  for_each_slot([&](int64_t slot) {
    const int64_t t = slot / p.top_k;
    const float w = p.scale * load_weight(p, t, slot % p.top_k);
    const Pack<T, W> g =
        *reinterpret_cast<const Pack<T, W>*>(grad_out + t * p.residual_row_stride + col);
#pragma unroll
    for (int e = 0; e < W; ++e) acc[e] = fmaf(w, Elem<T>::load(g.v[e]), acc[e]);
  });
  Pack<T, W> result;
#pragma unroll
  for (int e = 0; e < W; ++e) result.v[e] = Elem<T>::store(acc[e]);
  *reinterpret_cast<Pack<T, W>*>(static_cast<T*>(p.out) + row * p.out_row_stride + col) = result;
}

// grad_input[row, col..col+W) = ws * g, ws = scale * w[t, k]: a row one slot points at. The
// arithmetic of write_row_sum's first term (an fma onto 0), so both plans write the same bits.
template <typename T, int W>
__device__ __forceinline__ void write_single_slot_row(const FinalizeProblem& p, int64_t row,
                                                      int64_t col, float ws, const Pack<T, W>& g) {
  Pack<T, W> result;
#pragma unroll
  for (int e = 0; e < W; ++e) result.v[e] = Elem<T>::store(fmaf(ws, Elem<T>::load(g.v[e]), 0.0f));
  *reinterpret_cast<Pack<T, W>*>(static_cast<T*>(p.out) + row * p.out_row_stride + col) = result;
}

// Calls add(slot) for every slot from `first` on whose map entry is `row`, in (t, k) order: the
// slots of a row several point at (rare, so a plain scan of the map).
template <typename Index, typename Add>
__device__ __forceinline__ void for_each_slot_of_row(const FinalizeProblem& p, int64_t row,
                                                     Index first, Add add) {
  const Index top_k = static_cast<Index>(p.top_k);
  for (Index slot = first; slot < static_cast<Index>(p.num_tokens) * top_k; ++slot) {
    if (load_row(p, slot / top_k, slot % top_k) == row) add(slot);
  }
}

// This thread's columns of `row` (vector body or scalar tail; none past the row's end).
template <typename T, int VEC, typename ForEachSlot>
__device__ __forceinline__ void write_row_columns(const FinalizeProblem& p, int64_t row,
                                                  int64_t unit, ForEachSlot for_each_slot) {
  const int64_t body = p.hidden / VEC;
  if (unit < body) {
    write_row_sum<T, VEC>(p, row, unit * VEC, for_each_slot);
  } else if (unit < body + p.hidden % VEC) {
    write_row_sum<T, 1>(p, row, body * VEC + (unit - body), for_each_slot);
  }
}

// The scanning plan's rows first_row + i (i < kScanRows), columns col..col+W. The weight and
// grad_out row of every row's first slot are loaded unconditionally (clamped to a real slot),
// all before any is used: loads behind a per-row branch went out one at a time, 2.3 us at T=16
// on H100. Rows one slot points at (count 1) are then written from them.
template <typename T, int W, bool kCommonSlots>
__device__ __forceinline__ void write_scanned_rows(const FinalizeProblem& p, int64_t first_row,
                                                   int64_t col, const int32_t* first_slot,
                                                   const int32_t* slot_count) {
  const int top_k = static_cast<int>(p.top_k);
  const int num_slots = static_cast<int>(p.num_tokens) * top_k;
  const T* grad_out = static_cast<const T*>(p.residual);
  Pack<T, W> g[kScanRows];
  float w[kScanRows];
  if (num_slots > 0) {
#pragma unroll
    for (int i = 0; i < kScanRows; ++i) {
      const int slot = min(first_slot[i], num_slots - 1);
      const int t = slot / top_k;
      w[i] = load_weight<kCommonSlots>(p, t, slot % top_k);
      g[i] = *reinterpret_cast<const Pack<T, W>*>(grad_out + t * p.residual_row_stride + col);
    }
#pragma unroll
    for (int i = 0; i < kScanRows; ++i) {
      const int64_t row = first_row + i;
      if (slot_count[i] != 1 || row >= p.num_rows) continue;
      write_single_slot_row<T, W>(p, row, col, p.scale * w[i], g[i]);
    }
  }
  // Zeros, or the ordered sum over the slots that share the row (rare: scan the map).
#pragma unroll 1
  for (int i = 0; i < kScanRows; ++i) {
    const int64_t row = first_row + i;
    if (slot_count[i] == 1 || row >= p.num_rows) continue;
    const int from = slot_count[i] > 1 ? first_slot[i] : num_slots;
    write_row_sum<T, W>(p, row, col, [&](auto add) { for_each_slot_of_row(p, row, from, add); });
  }
}

// The scanning plan: block (group of kScanRows rows, column slice). Each thread reads its share
// of the map at once (loads clamped to a real slot, none behind a per-thread branch);
// shared-memory atomics record, per row of the group, its first slot and how many point at it
// (both independent of the order the atomics land in).
template <typename T, int VEC, bool kCommonSlots>
__global__ void __launch_bounds__(kRowThreads) grad_input_scan(const FinalizeProblem p) {
  __shared__ int32_t first_slot[kScanRows];
  __shared__ int32_t slot_count[kScanRows];
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kScanRows;
  const int64_t unit = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int num_slots = static_cast<int>(p.num_tokens * p.top_k);  // <= kScanMaxSlots
  const int top_k = static_cast<int>(p.top_k);
  if (threadIdx.x < kScanRows) {
    first_slot[threadIdx.x] = num_slots;
    slot_count[threadIdx.x] = 0;
  }
  wait_for_upstream();
  let_downstream_launch();
  int64_t rows[kScanSlotsPerThread];
  if (num_slots > 0) {
#pragma unroll
    for (int i = 0; i < kScanSlotsPerThread; ++i) {
      const int slot = min(i * kRowThreads + static_cast<int>(threadIdx.x), num_slots - 1);
      rows[i] = load_row<kCommonSlots>(p, slot / top_k, slot % top_k);
    }
  }
  __syncthreads();  // the counters are initialised
#pragma unroll
  for (int i = 0; i < kScanSlotsPerThread; ++i) {
    const int slot = i * kRowThreads + static_cast<int>(threadIdx.x);
    if (slot >= num_slots || rows[i] < first_row || rows[i] >= first_row + kScanRows) continue;
    atomicMin(&first_slot[rows[i] - first_row], slot);
    atomicAdd(&slot_count[rows[i] - first_row], 1);
  }
  __syncthreads();
  const int64_t body = p.hidden / VEC;
  if (unit < body) {
    write_scanned_rows<T, VEC, kCommonSlots>(p, first_row, unit * VEC, first_slot, slot_count);
  } else if (unit < body + p.hidden % VEC) {
    write_scanned_rows<T, 1, kCommonSlots>(p, first_row, body * VEC + (unit - body), first_slot,
                                           slot_count);
  }
}

// Slot (t, k) as the token blocks need it: its row where that row is the slot's alone
// (count 1), else -1, and scale * w.
struct OwnedSlot {
  int64_t row = -1;
  float w = 0.0f;
  __device__ __forceinline__ OwnedSlot from_lane(int src) const {
    return {__shfl_sync(0xffffffffu, row, src), __shfl_sync(0xffffffffu, w, src)};
  }
};

__device__ __forceinline__ OwnedSlot read_owned_slot(const FinalizeProblem& p, int64_t t,
                                                     int64_t k, const int32_t* count) {
  const int64_t row = load_row(p, t, k);
  const float w = p.scale * load_weight(p, t, k);
  const bool owned = row >= 0 && row < p.num_rows && count[row] == 1;
  return {owned ? row : -1, w};
}

// grad_input[row, col..col+W) = scale * w[t, k] * grad_out[t, col..col+W) for every slot (t, k)
// that owns its row.
template <typename T, int W>
__device__ __forceinline__ void write_owned_rows(const FinalizeProblem& p, const Pack<T, W>& g,
                                                 int64_t col, const OwnedSlot* slots, int n) {
  for (int u = 0; u < n; ++u) {
    if (slots[u].row >= 0) write_single_slot_row<T, W>(p, slots[u].row, col, slots[u].w, g);
  }
}

// Token t's rows that its slots own: grad_out[t] is read once for all K slots. The warp reads
// the slots together (for_each_slot_batch), so the map and count loads are one round trip each.
template <typename T, int VEC>
__device__ __forceinline__ void write_token_rows(const FinalizeProblem& p, int64_t t,
                                                 int64_t unit, const int32_t* count) {
  const int64_t body = p.hidden / VEC;
  const bool is_vector = unit < body;
  const bool is_tail = !is_vector && unit < body + p.hidden % VEC;
  const int64_t col = is_vector ? unit * VEC : body * VEC + (unit - body);
  const T* grad_row = static_cast<const T*>(p.residual) + t * p.residual_row_stride + col;
  Pack<T, VEC> g{};
  Pack<T, 1> g1{};
  if (is_vector) g = *reinterpret_cast<const Pack<T, VEC>*>(grad_row);
  if (is_tail) g1.v[0] = *grad_row;
  // Every lane takes part in the slot reads (warp shuffles); only column owners write.
  for_each_slot_batch<kMaxSlotsPerBatch, OwnedSlot>(
      p.top_k, [&](int64_t k) { return read_owned_slot(p, t, k, count); },
      [&](const OwnedSlot* slots, int n) {
        if (is_vector) {
          write_owned_rows<T, VEC>(p, g, col, slots, n);
        } else if (is_tail) {
          write_owned_rows<T, 1>(p, g1, col, slots, n);
        }
      });
}

// The counting plan's second kernel, block (x, column slice). Blocks x < row_blocks each take
// kRowThreads consecutive rows and write those whose count is not 1 (read coalesced, gathered
// in order); the rest take token x - row_blocks. The two sets of rows are disjoint.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads, (counted_min_blocks<T, VEC>()))
    grad_input_counted(const FinalizeProblem p, const int32_t* count, int64_t row_blocks) {
  __shared__ int32_t odd_rows[kRowThreads];
  __shared__ int32_t warp_totals[kRowThreads / 32];
  const int64_t unit = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  wait_for_upstream();
  let_downstream_launch();
  if (blockIdx.x >= row_blocks) {
    write_token_rows<T, VEC>(p, blockIdx.x - row_blocks, unit, count);
    return;
  }
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kRowThreads;
  const int64_t my_row = first_row + threadIdx.x;
  const bool odd = my_row < p.num_rows && count[my_row] != 1;
  const int n = compact_in_order(odd, static_cast<int32_t>(threadIdx.x), odd_rows, warp_totals);
  for (int i = 0; i < n; ++i) {
    const int64_t row = first_row + odd_rows[i];
    const bool shared = count[row] > 1;  // else no slot points at it: zeros
    write_row_columns<T, VEC>(p, row, unit, [&](auto add) {
      if (shared) for_each_slot_of_row(p, row, int64_t{0}, add);
    });
  }
}

template <typename T, int W>
__device__ __forceinline__ float dot_cols(const T* a, const T* b, int64_t begin, int64_t end,
                                          int stride) {
  float acc = 0.0f;
  for (int64_t col = begin; col + W <= end; col += stride) {
    const Pack<T, W> x = *reinterpret_cast<const Pack<T, W>*>(a + col);
    const Pack<T, W> y = *reinterpret_cast<const Pack<T, W>*>(b + col);
#pragma unroll
    for (int e = 0; e < W; ++e) acc = fmaf(Elem<T>::load(x.v[e]), Elem<T>::load(y.v[e]), acc);
  }
  return acc;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    grad_weight_slots(const FinalizeProblem p, float* grad_weights) {
  wait_for_upstream();
  let_downstream_launch();
  const int lane = threadIdx.x % 32;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (slot >= p.num_tokens * p.top_k) return;
  const int64_t t = slot / p.top_k;
  const int64_t row = load_row(p, t, slot % p.top_k);
  float acc = 0.0f;
  if (row >= 0 && row < p.num_rows) {
    const T* x = static_cast<const T*>(p.input) + row * p.input_row_stride;
    const T* g = static_cast<const T*>(p.residual) + t * p.residual_row_stride;
    const int64_t body = p.hidden / VEC * VEC;
    acc = dot_cols<T, VEC>(x, g, lane * VEC, body, 32 * VEC);
    acc += dot_cols<T, 1>(x, g, body + lane, p.hidden, 32);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) grad_weights[slot] = p.scale * acc;
}

template <typename T>
void launch_grad_input(const FinalizeProblem& p, int32_t* count, int device) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = aligned(p.out, p.out_row_stride, kVec, sizeof(T)) &&
                   aligned(p.residual, p.residual_row_stride, kVec, sizeof(T));
  const int64_t units = vec ? p.hidden / kVec + p.hidden % kVec : p.hidden;
  const unsigned col_blocks = static_cast<unsigned>((units + kRowThreads - 1) / kRowThreads);
  const int64_t slots = p.num_tokens * p.top_k;
  const int64_t row_blocks = (p.num_rows + kRowThreads - 1) / kRowThreads;
  const int sm_count = device_info(device).sm_count;
  auto launch = [&](auto vec_elems) {
    constexpr int kW = decltype(vec_elems)::value;
    if (scans_map(p)) {
      const int64_t groups = (p.num_rows + kScanRows - 1) / kScanRows;
      with_slot_format<true>(p, [&](auto common_slots) {
        launch_kernel(grad_input_scan<T, kW, decltype(common_slots)::value>,
                      dim3(static_cast<unsigned>(groups), col_blocks), dim3(kRowThreads), device,
                      p);
      });
      return;
    }
    const int64_t zero_blocks = std::min<int64_t>((p.num_rows + 255) / 256, 4LL * sm_count);
    launch_kernel(zero_counts, dim3(static_cast<unsigned>(zero_blocks)), dim3(256), device, count,
                  p.num_rows);
    launch_kernel(count_row_slots, dim3(static_cast<unsigned>((slots + 255) / 256)), dim3(256),
                  device, p, count);
    const dim3 grid(static_cast<unsigned>(row_blocks + p.num_tokens), col_blocks);
    launch_kernel(grad_input_counted<T, kW>, grid, dim3(kRowThreads), device, p,
                  static_cast<const int32_t*>(count), row_blocks);
  };
  if (vec) {
    launch(std::integral_constant<int, kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

template <typename T>
void launch_grad_weights(const FinalizeProblem& p, float* grad_weights, int device) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t slots = p.num_tokens * p.top_k;
  const dim3 grid(static_cast<unsigned>((slots + kWarpsPerBlock - 1) / kWarpsPerBlock));
  if (aligned(p.input, p.input_row_stride, kVec, sizeof(T)) &&
      aligned(p.residual, p.residual_row_stride, kVec, sizeof(T))) {
    launch_kernel(grad_weight_slots<T, kVec>, grid, dim3(kWarpsPerBlock * 32), device, p,
                  grad_weights);
  } else {
    launch_kernel(grad_weight_slots<T, 1>, grid, dim3(kWarpsPerBlock * 32), device, p,
                  grad_weights);
  }
}

}  // namespace

bool grad_input_counts_slots(const FinalizeProblem& p) { return !scans_map(p); }

void launch_grad_input_cuda(const FinalizeProblem& p, int32_t* count, int device_index) {
  DeviceScope scope(device_index);
  STD_TORCH_CHECK(p.num_rows <= 0x7fffffffLL, "finalize backward: too many input rows");
  switch (p.input_dtype) {
    case ScalarType::BFloat16: launch_grad_input<__nv_bfloat16>(p, count, device_index); break;
    case ScalarType::Half: launch_grad_input<__half>(p, count, device_index); break;
    default: launch_grad_input<float>(p, count, device_index); break;
  }
}

void launch_grad_weights_cuda(const FinalizeProblem& p, float* grad_weights, int device_index) {
  DeviceScope scope(device_index);
  switch (p.input_dtype) {
    case ScalarType::BFloat16: launch_grad_weights<__nv_bfloat16>(p, grad_weights, device_index); break;
    case ScalarType::Half: launch_grad_weights<__half>(p, grad_weights, device_index); break;
    default: launch_grad_weights<float>(p, grad_weights, device_index); break;
  }
}

}  // namespace moe_finalize
