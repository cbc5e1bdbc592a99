"""The engine's own forward over an HF model's weights (in place): GPT-2 and the Llama family.

Each forward takes the step's flattened input embeddings [T, H] and returns the final-norm
hidden states [T, H] (HF's `hidden_states[-1]`), writing the step's K/V into the paged cache.
A layer is a handful of GEMMs on the HF weights (q/k/v and gate/up fused into one matrix each, see
`fused_weights.py`) between the engine's kernels: norms with the residual add, RoPE with the cache
write, attention. Q, K and V stay strided views of the one projection output.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..families import FAMILIES, LLAMA_FAMILY
from .fused_weights import fuse_linears
from .kv_cache import PagedKVCache
from .layers import FUSED_MAX_ROWS, PagedAttention, StepMetadata, rope_table


def sliding_window(config) -> int | None:
    """The attention window of a config when some layer uses one, else None."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


class LlamaForward:
    """Llama, Qwen2 (q/k/v biases live in the HF projections), Qwen3 (per-head q/k RMSNorm before
    RoPE), Mistral: RMSNorm, RoPE from the model's own rotary table, grouped-query attention."""

    def __init__(self, causal_lm, kernels: SimpleNamespace, max_positions: int):
        base, config = causal_lm.model, causal_lm.config
        self.kernels = kernels
        self.layers = list(base.layers[: config.num_hidden_layers])
        self.norm = base.norm
        self.eps = config.rms_norm_eps
        first = self.layers[0].self_attn
        self.head_dim = first.head_dim
        self.num_kv_heads = config.num_key_value_heads
        self.qk_norm = hasattr(first, "q_norm")
        self.attention = PagedAttention(kernels, first.scaling)
        self.cos, self.sin = rope_table(base.rotary_emb, max_positions, causal_lm.device)
        self.num_heads = config.num_attention_heads
        self.silu = getattr(config, "hidden_act", None) == "silu"
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            fuse_linears(attn, "qkv_proj", [attn.q_proj, attn.k_proj, attn.v_proj])
            fuse_linears(mlp, "gate_up_proj", [mlp.gate_proj, mlp.up_proj])

    def head_norm(self, x: torch.Tensor, norm) -> torch.Tensor:
        T, heads, D = x.shape
        return self.kernels.add_rms_norm(x.reshape(T * heads, D), None, norm.weight, self.eps)[0].view(T, heads, D)

    def __call__(self, embeds: torch.Tensor, meta: StepMetadata, cache: PagedKVCache) -> torch.Tensor:
        hidden, residual = self.body(embeds, meta, cache)
        return self.kernels.add_rms_norm(hidden, residual, self.norm.weight, self.eps)[0]

    def feedback(self, hidden, residual, meta: StepMetadata, thought_out, next_embeds, block_size: int) -> None:
        """The final norm as the latent feedback step: the thought becomes the next input, rows advance."""
        self.kernels.latent_feedback(hidden, residual, self.norm.weight, None, self.eps, True, thought_out,
                                     next_embeds, meta.positions, meta.context_lens, meta.slot_mapping,
                                     meta.block_tables, block_size)

    def body(self, embeds: torch.Tensor, meta: StepMetadata, cache: PagedKVCache):
        """All layers; returns the last layer's output and residual, before the final norm.

        Each projection before a norm (o_proj, and down_proj before the next layer's input norm) runs with the
        residual add and the norm as one launch on steps of at most FUSED_MAX_ROWS rows."""
        T, D, Hq, Hkv = embeds.shape[0], self.head_dim, self.num_heads, self.num_kv_heads
        fused = T <= FUSED_MAX_ROWS
        pending, down, residual = embeds, None, None
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x, residual = self.add_norm(pending, down, residual, layer.input_layernorm, fused)
            q, k, v = F.linear(x, *attn.qkv_proj).view(T, Hq + 2 * Hkv, D).split([Hq, Hkv, Hkv], dim=1)
            if self.qk_norm:
                q, k = self.head_norm(q, attn.q_norm), self.head_norm(k, attn.k_norm)
            out = self.attention(q, k, v, cache.k[i], cache.v[i], meta, rope=(self.cos, self.sin), check=i == 0)
            x, residual = self.add_norm(out.view(T, -1), attn.o_proj, residual, layer.post_attention_layernorm, fused)
            pending, down = self.gate_up_act(mlp, x, fused), mlp.down_proj
        return down(pending), residual

    def add_norm(self, x, linear, residual, norm, fused: bool):
        """(norm(linear(x) + residual), the sum); `linear=None` adds x itself."""
        ops = self.kernels
        if linear is None:
            return ops.add_rms_norm(x, residual, norm.weight, self.eps)
        if fused:
            return ops.linear_add_norm(x, linear.weight, linear.bias, residual, norm.weight, None, self.eps, True,
                                       weight_layout="nk")
        return ops.add_rms_norm(linear(x), residual, norm.weight, self.eps)

    def gate_up_act(self, mlp, x, fused: bool):
        """act(gate(x)) * up(x) from the fused gate/up matrix: SiLU-and-multiply as the GEMM's epilogue."""
        if fused and self.silu:
            return self.kernels.linear_act(x, *mlp.gate_up_proj, "silu_mul", weight_layout="nk")
        gate, up = F.linear(x, *mlp.gate_up_proj).chunk(2, dim=-1)
        return mlp.act_fn(gate) * up


