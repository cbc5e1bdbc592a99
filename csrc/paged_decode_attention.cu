// Paged decode attention: one query per sequence against its cached context, read through a block table.
//
// One thread block per (sequence, kv head, split) serves every query head of the GQA group, so each K/V
// row is read once. A row is read with 16-byte loads by D / kVec threads (a "token group"); the token
// groups of a block walk the split's tokens with an online softmax each, then merge: across a warp by
// shuffles, across warps through shared memory. With num_splits > 1 each split writes its normalised
// partial and log2-sum-exp, and merge_splits_kernel combines them (flash-decoding).
#include <cfloat>
#include <type_traits>

#include "vec.cuh"

namespace coconut {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

// Merge (m2, l2, acc2) into (m, l, acc): two online-softmax states over disjoint tokens (base 2).
template <int N>
__device__ __forceinline__ void merge_state(float& m, float& l, float (&acc)[N], float m2, float l2,
                                            const float (&acc2)[N]) {
  const float top = fmaxf(m, m2);
  const float w1 = m == -INFINITY ? 0.f : exp2f(m - top);  // an empty state weighs 0, never NaN
  const float w2 = m2 == -INFINITY ? 0.f : exp2f(m2 - top);
  l = l * w1 + l2 * w2;
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = acc[i] * w1 + acc2[i] * w2;
  m = top;
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeAttentionArgs a) {
  constexpr int V = kVec<T>;
  constexpr int TPT = D / V;  // threads per token row
  static_assert(TPT >= 1 && TPT <= 32 && (TPT & (TPT - 1)) == 0, "a head row must fit one warp");
  constexpr int kGroupsPerWarp = 32 / TPT;
  constexpr int kTokenGroups = kWarps * kGroupsPerWarp;

  __shared__ float s_m[kWarps][G];
  __shared__ float s_l[kWarps][G];
  __shared__ float s_acc[kWarps][G][D];

  const int seq = blockIdx.x, kv_head = blockIdx.y, split = blockIdx.z;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int sub = lane % TPT;  // this thread's slice [sub * V, sub * V + V) of the head dim
  const int token_group = warp * kGroupsPerWarp + lane / TPT;
  const int group = a.num_heads / a.num_kv_heads;
  const int context = a.context_lens[seq];
  const int per_split = (context + a.num_splits - 1) / a.num_splits;
  const int start = split * per_split;
  const int end = min(context, start + per_split);

  const T* q_base = static_cast<const T*>(a.q) + seq * a.stride_qb;
  float q[G][V];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (g < group) {
      load_vec<T>(q_base + (kv_head * group + g) * a.stride_qh + sub * V, q[g]);
#pragma unroll
      for (int i = 0; i < V; ++i) q[g][i] *= a.qk_scale;
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) q[g][i] = 0.f;
    }
  }

  float m[G], l[G], acc[G][V];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) acc[g][i] = 0.f;
  }

  const int32_t* table = a.block_tables + seq * a.stride_bt;
  const T* k_cache = static_cast<const T*>(a.k_cache);
  const T* v_cache = static_cast<const T*>(a.v_cache);
  // Every lane runs the same trips (the shuffles need the whole warp); rows past `end` skip the update.
  for (int base = start; base < end; base += kTokenGroups) {
    const int t = base + token_group;
    const bool live = t < end;
    float k[V], v[V];
    if (live) {
      const int64_t block = table[t / a.block_size];
      const int offset = t % a.block_size;
      load_vec<T>(k_cache + block * a.stride_kb + offset * a.stride_kt + kv_head * a.stride_kh + sub * V, k);
      load_vec<T>(v_cache + block * a.stride_vb + offset * a.stride_vt + kv_head * a.stride_vh + sub * V, v);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) k[i] = v[i] = 0.f;
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < V; ++i) s += q[g][i] * k[i];
#pragma unroll
      for (int off = TPT / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (live) {
        const float m_new = fmaxf(m[g], s);
        const float alpha = exp2f(m[g] - m_new);  // m[g] = -inf gives 0
        const float p = exp2f(s - m_new);
        l[g] = l[g] * alpha + p;
#pragma unroll
        for (int i = 0; i < V; ++i) acc[g][i] = acc[g][i] * alpha + p * v[i];
        m[g] = m_new;
      }
    }
  }

  // Token groups of one warp hold the same slices: merge them by shuffles.
#pragma unroll
  for (int off = TPT; off < 32; off *= 2) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float other[V];
