// CUDA finalize, two kernels with the same arithmetic. Both: one block per (token, column
// slice), every thread owns one 16-byte column vector, keeps up to 8 source rows in flight and
// accumulates them in fp32 in fixed k-order; columns past the last full vector take a scalar
// tail path with the same arithmetic. finalize_kernel (larger grids) stages the token's row
// offsets and weights in shared memory, 64 slots at a time, so index arithmetic happens once per
// block; finalize_direct_kernel (small grids, latency-bound) lets every thread read them itself,
// with no barrier before the row loads. Every output element is computed identically whatever
// the kernel or launch shape (batch invariance).
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

constexpr int kSlotChunk = 64;    // slots staged in shared memory per pass
constexpr int kMaxThreads = 256;  // launch bound (pick_threads uses at most 128; measured so)
#ifndef MF_DIRECT_UNITS_PER_SM
#define MF_DIRECT_UNITS_PER_SM 256
#endif
// Grids with fewer 16-byte units than this per SM take the barrier-free small-grid kernel
// (measured on H100, K=8 H=4096: it wins at T <= 16, loses from T = 128).
constexpr int64_t kDirectUnitsPerSm = MF_DIRECT_UNITS_PER_SM;

// ---- the kernel ----------------------------------------------------------------------------

struct KernelArgs {
  FinalizeProblem p;
  int64_t body_units;  // H / VEC full vectors per row
  int64_t units;       // body_units + H % VEC scalar tail columns
};

// acc[0..W) += w[j] * row_j[col..col+W) for the n staged slots, G rows in flight at a time.
template <typename T, int W, int G>
__device__ __forceinline__ int accumulate_group(float* acc, const T* col_ptr, const int64_t* s_off,
                                                const float* s_w, int j, int n) {
  for (; j + G <= n; j += G) {
    Pack<T, W> rows[G];
#pragma unroll
    for (int u = 0; u < G; ++u) {
      const int64_t off = s_off[j + u];
      if (off >= 0) {
        rows[u] = load_stream<T, W>(col_ptr + off);
      } else {
#pragma unroll
        for (int e = 0; e < W; ++e) rows[u].v[e] = Elem<T>::store(0.0f);
      }
    }
#pragma unroll
    for (int u = 0; u < G; ++u) {
      const float w = s_w[j + u];
#pragma unroll
      for (int e = 0; e < W; ++e) acc[e] = fmaf(w, Elem<T>::load(rows[u].v[e]), acc[e]);
    }
  }
  return j;
}

template <typename T, int W>
__device__ __forceinline__ void accumulate_slots(float* acc, const T* col_ptr, const int64_t* s_off,
                                                 const float* s_w, int n) {
  int j = accumulate_group<T, W, 8>(acc, col_ptr, s_off, s_w, 0, n);
  j = accumulate_group<T, W, 4>(acc, col_ptr, s_off, s_w, j, n);
  j = accumulate_group<T, W, 2>(acc, col_ptr, s_off, s_w, j, n);
  accumulate_group<T, W, 1>(acc, col_ptr, s_off, s_w, j, n);
}

template <typename T, int W>
__device__ __forceinline__ void store_result(const FinalizeProblem& p, int64_t t, int64_t col,
                                             const float* acc) {
  Pack<T, W> result;
  if (p.residual != nullptr) {
    // Plain (coherent) load: residual may be `out` itself.
    const Pack<T, W> res = *reinterpret_cast<const Pack<T, W>*>(
        static_cast<const T*>(p.residual) + t * p.residual_row_stride + col);
#pragma unroll
    for (int e = 0; e < W; ++e)
      result.v[e] = Elem<T>::store(fmaf(p.scale, acc[e], Elem<T>::load(res.v[e])));
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) result.v[e] = Elem<T>::store(p.scale * acc[e]);
  }
  *reinterpret_cast<Pack<T, W>*>(static_cast<T*>(p.out) + t * p.out_row_stride + col) = result;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    finalize_kernel(const __grid_constant__ KernelArgs args) {
  __shared__ int64_t s_off[kSlotChunk];  // element offset of the source row, -1 = skip
  __shared__ float s_w[kSlotChunk];
  const FinalizeProblem& p = args.p;
  const int64_t t = blockIdx.x;
  const int64_t unit = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const bool is_vector = unit < args.body_units;
  const int64_t col = is_vector ? unit * VEC : args.body_units * VEC + (unit - args.body_units);
  const T* col_ptr = static_cast<const T*>(p.input) + col;

  wait_for_upstream();  // input, map, weights and residual may come from the previous kernel
  let_downstream_launch();

  float acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;

  for (int64_t k0 = 0; k0 < p.top_k; k0 += kSlotChunk) {
    const int n = p.top_k - k0 < kSlotChunk ? static_cast<int>(p.top_k - k0) : kSlotChunk;
    if (k0 > 0) __syncthreads();  // previous chunk fully consumed
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const int64_t row = load_row(p, t, k0 + i);
      const bool valid = row >= 0 && row < p.num_rows;  // never read outside input
      s_off[i] = valid ? row * p.input_row_stride : -1;
      s_w[i] = valid ? load_weight(p, t, k0 + i) : 0.0f;
    }
    __syncthreads();
    if (is_vector) {
      accumulate_slots<T, VEC>(acc, col_ptr, s_off, s_w, n);
    } else if (unit < args.units) {
      accumulate_slots<T, 1>(acc, col_ptr, s_off, s_w, n);
    }
  }

  if (is_vector) {
    store_result<T, VEC>(p, t, col, acc);
  } else if (unit < args.units) {
    store_result<T, 1>(p, t, col, acc);
  }
}

