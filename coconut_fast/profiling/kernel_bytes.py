"""Bytes each engine kernel must read and write, from its arguments (not the whole cache: the live K/V).

One model per kernel name of the engine's kernel namespace; the same models serve the Triton, CUDA and
torch-reference implementations, so their kernel_bytes compare like for like.
"""
from __future__ import annotations

import torch


def nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def row_bytes(cache: torch.Tensor) -> int:
    """Bytes of one token's K (or V) in a paged pool [blocks, block_size, kv_heads, head_dim]."""
    return cache.shape[2] * cache.shape[3] * cache.element_size()


def live_kv(k_cache, context_lens) -> int:
    return 2 * int(context_lens.sum()) * row_bytes(k_cache)


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None, out=None,
                     new_kv=None, rope=None, **_) -> int:
    """q in, out back, the live K/V and block tables read once; an appended token's k and v read and written
    (its cached copy is not read back), a cos/sin row per row with RoPE."""
    moved = 2 * nbytes(q) + live_kv(k_cache, context_lens) + nbytes(block_tables) + nbytes(context_lens)
    if new_kv is not None:
        k, v, slots = new_kv
        moved += (nbytes(k) + nbytes(v)) + nbytes(slots)  # written where the read of the cached copy would be
    if rope is not None:
        positions, cos, _ = rope
        moved += nbytes(positions) + 2 * positions.numel() * cos.shape[1] * cos.element_size()
    return moved


def prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, out=None) -> int:
    return 2 * nbytes(q) + live_kv(k_cache, context_lens) + nbytes(block_tables) + nbytes(context_lens)


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> int:
    return 2 * (nbytes(k) + nbytes(v)) + nbytes(slot_mapping)


def rope_write_kv(q, k, v, k_cache, v_cache, slot_mapping, positions, cos, sin) -> int:
    """q rotated in place or into a new tensor (read + write), k and v into the cache, a cos/sin row per token."""
    table_rows = 2 * positions.numel() * cos.shape[1] * cos.element_size()
    return 2 * (nbytes(q) + nbytes(k) + nbytes(v)) + nbytes(slot_mapping) + nbytes(positions) + table_rows


def add_norm(x, residual, weight, *rest) -> int:
    """x (+ residual) in; the normed rows and the new residual out; the weights (and bias)."""
    bias = rest[0] if len(rest) == 2 else None
    return nbytes(x) * (3 if residual is not None else 1) + nbytes(x) + nbytes(weight) + nbytes(bias)


def latent_feedback(x, residual, weight, bias, eps, rms, thought_out, next_embeds, positions, context_lens,
                    slot_mapping, block_tables, block_size) -> int:
    meta = nbytes(positions) + nbytes(context_lens) + nbytes(slot_mapping)
    return nbytes(x) + nbytes(residual) + nbytes(weight) + nbytes(bias) + 2 * nbytes(thought_out) + 2 * meta


def linear_act(*args, **kwargs) -> int:
    from ..kernels.fused_linear import linear_act_bytes

    return linear_act_bytes(*args, **kwargs)


def linear_add_norm(*args, **kwargs) -> int:
    from ..kernels.fused_linear import linear_add_norm_bytes

    return linear_add_norm_bytes(*args, **kwargs)


KERNEL_BYTES = {
    "linear_act": linear_act,
    "linear_add_norm": linear_add_norm,
    "paged_decode_attention": decode_attention,
    "paged_prefill_attention": prefill_attention,
    "write_kv": write_kv,
    "rope_write_kv": rope_write_kv,
    "add_rms_norm": add_norm,
    "add_layer_norm": add_norm,
    "latent_feedback": latent_feedback,
}
