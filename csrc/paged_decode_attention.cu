// Paged decode attention: one query per sequence against its cached context, read through a block table.
//
// One thread block per (sequence, kv head, split) serves every query head of the GQA group, so each K/V
// row is read once. A row is read with 16-byte loads by D / kVec threads (a "token group"); each token
// group takes kUnroll tokens per trip, issuing all their K/V loads before any arithmetic, and keeps an
// online softmax; then the token groups merge: across a warp by shuffles, across warps through shared
// memory. The split's slice of the block table is staged in shared memory (in chunks), and the queries of
// large GQA groups live in shared memory instead of registers.
//
// With num_splits > 1 each split writes its normalised partial and log2-sum-exp, then counts itself in
// the (sequence, kv head) counter; the block that arrives last merges the partials into `out` and puts the
// counter back to 0 (flash-decoding in one launch, the counters reusable as they are).
//
// With k_new (append), the block whose split holds the last position writes the step's k/v of its kv head
// into the cache slot and attends to them from registers; with cos/sin, q and the new k are rotated first
// (HF rotate_half, float32, rounded to the dtype as rope_write_kv does).
#include <cfloat>
#include <type_traits>

#include "vec.cuh"

namespace coconut {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTableChunk = 256;  // block-table entries staged in shared memory at a time

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

// The slice [d0, d0 + kVec) of a head row, rotated (HF rotate_half with the partner element half away) in
// float32 with the reference's products and sum, rounded to T and widened again.
template <typename T>
__device__ __forceinline__ void load_rotated(const T* row, int d0, int half, const float* cos, const float* sin,
                                             float (&x)[kVec<T>]) {
  constexpr int V = kVec<T>;
  const bool first = d0 < half;  // a slice lies in one half: half is a multiple of V
  const int c0 = first ? d0 : d0 - half;
  float partner[V];
  load_vec<T>(row + d0, x);
  load_vec<T>(row + (first ? d0 + half : d0 - half), partner);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const float xc = __fmul_rn(x[i], cos[c0 + i]), ps = __fmul_rn(partner[i], sin[c0 + i]);
    x[i] = to_float(from_float<T>(first ? __fsub_rn(xc, ps) : __fadd_rn(xc, ps)));
  }
}