// ---- the small-grid kernel ------------------------------------------------------------------
// At small T the time is a chain of dependent memory round trips, and the staging barrier above
// adds to it. Here every thread reads the slot metadata itself (a warp-wide broadcast load,
// L1-resident after the first warp) and issues its row loads straight after: no barrier. Same
// arithmetic in the same k-order as finalize_kernel, so results are bitwise identical.

__device__ __forceinline__ void load_slot(const FinalizeProblem& p, int64_t t, int64_t k,
                                          int64_t& offset, float& weight) {
  const int64_t row = load_row(p, t, k);
  const bool valid = row >= 0 && row < p.num_rows;  // never read outside input
  offset = valid ? row * p.input_row_stride : -1;
  weight = valid ? load_weight(p, t, k) : 0.0f;
}

template <typename T, int W, int G>
__device__ __forceinline__ int64_t accumulate_group_direct(float* acc, const FinalizeProblem& p,
                                                           int64_t t, const T* col_ptr, int64_t j) {
  for (; j + G <= p.top_k; j += G) {
    int64_t off[G];
    float w[G];
#pragma unroll
    for (int u = 0; u < G; ++u) load_slot(p, t, j + u, off[u], w[u]);
    Pack<T, W> rows[G];
#pragma unroll
    for (int u = 0; u < G; ++u) {
      if (off[u] >= 0) {
        rows[u] = load_stream<T, W>(col_ptr + off[u]);
      } else {
#pragma unroll
        for (int e = 0; e < W; ++e) rows[u].v[e] = Elem<T>::store(0.0f);
      }
    }
#pragma unroll
    for (int u = 0; u < G; ++u) {
#pragma unroll
      for (int e = 0; e < W; ++e) acc[e] = fmaf(w[u], Elem<T>::load(rows[u].v[e]), acc[e]);
    }
  }
  return j;
}

template <typename T, int W>
__device__ __forceinline__ void finalize_cols_direct(const FinalizeProblem& p, int64_t t,
                                                     int64_t col) {
  const T* col_ptr = static_cast<const T*>(p.input) + col;
  float acc[W];
#pragma unroll
  for (int e = 0; e < W; ++e) acc[e] = 0.0f;
  int64_t j = accumulate_group_direct<T, W, 8>(acc, p, t, col_ptr, 0);
  j = accumulate_group_direct<T, W, 4>(acc, p, t, col_ptr, j);
  j = accumulate_group_direct<T, W, 2>(acc, p, t, col_ptr, j);
  accumulate_group_direct<T, W, 1>(acc, p, t, col_ptr, j);
  store_result<T, W>(p, t, col, acc);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    finalize_direct_kernel(const __grid_constant__ KernelArgs args) {
  const int64_t t = blockIdx.x;
  const int64_t unit = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  wait_for_upstream();
  let_downstream_launch();
  if (unit < args.body_units) {
    finalize_cols_direct<T, VEC>(args.p, t, unit * VEC);
  } else if (unit < args.units) {
    finalize_cols_direct<T, 1>(args.p, t, args.body_units * VEC + (unit - args.body_units));
  }
}

// ---- host side -----------------------------------------------------------------------------

template <typename T, int VEC>
void launch_typed(const FinalizeProblem& p, int device) {
  const DeviceInfo& info = device_info(device);
  KernelArgs args{p, p.hidden / VEC, p.hidden / VEC + p.hidden % VEC};
  const int threads = pick_threads(p.num_tokens, args.units, info.sm_count);
  const int64_t col_blocks = (args.units + threads - 1) / threads;
  STD_TORCH_CHECK(col_blocks <= 65535, "finalize: hidden size ", p.hidden, " is too large");

  const dim3 grid(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(col_blocks));
  if (p.num_tokens * args.units < kDirectUnitsPerSm * info.sm_count) {
    launch_kernel(finalize_direct_kernel<T, VEC>, grid, dim3(threads), device, args);
  } else {
    launch_kernel(finalize_kernel<T, VEC>, grid, dim3(threads), device, args);
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