class GPT2Forward:
    """GPT-2: learned positions, LayerNorm, Conv1D projections ([in, out] weights), gelu_new MLP."""

    def __init__(self, causal_lm, kernels: SimpleNamespace, max_positions: int):
        base, config = causal_lm.transformer, causal_lm.config
        self.kernels = kernels
        self.layers = list(base.h)
        self.wpe, self.ln_f = base.wpe, base.ln_f
        self.eps = config.layer_norm_epsilon
        self.hidden = config.n_embd
        self.head_dim = self.layers[0].attn.head_dim
        self.num_kv_heads = config.n_head
        self.tanh_gelu = config.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        # the scale may differ per layer (scale_attn_by_inverse_layer_idx)
        self.attention = [PagedAttention(kernels, layer.attn.scaling) for layer in self.layers]

    def __call__(self, embeds: torch.Tensor, meta: StepMetadata, cache: PagedKVCache) -> torch.Tensor:
        hidden, residual = self.body(embeds, meta, cache)
        return self.kernels.add_layer_norm(hidden, residual, self.ln_f.weight, self.ln_f.bias, self.eps)[0]

    def feedback(self, hidden, residual, meta: StepMetadata, thought_out, next_embeds, block_size: int) -> None:
        """The final norm as the latent feedback step: the thought becomes the next input, rows advance."""
        self.kernels.latent_feedback(hidden, residual, self.ln_f.weight, self.ln_f.bias, self.eps, False,
                                     thought_out, next_embeds, meta.positions, meta.context_lens,
                                     meta.slot_mapping, meta.block_tables, block_size)

    def body(self, embeds: torch.Tensor, meta: StepMetadata, cache: PagedKVCache):
        """All layers; returns the last layer's output and residual, before ln_f.

        The position embeddings enter through the first norm's residual add; each projection before a norm
        (attention c_proj, and the MLP's c_proj before the next ln_1) runs with the residual add and the norm,
        and c_fc with its GELU, as one launch on steps of at most FUSED_MAX_ROWS rows."""
        T, H, D = embeds.shape[0], self.hidden, self.head_dim
        fused = T <= FUSED_MAX_ROWS
        pending, down, residual = embeds, None, self.wpe(meta.positions)
        for i, layer in enumerate(self.layers):
            x, residual = self.add_norm(pending, down, residual, layer.ln_1, fused)
            q, k, v = layer.attn.c_attn(x).view(T, 3, -1, D).unbind(1)
            out = self.attention[i](q, k, v, cache.k[i], cache.v[i], meta, check=i == 0)
            x, residual = self.add_norm(out.view(T, H), layer.attn.c_proj, residual, layer.ln_2, fused)
            pending, down = self.mlp_act(layer.mlp, x, fused), layer.mlp.c_proj
        return down(pending), residual

    def add_norm(self, x, linear, residual, norm, fused: bool):
        """(norm(linear(x) + residual), the sum); `linear=None` adds x itself. Conv1D weights are [in, out]."""
        ops = self.kernels
        if linear is None:
            return ops.add_layer_norm(x, residual, norm.weight, norm.bias, self.eps)
        if fused:
            return ops.linear_add_norm(x, linear.weight, linear.bias, residual, norm.weight, norm.bias, self.eps,
                                       False, weight_layout="kn")
        return ops.add_layer_norm(linear(x), residual, norm.weight, norm.bias, self.eps)

    def mlp_act(self, mlp, x: torch.Tensor, fused: bool) -> torch.Tensor:
        """act(c_fc(x)); HF's gelu_new (eight element-wise ops) as the GEMM's epilogue, or one tanh-GELU op."""
        if not self.tanh_gelu:
            return mlp.act(mlp.c_fc(x))
        if fused:
            return self.kernels.linear_act(x, mlp.c_fc.weight, mlp.c_fc.bias, "gelu_tanh", weight_layout="kn")
        return F.gelu(mlp.c_fc(x), approximate="tanh")


def build_forward(causal_lm, kernels: SimpleNamespace, max_positions: int):
    """The engine forward for `causal_lm`'s family; other families are a clear error."""
    family = getattr(causal_lm.config, "model_type", None)
    if family == "gpt2":
        return GPT2Forward(causal_lm, kernels, max_positions)
    if family in LLAMA_FAMILY:
        return LlamaForward(causal_lm, kernels, max_positions)
    raise NotImplementedError(f"the paged engine supports the model families {FAMILIES}, got {family!r}")
