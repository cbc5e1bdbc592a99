"""Paged prefill attention: the new tokens of each sequence attend causally to its whole cached context.

The query rows of sequence b are its last q_len_b positions, so a cached shared prefix or a recomputed
(preempted) request is just a longer context. flash-attn's varlen kernel runs it when installed and usable
(CUDA, fp16/bf16, cache blocks a multiple of 256 tokens); otherwise the Triton kernel below does.
"""

import inspect

import torch

from ._common import (expect, expect_out, expect_queries_and_cache, expect_same_device, expect_tensor,
                      gather_context, load_kv_tile, require_triton, tl, triton)

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:  # flash-attn is optional
    flash_attn_varlen_func = None

LOG2E = 1.4426950408889634
# DOT_NOTE (as in decode_attention): tl.dot operands in the input dtype, float32 sums, the scale on the float32
# scores, p rounded to the input dtype for p @ v; float32 inputs use "ieee", never tf32.
FLASH_PAGE_MULTIPLE = 256  # flash-attn 2 reads a paged cache only with blocks of a multiple of 256 tokens


def paged_prefill_attention_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale: float,
                                      out: torch.Tensor | None = None):
    """Plain torch: the query rows of sequence b are its last q_len positions; causal attention in float32."""
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q) if out is None else out
    for b in range(len(context_lens)):
        start, end, n = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(context_lens[b])
        k = gather_context(k_cache, block_tables[b], n).repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = gather_context(v_cache, block_tables[b], n).repeat_interleave(group, dim=1)
        scores = torch.einsum("lhd,nhd->hln", q[start:end].float(), k) * scale
        q_pos = torch.arange(n - (end - start), n, device=q.device)
        visible = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]  # [L, n]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[start:end] = torch.einsum("hln,nhd->lhd", probs, v).to(out.dtype)
    return out


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_q_ptr, context_lens_ptr, out_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    num_seqs,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # A program takes BLOCK_Q query tokens times the GROUP query heads of one kv head (BLOCK_M rows), so each
    # K/V tile is loaded once per group. Query tiles are numbered over the whole batch: sequence b owns tiles
    # from cu_seqlens_q[b] // BLOCK_Q + b on, room for its cdiv(q_len, BLOCK_Q) tiles; a binary search finds it.
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    lo: tl.int32 = 0  # typed, so the loop carries an int32 tensor from the start
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    token_start = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if token_start < q_len:
        context_len = tl.load(context_lens_ptr + seq)
        rows = tl.arange(0, BLOCK_M)
        tokens = token_start + rows // GROUP
        heads = kv_head * GROUP + rows % GROUP
        row_ok = (rows < BLOCK_Q * GROUP) & (tokens < q_len)
        q_pos = context_len - q_len + tokens  # positions of the query rows in the context
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        row_mask = row_ok[:, None] & dim_ok[None, :]

        q_offsets = (q_start + tokens)[:, None].to(tl.int64) * stride_qt + heads[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptr + q_offsets, mask=row_mask, other=0.0)  # unscaled, in its dtype: see DOT_NOTE

        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        key_end = tl.minimum(context_len, context_len - q_len + token_start + BLOCK_Q)  # past the last row's keys
        for key_start in range(0, key_end, BLOCK_N):
            keys = key_start + tl.arange(0, BLOCK_N)
            key_ok = keys < key_end
            k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt, stride_kb, stride_kt,
                                stride_kh, stride_vb, stride_vt, stride_vh, kv_head, keys, key_ok, dims, dim_ok,
                                BLOCK_SIZE)

            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BLOCK_M, BLOCK_N], float32
            visible = key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees no key yet stays at zero
            alpha = tl.exp2(m - m_safe)
            p = tl.exp2(scores - m_safe[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m = m_new

        result = acc / tl.where(l > 0, l, 1.0)[:, None]
        out_offsets = (q_start + tokens)[:, None].to(tl.int64) * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + out_offsets, result.to(out_ptr.dtype.element_ty), mask=row_mask)


def check_prefill_args(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out) -> None:
    expect_queries_and_cache(q, k_cache, v_cache)
    expect_tensor(context_lens, "context_lens", 1, (torch.int32,))
    B = context_lens.shape[0]
    expect_tensor(cu_seqlens_q, "cu_seqlens_q", 1, (torch.int32,))
    expect(cu_seqlens_q.shape[0] == B + 1, "cu_seqlens_q", f"{B + 1} entries (batch of context_lens + 1)",
           tuple(cu_seqlens_q.shape))
    expect_tensor(block_tables, "block_tables", 2, (torch.int32,))
    expect(block_tables.shape[0] == B, "block_tables", f"{B} rows (the batch of context_lens)",
           tuple(block_tables.shape))
    expect(block_tables.stride(-1) == 1, "block_tables", "a contiguous last dimension", block_tables.stride())
    expect_same_device(q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                       cu_seqlens_q=cu_seqlens_q, context_lens=context_lens)
    expect_out(out, q)


def flash_attn_usable(q, k_cache) -> bool:
    """flash-attn installed, with paged-cache support, and the inputs within what its kernel accepts."""
    return (flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and k_cache.shape[1] % FLASH_PAGE_MULTIPLE == 0 and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
            and "block_table" in inspect.signature(flash_attn_varlen_func).parameters)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale: float,
                            out: torch.Tensor | None = None):
    """q [T, Hq, D] (rows cu_seqlens_q[b]:cu_seqlens_q[b+1] are the last tokens of sequence b) -> out [T, Hq, D]."""
    check_prefill_args(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out)
    if flash_attn_usable(q, k_cache):
        cu_seqlens_k = torch.nn.functional.pad(context_lens.cumsum(0, dtype=torch.int32), (1, 0))
        q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        result = flash_attn_varlen_func(
            q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, int(q_lens.max()), int(context_lens.max()),
            softmax_scale=scale, causal=True, block_table=block_tables,
        )
        return result if out is None else out.copy_(result)
    require_triton(q)
    T, Hq, D = q.shape
    B = context_lens.shape[0]
    out = torch.empty_like(q) if out is None else out
    if T == 0 or B == 0:
        return out
    group = Hq // k_cache.shape[2]
    block_m = max(64, triton.next_power_of_2(group))
    block_q = block_m // group  # query tokens per program: all heads of a kv group share one K/V read
    _prefill_kernel[(T // block_q + B, k_cache.shape[2])](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        scale * LOG2E, B,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=D, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=max(16, triton.next_power_of_2(D)),
    )
    return out
