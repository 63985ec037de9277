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

struct KernelArgs {
  FinalizeProblem p;
  int64_t body_units;  // H / VEC full vectors per row
  int64_t units;       // body_units + H % VEC scalar tail columns
};

// Slot (t, k): the source row's element offset (-1: skip it) and its weight. The weight is read
// whatever the map holds ((t, k) is always in bounds), so its load overlaps the map load
// instead of waiting for it: one dependent memory round trip less at small T.
__device__ __forceinline__ void load_slot(const FinalizeProblem& p, int64_t t, int64_t k,
                                          int64_t& offset, float& weight) {
  const int64_t row = load_row(p, t, k);
  const float w = load_weight(p, t, k);
  const bool valid = row >= 0 && row < p.num_rows;  // never read outside input
  offset = valid ? row * p.input_row_stride : -1;
  weight = valid ? w : 0.0f;
}

// acc[0..W) += w[u] * row_u[col..col+W) for the first `count` of G slots, in order. Every row
// is loaded before any is consumed (G rows in flight per thread).
template <typename T, int W, int G>
__device__ __forceinline__ void accumulate_rows(float* acc, const T* col_ptr, const int64_t* off,
                                                const float* w, int count) {
  Pack<T, W> rows[G];  // a skipped slot (off < 0) reads as zeros, weight 0
#pragma unroll
  for (int u = 0; u < G; ++u)
    rows[u] = load_stream<T, W>(col_ptr + off[u], u < count && off[u] >= 0);
#pragma unroll
  for (int u = 0; u < G; ++u) {
    if (u < count) {
#pragma unroll
      for (int e = 0; e < W; ++e) acc[e] = fmaf(w[u], Elem<T>::load(rows[u].v[e]), acc[e]);
    }
  }
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

// This thread's columns: one 16-byte vector, or one scalar tail column past the last vector.
struct Columns {
  int64_t col;
  bool is_vector, is_tail;
};

__device__ __forceinline__ Columns my_columns(const KernelArgs& args, int vec) {
  const int64_t unit = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  Columns c;
  c.is_vector = unit < args.body_units;
  c.is_tail = !c.is_vector && unit < args.units;
  c.col = c.is_vector ? unit * vec : args.body_units * vec + (unit - args.body_units);
  return c;
}

template <typename T, int VEC, int G>
__device__ __forceinline__ void accumulate_columns(float* acc, const FinalizeProblem& p,
                                                   const Columns& c, const int64_t* off,
                                                   const float* w, int count) {
  const T* col_ptr = static_cast<const T*>(p.input) + c.col;
  if (c.is_vector) {
    accumulate_rows<T, VEC, G>(acc, col_ptr, off, w, count);
  } else if (c.is_tail) {
    accumulate_rows<T, 1, G>(acc, col_ptr, off, w, count);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_columns(const FinalizeProblem& p, int64_t t,
                                              const Columns& c, const float* acc) {
  if (c.is_vector) {
    store_result<T, VEC>(p, t, c.col, acc);
  } else if (c.is_tail) {
    store_result<T, 1>(p, t, c.col, acc);
  }
}

// G: rows in flight per thread, K rounded up to 2, 4 or 8: a smaller G needs fewer registers,
// so small-K models (Mixtral, K=2) keep more warps, and bytes, in flight per SM.
template <typename T, int VEC, int G>
__global__ void __launch_bounds__(kMaxThreads, G == 2 ? 8 : 1)  // G=2: 32 registers, full SM
    finalize_kernel(const __grid_constant__ KernelArgs args) {
  const FinalizeProblem& p = args.p;
  const int64_t t = blockIdx.x;
  const Columns c = my_columns(args, VEC);
  const int lane = threadIdx.x % 32;
  wait_for_upstream();  // input, map, weights and residual may come from the previous kernel
  let_downstream_launch();

  float acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
  for (int64_t k0 = 0; k0 < p.top_k; k0 += 32) {
    const int n = p.top_k - k0 < 32 ? static_cast<int>(p.top_k - k0) : 32;
    int64_t my_off = -1;
    float my_w = 0.0f;
    if (lane < n) load_slot(p, t, k0 + lane, my_off, my_w);
    for (int j = 0; j < n; j += G) {  // n and j are warp-uniform: every lane shuffles
      const int count = n - j < G ? n - j : G;
      int64_t off[G];
      float w[G];
#pragma unroll
      for (int u = 0; u < G; ++u) {
        off[u] = __shfl_sync(0xffffffffu, my_off, (j + u) % 32);
        w[u] = __shfl_sync(0xffffffffu, my_w, (j + u) % 32);
      }
      accumulate_columns<T, VEC, G>(acc, p, c, off, w, count);
    }
  }
  store_columns<T, VEC>(p, t, c, acc);
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
  if (p.top_k <= 2) {
    launch_kernel(finalize_kernel<T, VEC, 2>, grid, dim3(threads), device, args);
  } else if (p.top_k <= 4) {
    launch_kernel(finalize_kernel<T, VEC, 4>, grid, dim3(threads), device, args);
  } else {
    launch_kernel(finalize_kernel<T, VEC, 8>, grid, dim3(threads), device, args);
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
