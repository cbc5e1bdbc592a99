"""Paged decode attention: one query per sequence against its cached context, read through a block table.

One program per (sequence, kv head, split) handles all query heads of the GQA group together, so each K/V tile
is loaded once. With num_splits > 1 each split covers a slice of the context (flash-decoding) and writes a
partial result (normalised output and log-sum-exp); a second small kernel merges the splits.
"""

import torch

from ._common import (expect, expect_out, expect_queries_and_cache, expect_same_device, expect_tensor,
                      gather_context, load_kv_tile, require_triton, tl, triton)

LOG2E = 1.4426950408889634
# DOT_NOTE: the tl.dot operands stay in the input dtype. fp16/bf16 q and k go to the tensor cores as they are
# (exact products, float32 sums) and the scale multiplies the float32 scores; p is rounded to the input dtype for
# the p @ v product, as flash-attention does. float32 inputs use "ieee" (tf32 would round q, k, p to 10 bits).


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                                     num_splits: int | None = None, out: torch.Tensor | None = None):
    """Plain torch: gather each context from the block table and attend in float32 (num_splits is ignored)."""
    B, Hq, D = q.shape
    group = Hq // k_cache.shape[2]
    out = torch.empty_like(q) if out is None else out
    for b in range(B):
        n = int(context_lens[b])
        k = gather_context(k_cache, block_tables[b], n).repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = gather_context(v_cache, block_tables[b], n).repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v).to(out.dtype)
    return out


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr,  # partials: contiguous [B, Hq, NUM_SPLITS, HEAD_DIM] outputs, [B, Hq, NUM_SPLITS] lse
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    heads = kv_head * GROUP + tl.arange(0, BLOCK_H)
    head_ok = tl.arange(0, BLOCK_H) < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM

    context_len = tl.load(context_lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(context_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(context_len, start + per_split)

    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)  # unscaled, in its dtype: see DOT_NOTE

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        token_ok = tokens < end
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt, stride_kb, stride_kt,
                            stride_kh, stride_vb, stride_vt, stride_vh, kv_head, tokens, token_ok, dims, dim_ok,
                            BLOCK_SIZE)

        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BLOCK_H, BLOCK_N], float32
        scores = tl.where(token_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: every tile holds at least one token
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new

    result = acc / tl.where(l > 0, l, 1.0)[:, None]  # an empty context or split gives zeros, never NaN
    out_mask = head_ok[:, None] & dim_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = (seq * NUM_HEADS + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], result, mask=out_mask)
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))  # -inf: an empty split
        tl.store(part_lse_ptr + part, lse, mask=head_ok)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < NUM_SPLITS
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    part = (seq * NUM_HEADS + head) * NUM_SPLITS + splits

    lse = tl.load(part_lse_ptr + part, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.exp2(lse - top)  # empty splits weigh 0
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None] & dim_ok[None, :],
                    other=0.0)
    total = tl.sum(weights, axis=0)
    result = tl.sum(parts * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, result.to(out_ptr.dtype.element_ty), mask=dim_ok)


def default_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Split the context only when (sequence, kv head) programs alone would leave the GPU's SMs idle."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    programs = batch * num_kv_heads
    if programs >= sms or max_context <= 512:
        return 1
    return max(1, min(16, triton.cdiv(max_context, 256), triton.cdiv(2 * sms, programs)))


def check_decode_args(q, k_cache, v_cache, block_tables, context_lens, num_splits, out) -> None:
    expect_queries_and_cache(q, k_cache, v_cache)
    B = q.shape[0]
    expect_tensor(block_tables, "block_tables", 2, (torch.int32,))
    expect(block_tables.shape[0] == B, "block_tables", f"{B} rows (the batch of q)", tuple(block_tables.shape))
    expect(block_tables.stride(-1) == 1, "block_tables", "a contiguous last dimension", block_tables.stride())
    expect_tensor(context_lens, "context_lens", 1, (torch.int32,))
    expect(context_lens.shape[0] == B, "context_lens", f"{B} entries (the batch of q)", tuple(context_lens.shape))
    expect(num_splits is None or (isinstance(num_splits, int) and num_splits >= 1), "num_splits",
           "None or an int >= 1", num_splits)
    expect_same_device(q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens)
    expect_out(out, q)


def decode_buffers(q, k_cache, block_tables, num_splits, out):
    """(num_splits, out, partial outputs, partial log-sum-exps): the split count defaults to the heuristic on the
    table's capacity (no device sync); the partials are float32 [B, Hq, splits, D] and [B, Hq, splits], or empty."""
    B, Hq, D = q.shape
    if num_splits is None:
        num_splits = default_num_splits(B, k_cache.shape[2], block_tables.shape[1] * k_cache.shape[1], q.device)
    out = torch.empty_like(q) if out is None else out
    splits = num_splits if num_splits > 1 else 0
    part_out = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)
    return num_splits, out, part_out, part_lse


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                           num_splits: int | None = None, out: torch.Tensor | None = None):
    """q [B, Hq, D] attends to context_lens[b] cached tokens of sequence b -> out [B, Hq, D] (fp32 accumulation)."""
    check_decode_args(q, k_cache, v_cache, block_tables, context_lens, num_splits, out)
    require_triton(q)
    B, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    num_splits, out, part_out, part_lse = decode_buffers(q, k_cache, block_tables, num_splits, out)
    if B == 0:
        return out
    block_h = max(16, triton.next_power_of_2(group))  # tl.dot needs at least 16 rows
    block_d = max(16, triton.next_power_of_2(D))
    if num_splits == 1:
        part_out = part_lse = out  # not read when the context is not split
    _decode_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        NUM_HEADS=Hq, GROUP=group, HEAD_DIM=D, BLOCK_SIZE=block_size, BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_N=64,
        NUM_SPLITS=num_splits,
    )
    if num_splits > 1:
        _merge_splits_kernel[(B, Hq)](
            part_out, part_lse, out, out.stride(0), out.stride(1),
            NUM_HEADS=Hq, HEAD_DIM=D, BLOCK_D=block_d,
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
        )
    return out