// This thread's slice of the step's new k (rotated when cos is given) and v, written to the cache slot.
template <typename T>
__device__ __forceinline__ void append_token(const DecodeAttentionArgs& a, int seq, int kv_head, int d0,
                                             int64_t slot, const float* cos, const float* sin,
                                             float (&k)[kVec<T>], float (&v)[kVec<T>]) {
  const T* k_row = static_cast<const T*>(a.k_new) + seq * a.stride_knb + kv_head * a.stride_knh;
  if (cos != nullptr) {
    load_rotated<T>(k_row, d0, a.head_dim / 2, cos, sin, k);
  } else {
    load_vec<T>(k_row + d0, k);
  }
  load_vec<T>(static_cast<const T*>(a.v_new) + seq * a.stride_vnb + kv_head * a.stride_vnh + d0, v);
  const int64_t block = slot / a.block_size, offset = slot % a.block_size;
  store_vec<T>(static_cast<T*>(a.k_cache) + block * a.stride_kb + offset * a.stride_kt + kv_head * a.stride_kh + d0,
               k);
  store_vec<T>(static_cast<T*>(a.v_cache) + block * a.stride_vb + offset * a.stride_vt + kv_head * a.stride_vh + d0,
               v);
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeAttentionArgs a) {
  constexpr int V = kVec<T>;
  constexpr int TPT = D / V;  // threads per token row
  static_assert(TPT >= 1 && TPT <= 32 && (TPT & (TPT - 1)) == 0, "a head row must fit one warp");
  constexpr int kGroupsPerWarp = 32 / TPT;
  constexpr int kTokenGroups = kWarps * kGroupsPerWarp;
  // tokens per token group and trip, their loads all in flight: 4 while the accumulators are small, else 2
  constexpr int kUnroll = G * V <= 32 ? 4 : 2;
  constexpr bool kSharedQ = G >= 4;        // large groups read q from shared memory, sparing registers

  __shared__ float s_m[kWarps][G];
  __shared__ float s_l[kWarps][G];
  __shared__ float s_acc[kWarps][G][D];
  __shared__ float s_q[kSharedQ ? G : 1][kSharedQ ? D : 1];
  __shared__ int32_t s_table[kTableChunk];
  __shared__ bool s_merges;

  const int seq = blockIdx.x, kv_head = blockIdx.y, split = blockIdx.z;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int sub = lane % TPT;  // this thread's slice [sub * V, sub * V + V) of the head dim
  const int token_group = warp * kGroupsPerWarp + lane / TPT;
  const int group = a.num_heads / a.num_kv_heads;
  const int context = a.context_lens[seq];
  const int per_split = (context + a.num_splits - 1) / a.num_splits;
  const int start = split * per_split;
  const int end = min(context, start + per_split);
  const int last = context - 1;

  const bool append = a.k_new != nullptr;
  const int64_t slot = append ? a.slot_mapping[seq] : -1;
  const bool take_new = slot >= 0;  // the new token comes from registers; a padding row reads the cache
  const float* cos = nullptr;
  const float* sin = nullptr;
  if (a.cos != nullptr) {
    const int64_t position = a.positions[seq];
    cos = a.cos + position * a.stride_cos;
    sin = a.sin + position * a.stride_sin;
  }

  // q, scaled (and rotated, then rounded to T as the reference does): in shared memory or this thread's slices.
  const T* q_base = static_cast<const T*>(a.q) + seq * a.stride_qb + kv_head * group * a.stride_qh;
  [[maybe_unused]] float q[kSharedQ ? 1 : G][V];
  if constexpr (kSharedQ) {
    for (int idx = threadIdx.x; idx < G * TPT; idx += kThreads) {
      const int g = idx / TPT, d0 = (idx % TPT) * V;
      float x[V];
      if (g >= group) {
#pragma unroll
        for (int i = 0; i < V; ++i) x[i] = 0.f;
      } else if (cos != nullptr) {
        load_rotated<T>(q_base + g * a.stride_qh, d0, D / 2, cos, sin, x);
      } else {
        load_vec<T>(q_base + g * a.stride_qh + d0, x);
      }
#pragma unroll
      for (int i = 0; i < V; ++i) s_q[g][d0 + i] = x[i] * a.qk_scale;
    }
  } else {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (g >= group) {
#pragma unroll
        for (int i = 0; i < V; ++i) q[g][i] = 0.f;
        continue;
      }
      if (cos != nullptr) {
        load_rotated<T>(q_base + g * a.stride_qh, sub * V, D / 2, cos, sin, q[g]);
      } else {
        load_vec<T>(q_base + g * a.stride_qh + sub * V, q[g]);
      }
#pragma unroll
      for (int i = 0; i < V; ++i) q[g][i] *= a.qk_scale;
    }
  }

  // A row without context still writes its slot, as write_kv would (split 0 does).
  if (append && take_new && context <= 0 && split == 0 && token_group == 0) {
    float k[V], v[V];
    append_token<T>(a, seq, kv_head, sub * V, slot, cos, sin, k, v);
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
  const int chunk_tokens = (kTableChunk - 1) * a.block_size;  // a chunk's tokens touch at most kTableChunk blocks
  for (int chunk = start; chunk < end; chunk += chunk_tokens) {
    const int chunk_end = min(end, chunk + chunk_tokens);
    const int first_block = chunk / a.block_size;
    const int blocks = (chunk_end - 1) / a.block_size - first_block + 1;
    __syncthreads();  // the previous chunk's table (and, first, s_q) is written or read through
    for (int i = threadIdx.x; i < blocks; i += kThreads) s_table[i] = table[first_block + i];
    __syncthreads();

    // Every lane runs the same trips (the shuffles need the whole warp); rows past the chunk skip the update.
    for (int base = chunk; base < chunk_end; base += kTokenGroups * kUnroll) {
      float k[kUnroll][V], v[kUnroll][V];
      bool live[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int t = base + u * kTokenGroups + token_group;
        live[u] = t < chunk_end;
        if (live[u] && take_new && t == last) {
          append_token<T>(a, seq, kv_head, sub * V, slot, cos, sin, k[u], v[u]);
        } else if (live[u]) {
          const int64_t block = s_table[t / a.block_size - first_block];
          const int offset = t % a.block_size;
          load_vec<T>(k_cache + block * a.stride_kb + offset * a.stride_kt + kv_head * a.stride_kh + sub * V, k[u]);
          load_vec<T>(v_cache + block * a.stride_vb + offset * a.stride_vt + kv_head * a.stride_vh + sub * V, v[u]);
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) k[u][i] = v[u][i] = 0.f;
        }
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float s[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          s[u] = 0.f;
#pragma unroll
          for (int i = 0; i < V; ++i) {
            if constexpr (kSharedQ) {
              s[u] += s_q[g][sub * V + i] * k[u][i];
            } else {
              s[u] += q[g][i] * k[u][i];
            }
          }
#pragma unroll
          for (int off = TPT / 2; off > 0; off /= 2) s[u] += __shfl_xor_sync(0xffffffffu, s[u], off);
        }
        float m_new = m[g];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) m_new = live[u] ? fmaxf(m_new, s[u]) : m_new;
        if (m_new == -INFINITY) continue;  // no live token in this trip for this token group
        const float alpha = exp2f(m[g] - m_new);  // m[g] = -inf gives 0
        l[g] *= alpha;
#pragma unroll
        for (int i = 0; i < V; ++i) acc[g][i] *= alpha;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const float p = live[u] ? exp2f(s[u] - m_new) : 0.f;
          l[g] += p;
#pragma unroll
          for (int i = 0; i < V; ++i) acc[g][i] += p * v[u][i];
        }
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
  if (a.num_splits == 1) return;

  // Count this split in; the last one merges. Each thread's partial stores are made visible device-wide
  // before the block's count (fence, then barrier), and the merging block reads the partials from L2.
  int32_t* counter = a.counters + seq * a.num_kv_heads + kv_head;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_merges = atomicAdd(counter, 1) == a.num_splits - 1;
  __syncthreads();
  if (!s_merges) return;
  __threadfence();
  for (int idx = threadIdx.x; idx < group * D; idx += kThreads) {
    const int g = idx / D, d = idx % D;
    const int head = kv_head * group + g;
    const int64_t part0 = (static_cast<int64_t>(seq) * a.num_heads + head) * a.num_splits;
    float top = -INFINITY;
    for (int s = 0; s < a.num_splits; ++s) top = fmaxf(top, __ldcg(a.part_lse + part0 + s));
    float total = 0.f, value = 0.f;
    if (top != -INFINITY) {
      for (int s = 0; s < a.num_splits; ++s) {
        const float lse = __ldcg(a.part_lse + part0 + s);
        const float weight = lse == -INFINITY ? 0.f : exp2f(lse - top);  // empty splits weigh 0
        total += weight;
        value += weight * __ldcg(a.part_out + (part0 + s) * D + d);
      }
    }
    static_cast<T*>(a.out)[seq * a.stride_ob + head * a.stride_oh + d] =
        from_float<T>(total > 0.f ? value / total : 0.f);
  }
  if (threadIdx.x == 0) *counter = 0;  // ready for the next launch
}

template <typename T, int D, int G>
cudaError_t launch(const DecodeAttentionArgs& a, cudaStream_t stream) {
  const dim3 grid(a.batch, a.num_kv_heads, a.num_splits);
  decode_kernel<T, D, G><<<grid, kThreads, 0, stream>>>(a);
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
  // (head_dim / 2) % vec == 0 as well for every listed size: the RoPE halves are whole vectors
  return dim_ok && head_dim % vec == 0 && head_dim / vec <= 32 && group >= 1 && group <= 8;
}

cudaError_t paged_decode_attention(const DecodeAttentionArgs& a, DType dtype, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  if (a.num_kv_heads < 1 || !decode_attention_supported(a.head_dim, a.num_heads / a.num_kv_heads, dtype))
    return cudaErrorInvalidValue;
  if ((a.num_splits > 1 && a.counters == nullptr) || (a.cos != nullptr && a.k_new == nullptr))
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
