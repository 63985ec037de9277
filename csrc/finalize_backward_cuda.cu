// CUDA backward of finalize, deterministic and without floating-point atomics.
//
// grad_input: a counting pass records, for every input row, how many valid slots point at it
// and one such slot; a row-parallel pass then writes each row once: zeros (no slot),
// scale * w * grad_out[t] (one slot, the MoE case: the map is a permutation), or, for rows that
// several slots share, the fp32 sum over those slots in (t, k) order (found by scanning the map:
// slow, but duplicates are rare and the result stays bitwise reproducible).
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

__global__ void count_row_slots(const FinalizeProblem p, int32_t* count, int64_t* owner) {
  wait_for_upstream();
  let_downstream_launch();
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (slot >= p.num_tokens * p.top_k) return;
  const int64_t row = load_row(p, slot / p.top_k, slot % p.top_k);
  if (row < 0 || row >= p.num_rows) return;
  atomicAdd(count + row, 1);
  owner[row] = slot;  // exact whenever count ends at 1, the only case that reads it
}

// grad_input[row, col..col+W) for one row; `p.residual` holds grad_out, `p.out` grad_input.
template <typename T, int W>
__device__ __forceinline__ void grad_row_cols(const FinalizeProblem& p, int64_t row, int64_t col,
                                              int32_t count, int64_t owner) {
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
  if (count == 1) {
    add_slot(owner);
  } else if (count > 1) {
    for (int64_t slot = 0; slot < p.num_tokens * p.top_k; ++slot) {
      if (load_row(p, slot / p.top_k, slot % p.top_k) == row) add_slot(slot);
    }
  }
  Pack<T, W> result;
#pragma unroll
  for (int e = 0; e < W; ++e) result.v[e] = Elem<T>::store(acc[e]);
  *reinterpret_cast<Pack<T, W>*>(static_cast<T*>(p.out) + row * p.out_row_stride + col) = result;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    grad_input_rows(const FinalizeProblem p, const int32_t* count, const int64_t* owner) {
  wait_for_upstream();
  let_downstream_launch();
  const int64_t row = blockIdx.x;
  const int64_t unit = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t body = p.hidden / VEC;
  const int32_t c = count[row];
  const int64_t o = c == 1 ? owner[row] : -1;
  if (unit < body) {
    grad_row_cols<T, VEC>(p, row, unit * VEC, c, o);
  } else if (unit < body + p.hidden % VEC) {
    grad_row_cols<T, 1>(p, row, body * VEC + (unit - body), c, o);
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

bool aligned_rows(const void* ptr, int64_t row_stride, int vec, size_t elem_size) {
  return reinterpret_cast<uintptr_t>(ptr) % (vec * elem_size) == 0 && row_stride % vec == 0;
}

template <typename T>
void launch_grad_input(const FinalizeProblem& p, int32_t* count, int64_t* owner, int device) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t slots = p.num_tokens * p.top_k;
  if (slots > 0) {
    launch_kernel(count_row_slots, dim3(static_cast<unsigned>((slots + 255) / 256)), dim3(256),
                  device, p, count, owner);
  }
  const bool vec = aligned_rows(p.out, p.out_row_stride, kVec, sizeof(T)) &&
                   aligned_rows(p.residual, p.residual_row_stride, kVec, sizeof(T));
  const int64_t units = vec ? p.hidden / kVec + p.hidden % kVec : p.hidden;
  const dim3 grid(static_cast<unsigned>(p.num_rows),
                  static_cast<unsigned>((units + kRowThreads - 1) / kRowThreads));
  if (vec) {
    launch_kernel(grad_input_rows<T, kVec>, grid, dim3(kRowThreads), device, p,
                  static_cast<const int32_t*>(count), static_cast<const int64_t*>(owner));
  } else {
    launch_kernel(grad_input_rows<T, 1>, grid, dim3(kRowThreads), device, p,
                  static_cast<const int32_t*>(count), static_cast<const int64_t*>(owner));
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

void launch_grad_input_cuda(const FinalizeProblem& p, int32_t* count, int64_t* owner,
                            int device_index) {
  DeviceScope scope(device_index);
  STD_TORCH_CHECK(p.num_rows <= 0x7fffffffLL, "finalize backward: too many input rows");
  switch (p.input_dtype) {
    case ScalarType::BFloat16: launch_grad_input<__nv_bfloat16>(p, count, owner, device_index); break;
    case ScalarType::Half: launch_grad_input<__half>(p, count, owner, device_index); break;
    default: launch_grad_input<float>(p, count, owner, device_index); break;
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
