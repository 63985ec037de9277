// CUDA backward of finalize, deterministic and without floating-point atomics.
//
// grad_input: a counting pass records, for every input row, how many valid slots point at it.
// A token-parallel pass then reads each grad_out[t] once and writes scale * w * grad_out[t] to
// every row only its slot (t, k) points at (the MoE case: the map is a permutation). A
// row-parallel pass writes the other rows: zeros (no slot) or, for rows that several slots
// share, the fp32 sum over those slots in (t, k) order (found by scanning the map: slow, but
// duplicates are rare and the result stays bitwise reproducible). Reading grad_out row-major
// instead (one pass over rows) re-read each grad_out row K times from DRAM: 55% of the copy
// floor at K=8 on H100 (benchmarks/bench_backward.py).
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
constexpr int kMaxSlotsPerBatch = 8;  // grad_input_tokens: slots shuffled to the warp at a time

__global__ void count_row_slots(const FinalizeProblem p, int32_t* count) {
  wait_for_upstream();
  let_downstream_launch();
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (slot >= p.num_tokens * p.top_k) return;
  const int64_t row = load_row(p, slot / p.top_k, slot % p.top_k);
  if (row < 0 || row >= p.num_rows) return;
  atomicAdd(count + row, 1);
}

// grad_input[row, col..col+W) for one row; `p.residual` holds grad_out, `p.out` grad_input.
template <typename T, int W>
__device__ __forceinline__ void grad_row_cols(const FinalizeProblem& p, int64_t row, int64_t col,
                                              int32_t count) {
  const T* grad_out = static_cast<const T*>(p.residual);
  float acc[W];
#pragma unroll
  for (int e = 0; e < W; ++e) acc[e] = 0.0f;
  auto add_slot = [&](int64_t slot) {
    const int64_t t = slot / p.top_k;
    const float w = p.scale * load_weight(p, t, slot % p.top_k);
    const Pack<T, W> g =
        *reinterpret_cast<const Pack<T, W>*>(grad_out + t * p.residual_row_stride + col);
#pragma unroll
    for (int e = 0; e < W; ++e) acc[e] = fmaf(w, Elem<T>::load(g.v[e]), acc[e]);
  };
  if (count > 1) {
    for (int64_t slot = 0; slot < p.num_tokens * p.top_k; ++slot) {
      if (load_row(p, slot / p.top_k, slot % p.top_k) == row) add_slot(slot);
    }
  }
  Pack<T, W> result;
#pragma unroll
  for (int e = 0; e < W; ++e) result.v[e] = Elem<T>::store(acc[e]);
  *reinterpret_cast<Pack<T, W>*>(static_cast<T*>(p.out) + row * p.out_row_stride + col) = result;
}

// Rows that no slot or several slots point at (count != 1); the rest are grad_input_tokens'.
// A grid-stride loop over rows: most rows are skipped, so few blocks do.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    grad_input_rows(const FinalizeProblem p, const int32_t* count) {
  wait_for_upstream();
  let_downstream_launch();
  const int64_t unit = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t body = p.hidden / VEC;
  for (int64_t row = blockIdx.x; row < p.num_rows; row += gridDim.x) {
    const int32_t c = count[row];
    if (c == 1) continue;
    if (unit < body) {
      grad_row_cols<T, VEC>(p, row, unit * VEC, c);
    } else if (unit < body + p.hidden % VEC) {
      grad_row_cols<T, 1>(p, row, body * VEC + (unit - body), c);
    }
  }
}

// Slot (t, k) as grad_input_tokens needs it: its row where that row is the slot's alone
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
// that owns its row; grad_out[t] is read once for all K slots. The warp reads the slots
// together (for_each_slot_batch), so the map and count loads are one round trip each.
template <typename T, int W>
__device__ __forceinline__ void write_owned_rows(const FinalizeProblem& p, const Pack<T, W>& g,
                                                 int64_t col, const OwnedSlot* slots, int n) {
  for (int u = 0; u < n; ++u) {
    if (slots[u].row < 0) continue;
    Pack<T, W> result;
#pragma unroll
    for (int e = 0; e < W; ++e) {
      result.v[e] = Elem<T>::store(fmaf(slots[u].w, Elem<T>::load(g.v[e]), 0.0f));
    }
    *reinterpret_cast<Pack<T, W>*>(static_cast<T*>(p.out) + slots[u].row * p.out_row_stride +
                                   col) = result;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    grad_input_tokens(const FinalizeProblem p, const int32_t* count) {
  wait_for_upstream();
  let_downstream_launch();
  const int64_t t = blockIdx.x;
  const int64_t unit = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
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

bool aligned_rows(const void* ptr, int64_t row_stride, int vec, size_t elem_size) {
  return reinterpret_cast<uintptr_t>(ptr) % (vec * elem_size) == 0 && row_stride % vec == 0;
}

template <typename T>
void launch_grad_input(const FinalizeProblem& p, int32_t* count, int device) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t slots = p.num_tokens * p.top_k;
  if (slots > 0) {
    launch_kernel(count_row_slots, dim3(static_cast<unsigned>((slots + 255) / 256)), dim3(256),
                  device, p, count);
  }
  const bool vec = aligned_rows(p.out, p.out_row_stride, kVec, sizeof(T)) &&
                   aligned_rows(p.residual, p.residual_row_stride, kVec, sizeof(T));
  const int64_t units = vec ? p.hidden / kVec + p.hidden % kVec : p.hidden;
  const unsigned col_blocks = static_cast<unsigned>((units + kRowThreads - 1) / kRowThreads);
  // Enough blocks to fill the card for the few rows grad_input_rows writes.
  const int64_t row_blocks = std::min<int64_t>(p.num_rows, 16LL * device_info(device).sm_count);
  const dim3 token_grid(static_cast<unsigned>(p.num_tokens), col_blocks);
  const dim3 row_grid(static_cast<unsigned>(row_blocks), col_blocks);
  const int32_t* counts = count;
  auto launch = [&](auto vec_elems) {
    constexpr int kW = decltype(vec_elems)::value;
    if (p.num_tokens > 0) {
      launch_kernel(grad_input_tokens<T, kW>, token_grid, dim3(kRowThreads), device, p, counts);
    }
    launch_kernel(grad_input_rows<T, kW>, row_grid, dim3(kRowThreads), device, p, counts);
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
  if (aligned_rows(p.input, p.input_row_stride, kVec, sizeof(T)) &&
      aligned_rows(p.residual, p.residual_row_stride, kVec, sizeof(T))) {
    launch_kernel(grad_weight_slots<T, kVec>, grid, dim3(kWarpsPerBlock * 32), device, p,
                  grad_weights);
  } else {
    launch_kernel(grad_weight_slots<T, 1>, grid, dim3(kWarpsPerBlock * 32), device, p,
                  grad_weights);
  }
}

}  // namespace

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
