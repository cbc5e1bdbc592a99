// Writing a step's keys and values into their paged-cache slots, optionally rotating q and k with RoPE.
//
// One thread block per token. A plain write copies the token's kv heads with 16-byte accesses; the RoPE
// write rotates every query and key head (HF rotate_half: pairs (i, i + D/2), float32 tables) on the way.
// A negative slot (a padding row) writes nothing.
#include <type_traits>

#include "vec.cuh"

namespace coconut {
namespace {

constexpr int kThreads = 128;

// One token's k and v rows and the rows of its cache slot.
template <typename T>
struct TokenRows {
  const T* k;
  const T* v;
  T* k_dst;
  T* v_dst;

  __device__ TokenRows(const KVWriteArgs& a, int token, int64_t slot)
      : k(static_cast<const T*>(a.k) + token * a.stride_kt),
        v(static_cast<const T*>(a.v) + token * a.stride_vt),
        k_dst(static_cast<T*>(a.k_cache) + (slot / a.block_size) * a.stride_kcb + (slot % a.block_size) * a.stride_kct),
        v_dst(static_cast<T*>(a.v_cache) + (slot / a.block_size) * a.stride_vcb + (slot % a.block_size) * a.stride_vct) {}
};

template <typename T>
__global__ void __launch_bounds__(kThreads) write_kv_kernel(const KVWriteArgs a) {
  constexpr int V = kVec<T>;
  const int token = blockIdx.x;
  const int64_t slot = a.slot_mapping[token];
  if (slot < 0) return;
  const int vecs = a.head_dim / V;
  const TokenRows<T> r(a, token, slot);
  for (int i = threadIdx.x; i < a.num_kv_heads * vecs; i += kThreads) {
    const int head = i / vecs, d = (i % vecs) * V;
    copy_vec<T>(r.k + head * a.stride_kh + d, r.k_dst + head * a.stride_kch + d);
    copy_vec<T>(r.v + head * a.stride_vh + d, r.v_dst + head * a.stride_vch + d);
  }
}

// Rotate kVec<T> pairs (x1 at d, x2 at d + half) of one head row from src into dst.
template <typename T>
__device__ __forceinline__ void rotate(const T* src, T* dst, int d, int half, const float* cos, const float* sin) {
  constexpr int V = kVec<T>;
  float x1[V], x2[V], r1[V], r2[V];
  load_vec<T>(src + d, x1);
  load_vec<T>(src + half + d, x2);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const float c = cos[d + i], s = sin[d + i];
    r1[i] = x1[i] * c - x2[i] * s;
    r2[i] = x2[i] * c + x1[i] * s;
  }
  store_vec<T>(dst + d, r1);
  store_vec<T>(dst + half + d, r2);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) rope_write_kv_kernel(const KVWriteArgs a) {
  constexpr int V = kVec<T>;
  const int token = blockIdx.x;
  const int64_t slot = a.slot_mapping[token];
  const int64_t position = a.positions[token];
  const float* cos = a.cos + position * a.stride_cos;
  const float* sin = a.sin + position * a.stride_sin;
  const int half = a.head_dim / 2, vecs = half / V;
  const T* q = static_cast<const T*>(a.q) + token * a.stride_qt;
  T* q_out = static_cast<T*>(a.q_out) + token * a.stride_ot;
  for (int i = threadIdx.x; i < a.num_heads * vecs; i += kThreads) {
    const int head = i / vecs, d = (i % vecs) * V;
    rotate<T>(q + head * a.stride_qh, q_out + head * a.stride_oh, d, half, cos, sin);
  }
  if (slot < 0) return;
  const TokenRows<T> r(a, token, slot);
  for (int i = threadIdx.x; i < a.num_kv_heads * vecs; i += kThreads) {
    const int head = i / vecs, d = (i % vecs) * V;
    rotate<T>(r.k + head * a.stride_kh, r.k_dst + head * a.stride_kch, d, half, cos, sin);
    copy_vec<T>(r.v + head * a.stride_vh + d, r.v_dst + head * a.stride_vch + d);
    copy_vec<T>(r.v + head * a.stride_vh + half + d, r.v_dst + head * a.stride_vch + half + d);
  }
}

}  // namespace

cudaError_t write_kv(const KVWriteArgs& a, DType dtype, cudaStream_t stream) {
  if (a.num_tokens == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto* tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (a.head_dim % kVec<T> != 0) return cudaErrorInvalidValue;
    write_kv_kernel<T><<<a.num_tokens, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

cudaError_t rope_write_kv(const KVWriteArgs& a, DType dtype, cudaStream_t stream) {
  if (a.num_tokens == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto* tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    if ((a.head_dim / 2) % kVec<T> != 0 || a.head_dim % 2 != 0) return cudaErrorInvalidValue;
    rope_write_kv_kernel<T><<<a.num_tokens, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

}  // namespace coconut
