// Device helpers shared by the forward and backward CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
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

// Source rows are read exactly once: bypass L1 and the coherent path (16-byte ld.global.nc).
// Where !valid nothing is read and the pack is zero. One predicated instruction, no branch:
// with a branch per row the compiler consumed each row inside its branch, which serialised the
// loads of a batch (measured 1.8x slower on H100).
template <typename T, int W>
__device__ __forceinline__ Pack<T, W> load_stream(const T* ptr, bool valid) {
  Pack<T, W> out;
  if constexpr (sizeof(Pack<T, W>) == 16) {
    uint4 raw;
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "setp.ne.b32 p, %5, 0;\n\t"
        "mov.b32 %0, 0;\n\tmov.b32 %1, 0;\n\tmov.b32 %2, 0;\n\tmov.b32 %3, 0;\n\t"
        "@p ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n\t}"
        : "=r"(raw.x), "=r"(raw.y), "=r"(raw.z), "=r"(raw.w)
        : "l"(ptr), "r"(static_cast<int>(valid)));
    memcpy(&out, &raw, sizeof raw);
  } else {
    memset(&out, 0, sizeof out);
    if (valid) out = *reinterpret_cast<const Pack<T, W>*>(ptr);
  }
  return out;
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

__device__ __forceinline__ float load_weight(const FinalizeProblem& p, int64_t t, int64_t k) {
  if (p.weights == nullptr) return 1.0f;
  const int64_t offset = t * p.weight_stride_t + k * p.weight_stride_k;
  switch (p.weight_dtype) {
    case ScalarType::Float: return static_cast<const float*>(p.weights)[offset];
    case ScalarType::BFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p.weights)[offset]);
    default: return __half2float(static_cast<const __half*>(p.weights)[offset]);
  }
}

__device__ __forceinline__ int64_t load_row(const FinalizeProblem& p, int64_t t, int64_t k) {
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
inline int pick_threads(int64_t num_tokens, int64_t units, int sm_count) {
  const int64_t target_blocks = 2LL * sm_count;
  int64_t threads = (num_tokens * units + target_blocks - 1) / target_blocks;
  threads = std::max<int64_t>(32, std::min<int64_t>(128, threads));
  threads = std::min<int64_t>(threads, ((units + 31) / 32) * 32);
  return static_cast<int>((threads + 31) / 32 * 32);
}

// Launches on the current stream of `device`, as a programmatic dependent launch where enabled.
// Every kernel launched this way calls wait_for_upstream() before its first global read.
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
