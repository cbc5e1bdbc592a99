// coconut_fast._C: torch tensors -> the launchers in coconut_kernels.h, on the current CUDA stream.
// The Python wrappers (coconut_fast/kernels/cuda_ops.py) check arguments and name the bad one; the
// checks here guard the raw pointers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "coconut_kernels.h"

namespace {

coconut::DType dtype_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return coconut::DType::kFloat32;
    case at::kHalf: return coconut::DType::kFloat16;
    case at::kBFloat16: return coconut::DType::kBFloat16;
    default: TORCH_CHECK(false, "coconut_fast._C: expected float32, float16 or bfloat16, got ", type);
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "coconut_fast._C: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.stride(-1) == 1, "coconut_fast._C: ", name, " must have a contiguous last dimension");
}

void check_aligned(const at::Tensor& t, const char* name) {
  const int64_t vec = 16 / t.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "coconut_fast._C: ", name,
              " must start on a 16-byte boundary for vector loads");
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    TORCH_CHECK(t.stride(d) % vec == 0, "coconut_fast._C: ", name, " strides must be multiples of ", vec,
                " elements (16 bytes) for vector loads");
}

void raise_on_error(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "coconut_fast._C.", what, ": ",
              err == cudaErrorInvalidValue ? "unsupported shape or dtype" : cudaGetErrorString(err));
}

const void* optional_ptr(const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return nullptr;
  check_cuda(*t, name);
  return t->data_ptr();
}

void paged_decode_attention(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, at::Tensor& out,
                            const std::optional<at::Tensor>& part_out, const std::optional<at::Tensor>& part_lse,
                            const std::optional<at::Tensor>& counters, double scale, int64_t num_splits,
                            const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
                            const std::optional<at::Tensor>& slot_mapping, const std::optional<at::Tensor>& positions,
                            const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin) {
  for (auto& [t, n] : {std::pair{q, "q"}, {k_cache, "k_cache"}, {v_cache, "v_cache"}, {out, "out"}}) {
    check_cuda(t, n);
    check_aligned(t, n);
  }
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "coconut_fast._C: block_tables and context_lens must be int32");
  TORCH_CHECK(num_splits == 1 || (part_out.has_value() && part_lse.has_value() && counters.has_value() &&
                                  part_out->scalar_type() == at::kFloat && part_lse->scalar_type() == at::kFloat &&
                                  counters->scalar_type() == at::kInt),
              "coconut_fast._C: num_splits > 1 needs float32 part_out/part_lse and int32 counters");
  TORCH_CHECK(k_new.has_value() == v_new.has_value() && k_new.has_value() == slot_mapping.has_value(),
              "coconut_fast._C: k_new, v_new and slot_mapping come together");
  TORCH_CHECK(positions.has_value() == cos.has_value() && cos.has_value() == sin.has_value() &&
                  (!cos.has_value() || k_new.has_value()),
              "coconut_fast._C: positions, cos and sin come together, with k_new");
  if (k_new.has_value()) {
    for (auto& [t, n] : {std::pair{*k_new, "k_new"}, {*v_new, "v_new"}}) {
      check_cuda(t, n);
      check_aligned(t, n);
    }
    TORCH_CHECK(slot_mapping->scalar_type() == at::kLong, "coconut_fast._C: slot_mapping must be int64");
  }
  if (cos.has_value()) {
    TORCH_CHECK(positions->scalar_type() == at::kLong, "coconut_fast._C: positions must be int64");
    TORCH_CHECK(cos->scalar_type() == at::kFloat && sin->scalar_type() == at::kFloat,
                "coconut_fast._C: cos and sin must be float32");
  }
  const c10::cuda::CUDAGuard guard(q.device());
  coconut::DecodeAttentionArgs a{};
  a.q = q.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.block_tables = block_tables.data_ptr<int32_t>();
  a.context_lens = context_lens.data_ptr<int32_t>();
  a.out = out.data_ptr();
  if (num_splits > 1) {
    a.part_out = part_out->data_ptr<float>();
    a.part_lse = part_lse->data_ptr<float>();
    a.counters = counters->data_ptr<int32_t>();
  }
  a.k_new = optional_ptr(k_new, "k_new");
  a.v_new = optional_ptr(v_new, "v_new");
  a.slot_mapping = slot_mapping.has_value() ? slot_mapping->data_ptr<int64_t>() : nullptr;
  a.positions = positions.has_value() ? positions->data_ptr<int64_t>() : nullptr;
  a.cos = cos.has_value() ? cos->data_ptr<float>() : nullptr;
  a.sin = sin.has_value() ? sin->data_ptr<float>() : nullptr;
  a.qk_scale = static_cast<float>(scale * 1.4426950408889634);
  a.stride_qb = q.stride(0), a.stride_qh = q.stride(1);
  a.stride_kb = k_cache.stride(0), a.stride_kt = k_cache.stride(1), a.stride_kh = k_cache.stride(2);
  a.stride_vb = v_cache.stride(0), a.stride_vt = v_cache.stride(1), a.stride_vh = v_cache.stride(2);
  a.stride_bt = block_tables.stride(0);
  a.stride_ob = out.stride(0), a.stride_oh = out.stride(1);
  if (k_new.has_value()) {
    a.stride_knb = k_new->stride(0), a.stride_knh = k_new->stride(1);
    a.stride_vnb = v_new->stride(0), a.stride_vnh = v_new->stride(1);
  }
  if (cos.has_value()) a.stride_cos = cos->stride(0), a.stride_sin = sin->stride(0);
  a.batch = q.size(0), a.num_heads = q.size(1), a.num_kv_heads = k_cache.size(2), a.head_dim = q.size(2);
  a.block_size = k_cache.size(1), a.num_splits = num_splits;
  raise_on_error(coconut::paged_decode_attention(a, dtype_of(q.scalar_type()), c10::cuda::getCurrentCUDAStream()),
                 "paged_decode_attention");
}