#pragma unroll
      for (int i = 0; i < V; ++i) other[i] = __shfl_xor_sync(0xffffffffu, acc[g][i], off);
      const float m2 = __shfl_xor_sync(0xffffffffu, m[g], off);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[g], off);
      merge_state<V>(m[g], l[g], acc[g], m2, l2, other);
    }
  }
  if (lane < TPT) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int i = 0; i < V; ++i) s_acc[warp][g][sub * V + i] = acc[g][i];
      if (lane == 0) {
        s_m[warp][g] = m[g];
        s_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < group * D; idx += kThreads) {
    const int g = idx / D, d = idx % D;
    float top = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) top = fmaxf(top, s_m[w][g]);
    float total = 0.f, value = 0.f;
    if (top != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float weight = s_m[w][g] == -INFINITY ? 0.f : exp2f(s_m[w][g] - top);
        total += s_l[w][g] * weight;
        value += s_acc[w][g][d] * weight;
      }
    }
    const float result = total > 0.f ? value / total : 0.f;  // an empty context or split gives zeros
    const int head = kv_head * group + g;
    if (a.num_splits == 1) {
      static_cast<T*>(a.out)[seq * a.stride_ob + head * a.stride_oh + d] = from_float<T>(result);
    } else {
      const int64_t part = (static_cast<int64_t>(seq) * a.num_heads + head) * a.num_splits + split;
      a.part_out[part * D + d] = result;
      if (d == 0) a.part_lse[part] = total > 0.f ? top + log2f(total) : -INFINITY;
    }
  }
}

template <typename T>
__global__ void merge_splits_kernel(const DecodeAttentionArgs a) {
  const int seq = blockIdx.x, head = blockIdx.y, d = threadIdx.x;
  const int64_t part0 = (static_cast<int64_t>(seq) * a.num_heads + head) * a.num_splits;
  float top = -INFINITY;
  for (int s = 0; s < a.num_splits; ++s) top = fmaxf(top, a.part_lse[part0 + s]);
  float total = 0.f, value = 0.f;
  if (top != -INFINITY) {
    for (int s = 0; s < a.num_splits; ++s) {
      const float lse = a.part_lse[part0 + s];
      const float weight = lse == -INFINITY ? 0.f : exp2f(lse - top);
      total += weight;
      value += weight * a.part_out[(part0 + s) * a.head_dim + d];
    }
  }
  static_cast<T*>(a.out)[seq * a.stride_ob + head * a.stride_oh + d] =
      from_float<T>(total > 0.f ? value / total : 0.f);
}

template <typename T, int D, int G>
cudaError_t launch(const DecodeAttentionArgs& a, cudaStream_t stream) {
  const dim3 grid(a.batch, a.num_kv_heads, a.num_splits);
  decode_kernel<T, D, G><<<grid, kThreads, 0, stream>>>(a);
  if (a.num_splits > 1) merge_splits_kernel<T><<<dim3(a.batch, a.num_heads), D, 0, stream>>>(a);
  return cudaGetLastError();
}

// Instantiated groups: the smallest of 1, 2, 4, 8 that holds the model's GQA group.
template <typename T, int D>
cudaError_t launch_group(const DecodeAttentionArgs& a, cudaStream_t stream) {
  const int group = a.num_heads / a.num_kv_heads;
  if (group <= 1) return launch<T, D, 1>(a, stream);
  if (group <= 2) return launch<T, D, 2>(a, stream);
  if (group <= 4) return launch<T, D, 4>(a, stream);
  if (group <= 8) return launch<T, D, 8>(a, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
constexpr bool head_dim_fits(int head_dim) {
  return head_dim % kVec<T> == 0 && head_dim / kVec<T> <= 32;
}

}  // namespace

bool decode_attention_supported(int head_dim, int group, DType dtype) {
  const bool dim_ok = head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
  const int vec = dtype == DType::kFloat32 ? 4 : 8;
  return dim_ok && head_dim % vec == 0 && head_dim / vec <= 32 && group >= 1 && group <= 8;
}

cudaError_t paged_decode_attention(const DecodeAttentionArgs& a, DType dtype, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  if (a.num_kv_heads < 1 || !decode_attention_supported(a.head_dim, a.num_heads / a.num_kv_heads, dtype))
    return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto* tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    switch (a.head_dim) {
      case 16: if constexpr (head_dim_fits<T>(16)) return launch_group<T, 16>(a, stream); break;
      case 32: if constexpr (head_dim_fits<T>(32)) return launch_group<T, 32>(a, stream); break;
      case 64: if constexpr (head_dim_fits<T>(64)) return launch_group<T, 64>(a, stream); break;
      case 128: if constexpr (head_dim_fits<T>(128)) return launch_group<T, 128>(a, stream); break;
      case 256: if constexpr (head_dim_fits<T>(256)) return launch_group<T, 256>(a, stream); break;
    }
    return cudaErrorInvalidValue;
  });
}

}  // namespace coconut
