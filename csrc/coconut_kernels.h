// Launchers of coconut_fast's CUDA kernels: plain pointers, sizes and a stream, no torch types,
// so these sources compile with nvcc alone; bindings.cpp turns torch tensors into these arguments.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace coconut {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// q [B, Hq, D] against a paged cache [blocks, block_size, Hkv, D]; strides in elements. With k_new, the
// step's k/v [B, Hkv, D] are written to slot_mapping[b] (< 0: nothing) and attended as position
// context_lens[b] - 1; with cos as well, q and the new k are rotated at positions[b] first.
struct DecodeAttentionArgs {
  const void* q;
  void* k_cache;
  void* v_cache;
  const int32_t* block_tables;  // [B, max_blocks]
  const int32_t* context_lens;  // [B], the new token included
  void* out;                    // [B, Hq, D]
  float* part_out;              // [B, Hq, num_splits, D], used when num_splits > 1
  float* part_lse;              // [B, Hq, num_splits], log2-sum-exp of each split
  int32_t* counters;            // [B * Hkv] zeros when num_splits > 1; left at zero
  const void* k_new;            // [B, Hkv, D] or null (no append)
  const void* v_new;
  const int64_t* slot_mapping;  // [B], with k_new
  const int64_t* positions;     // [B], RoPE only
  const float* cos;             // [P, D/2] or null (no RoPE)
  const float* sin;
  float qk_scale;               // softmax scale * log2(e)
  int64_t stride_qb, stride_qh;
  int64_t stride_kb, stride_kt, stride_kh;
  int64_t stride_vb, stride_vt, stride_vh;
  int64_t stride_bt;
  int64_t stride_ob, stride_oh;
  int64_t stride_knb, stride_knh, stride_vnb, stride_vnh;
  int64_t stride_cos, stride_sin;
  int batch, num_heads, num_kv_heads, head_dim, block_size, num_splits;
};

// k, v [N, Hkv, D] written to cache slots; q [N, Hq, D] rotated into q_out when cos/sin are given.
struct KVWriteArgs {
  const void* q;  // null for a plain write
  const void* k;
  const void* v;
  void* q_out;
  void* k_cache;
  void* v_cache;
  const int64_t* slot_mapping;  // [N], < 0: nothing written
  const int64_t* positions;     // [N], RoPE only
  const float* cos;             // [P, D/2], RoPE only
  const float* sin;
  int64_t stride_qt, stride_qh, stride_ot, stride_oh;
  int64_t stride_kt, stride_kh, stride_vt, stride_vh;
  int64_t stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch;
  int64_t stride_cos, stride_sin;
  int num_tokens, num_heads, num_kv_heads, head_dim, block_size;
};

// One latent step's end: thought = norm(x + residual) goes to thought_out and next_embeds, and
// every live row (slot >= 0) moves to its next position, context length and cache slot.
struct LatentFeedbackArgs {
  const void* x;         // [B, H]
  const void* residual;  // [B, H]
  const void* weight;    // [H]
  const void* bias;      // [H] or null (LayerNorm only)
  void* thought_out;     // [B, H]
  void* next_embeds;     // [B, H]
  int64_t* positions;    // [B]
  int32_t* context_lens;  // [B]
  int64_t* slot_mapping;  // [B]
  const int32_t* block_tables;  // [B, max_blocks]
  int64_t stride_x, stride_r, stride_t, stride_e, stride_bt;
  float eps;
  int rows, hidden, block_size, max_blocks;  // max_blocks: the width of block_tables
  bool rms;  // RMSNorm (Llama family) or LayerNorm (GPT-2)
};

cudaError_t paged_decode_attention(const DecodeAttentionArgs& args, DType dtype, cudaStream_t stream);
cudaError_t write_kv(const KVWriteArgs& args, DType dtype, cudaStream_t stream);
cudaError_t rope_write_kv(const KVWriteArgs& args, DType dtype, cudaStream_t stream);
cudaError_t latent_feedback(const LatentFeedbackArgs& args, DType dtype, cudaStream_t stream);

// Whether paged_decode_attention has an instantiation for this head_dim, GQA group and dtype.
bool decode_attention_supported(int head_dim, int group, DType dtype);

}  // namespace coconut