coconut::KVWriteArgs kv_args(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                             const at::Tensor& slot_mapping) {
  for (auto& [t, n] : {std::pair{k, "k"}, {v, "v"}, {k_cache, "k_cache"}, {v_cache, "v_cache"}}) {
    check_cuda(t, n);
    check_aligned(t, n);
  }
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "coconut_fast._C: slot_mapping must be int64");
  coconut::KVWriteArgs a{};
  a.k = k.data_ptr(), a.v = v.data_ptr(), a.k_cache = k_cache.data_ptr(), a.v_cache = v_cache.data_ptr();
  a.slot_mapping = slot_mapping.data_ptr<int64_t>();
  a.stride_kt = k.stride(0), a.stride_kh = k.stride(1), a.stride_vt = v.stride(0), a.stride_vh = v.stride(1);
  a.stride_kcb = k_cache.stride(0), a.stride_kct = k_cache.stride(1), a.stride_kch = k_cache.stride(2);
  a.stride_vcb = v_cache.stride(0), a.stride_vct = v_cache.stride(1), a.stride_vch = v_cache.stride(2);
  a.num_tokens = k.size(0), a.num_kv_heads = k.size(1), a.head_dim = k.size(2), a.block_size = k_cache.size(1);
  return a;
}

void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  const c10::cuda::CUDAGuard guard(k.device());
  const auto a = kv_args(k, v, k_cache, v_cache, slot_mapping);
  raise_on_error(coconut::write_kv(a, dtype_of(k.scalar_type()), c10::cuda::getCurrentCUDAStream()), "write_kv");
}

void rope_write_kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                   at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& positions,
                   const at::Tensor& cos, const at::Tensor& sin, at::Tensor& q_out) {
  for (auto& [t, n] : {std::pair{q, "q"}, {q_out, "q_out"}}) {
    check_cuda(t, n);
    check_aligned(t, n);
  }
  TORCH_CHECK(positions.scalar_type() == at::kLong, "coconut_fast._C: positions must be int64");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "coconut_fast._C: cos and sin must be float32");
  const c10::cuda::CUDAGuard guard(k.device());
  auto a = kv_args(k, v, k_cache, v_cache, slot_mapping);
  a.q = q.data_ptr(), a.q_out = q_out.data_ptr();
  a.positions = positions.data_ptr<int64_t>();
  a.cos = cos.data_ptr<float>(), a.sin = sin.data_ptr<float>();
  a.stride_qt = q.stride(0), a.stride_qh = q.stride(1), a.stride_ot = q_out.stride(0), a.stride_oh = q_out.stride(1);
  a.stride_cos = cos.stride(0), a.stride_sin = sin.stride(0);
  a.num_heads = q.size(1);
  raise_on_error(coconut::rope_write_kv(a, dtype_of(k.scalar_type()), c10::cuda::getCurrentCUDAStream()), "rope_write_kv");
}

void latent_feedback(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, double eps, bool rms, at::Tensor& thought_out,
                     at::Tensor& next_embeds, at::Tensor& positions, at::Tensor& context_lens,
                     at::Tensor& slot_mapping, const at::Tensor& block_tables, int64_t block_size) {
  for (auto& [t, n] : {std::pair{x, "x"}, {residual, "residual"}, {weight, "weight"},
                       {thought_out, "thought_out"}, {next_embeds, "next_embeds"}})
    check_cuda(t, n);
  TORCH_CHECK(positions.scalar_type() == at::kLong && slot_mapping.scalar_type() == at::kLong &&
                  context_lens.scalar_type() == at::kInt && block_tables.scalar_type() == at::kInt,
              "coconut_fast._C: positions/slot_mapping must be int64, context_lens/block_tables int32");
  const c10::cuda::CUDAGuard guard(x.device());
  coconut::LatentFeedbackArgs a{};
  a.x = x.data_ptr(), a.residual = residual.data_ptr(), a.weight = weight.data_ptr();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.thought_out = thought_out.data_ptr(), a.next_embeds = next_embeds.data_ptr();
  a.positions = positions.data_ptr<int64_t>(), a.context_lens = context_lens.data_ptr<int32_t>();
  a.slot_mapping = slot_mapping.data_ptr<int64_t>(), a.block_tables = block_tables.data_ptr<int32_t>();
  a.stride_x = x.stride(0), a.stride_r = residual.stride(0), a.stride_t = thought_out.stride(0);
  a.stride_e = next_embeds.stride(0), a.stride_bt = block_tables.stride(0);
  a.eps = static_cast<float>(eps), a.rows = x.size(0), a.hidden = x.size(1);
  a.block_size = block_size, a.max_blocks = block_tables.size(1);
  a.rms = rms;
  raise_on_error(coconut::latent_feedback(a, dtype_of(x.scalar_type()), c10::cuda::getCurrentCUDAStream()), "latent_feedback");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "coconut_fast CUDA kernels: paged decode attention, KV-cache writes, the latent feedback step";
  m.def("paged_decode_attention", &paged_decode_attention);
  m.def("write_kv", &write_kv);
  m.def("rope_write_kv", &rope_write_kv);
  m.def("latent_feedback", &latent_feedback);
  m.def("decode_attention_supported", [](int64_t head_dim, int64_t group, at::ScalarType dtype) {
    return coconut::decode_attention_supported(head_dim, group, dtype_of(dtype));
  });
}
