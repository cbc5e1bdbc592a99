// Element conversions and 16-byte vector loads / stores shared by the kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "coconut_kernels.h"

namespace coconut {

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Elements of T in one 16-byte access.
template <typename T> constexpr int kVec = 16 / sizeof(T);

union Pack16 {
  uint4 raw;
  float f32[4];
  __half f16[8];
  __nv_bfloat16 bf16[8];
};

template <typename T> __device__ __forceinline__ const T* elems(const Pack16& p);
template <> __device__ __forceinline__ const float* elems<float>(const Pack16& p) { return p.f32; }
template <> __device__ __forceinline__ const __half* elems<__half>(const Pack16& p) { return p.f16; }
template <> __device__ __forceinline__ const __nv_bfloat16* elems<__nv_bfloat16>(const Pack16& p) { return p.bf16; }

// One 16-byte load of kVec<T> elements (p must be 16-byte aligned), widened to float.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[kVec<T>]) {
  Pack16 pack;
  pack.raw = *reinterpret_cast<const uint4*>(p);
  const T* e = elems<T>(pack);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = to_float(e[i]);
}

// One 16-byte store of kVec<T> elements rounded from float.
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[kVec<T>]) {
  Pack16 pack;
  T* e = const_cast<T*>(elems<T>(pack));
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) e[i] = from_float<T>(in[i]);
  *reinterpret_cast<uint4*>(p) = pack.raw;
}

// One 16-byte copy of kVec<T> elements, unconverted (both pointers 16-byte aligned).
template <typename T>
__device__ __forceinline__ void copy_vec(const T* src, T* dst) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}

// Calls f with a null pointer of the element type that `dtype` names.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(static_cast<float*>(nullptr));
    case DType::kFloat16: return f(static_cast<__half*>(nullptr));
    case DType::kBFloat16: return f(static_cast<__nv_bfloat16*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

}  // namespace coconut
