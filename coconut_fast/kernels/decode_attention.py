"""Paged decode attention: one query per sequence against its cached context, read through a block table.

One program per (sequence, kv head, split) handles all query heads of the GQA group together, so each K/V tile
is loaded once. With num_splits > 1 each split covers a slice of the context (flash-decoding) and writes a
partial result (normalised output and log-sum-exp), then counts itself in an atomic counter of its (sequence,
kv head); the split that arrives last merges the partials into `out` and puts the counter back to 0, so one
launch does the whole step and the counter buffer is reused by the next call (or CUDA-graph replay) as it is.

With `new_kv` the launch also appends the step's token: the split whose slice holds the last position
(context_lens[b] - 1) writes that kv head's new k and v into the cache and attends to them from registers, so no
program reads a cache entry another program writes. With `rope` as well, q and the new k are rotated first
(the math of `rope_write_kv`).
"""

import functools

import torch

from ._common import (expect, expect_failed, expect_out, expect_queries_and_cache, expect_same_device,
                      expect_tensor, gather_context, require_triton, tl, triton)
from .kv_write import check_kv_args, check_rope_args, rope_write_kv_reference, write_kv_reference

LOG2E = 1.4426950408889634
# tokens per K/V tile: 64, or 32 in float32, whose "ieee" dots run as FMA loops in registers (64 spills there)
BLOCK_N = {torch.float32: 32, torch.float16: 64, torch.bfloat16: 64}
# DOT_NOTE: the tl.dot operands stay in the input dtype. fp16/bf16 q and k go to the tensor cores as they are
# (exact products, float32 sums) and the scale multiplies the float32 scores; p is rounded to the input dtype for
# the p @ v product, as flash-attention does. float32 inputs use "ieee" (tf32 would round q, k, p to 10 bits).


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                                     num_splits: int | None = None, out: torch.Tensor | None = None, new_kv=None,
                                     rope=None, max_context: int | None = None, counters=None, check: bool = True):
    """Plain torch. With new_kv = (k, v, slot_mapping) the new token is written first (write_kv_reference, or with
    rope = (positions, cos, sin) rope_write_kv_reference, which also rotates q); then each context is gathered
    from the block table and attended in float32. num_splits, max_context, counters and check are ignored."""
    if new_kv is not None:
        k, v, slot_mapping = new_kv
        if rope is not None:
            q = rope_write_kv_reference(q, k, v, k_cache, v_cache, slot_mapping, *rope)
        else:
            write_kv_reference(k, v, k_cache, v_cache, slot_mapping)
    B, Hq = q.shape[:2]
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
def _rope(x, partner, cos, sin, first_half):
    """HF rotate_half in float32 on whole rows: x*cos - partner*sin in the first half, x*cos + partner*sin in the
    second, where `partner` holds the element HALF away (the products and sum of the reference, in its order)."""
    return x * cos + tl.where(first_half, -partner, partner) * sin


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
    part_out_ptr, part_lse_ptr, counters_ptr,  # SPLIT only
    k_new_ptr, v_new_ptr, slot_mapping_ptr,  # APPEND only
    positions_ptr, cos_ptr, sin_ptr,  # ROPE only
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    num_splits,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ob, stride_oh,
    stride_knb, stride_knh, stride_vnb, stride_vnh,
    stride_cos, stride_sin,
    NUM_HEADS: tl.constexpr,  # partials: contiguous [B, Hq, num_splits, HEAD_DIM] outputs, [B, Hq, num_splits] lse
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, APPEND: tl.constexpr, ROPE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    heads = kv_head * GROUP + tl.arange(0, BLOCK_H)
    head_ok = tl.arange(0, BLOCK_H) < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_mask = head_ok[:, None] & dim_ok[None, :]

    context_len = tl.load(context_lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(context_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(context_len, start + per_split)

    q_rows = q_ptr + seq * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_rows + dims[None, :], mask=q_mask, other=0.0)  # unscaled, in its dtype: see DOT_NOTE
    if ROPE:
        HALF: tl.constexpr = HEAD_DIM // 2
        first_half = dims < HALF
        partner_dims = tl.where(first_half, dims + HALF, dims - HALF)
        position = tl.load(positions_ptr + seq)
        cos = tl.load(cos_ptr + position * stride_cos + dims % HALF, mask=dim_ok, other=0.0)
        sin = tl.load(sin_ptr + position * stride_sin + dims % HALF, mask=dim_ok, other=0.0)
        q_partner = tl.load(q_rows + partner_dims[None, :], mask=q_mask, other=0.0)
        q = _rope(q.to(tl.float32), q_partner.to(tl.float32), cos[None, :], sin[None, :],
                  first_half[None, :]).to(q_ptr.dtype.element_ty)  # rounded as rope_write_kv rounds it

    # The new token (APPEND): the split holding the last position takes it from registers when it is written
    # (slot >= 0); a padding row (slot < 0) writes nothing and attends to what the cache holds, as the reference.
    last = context_len - 1
    cache_end = end
    if APPEND:
        slot = tl.load(slot_mapping_ptr + seq)
        cache_end = tl.where(slot >= 0, tl.minimum(end, last), end)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    offsets = tl.arange(0, BLOCK_N)
    # the block ids of the next tile are loaded while this one computes, so a tile's K/V loads wait on no table read
    blocks = tl.load(table + (start + offsets) // BLOCK_SIZE, mask=start + offsets < cache_end, other=0)
    for tile_start in range(start, cache_end, BLOCK_N):
        tokens = tile_start + offsets
        token_ok = tokens < cache_end
        kv_mask = token_ok[:, None] & dim_ok[None, :]
        rows = blocks[:, None].to(tl.int64)
        in_block = (tokens % BLOCK_SIZE)[:, None]
        k = tl.load(k_cache_ptr + rows * stride_kb + in_block * stride_kt + kv_head * stride_kh + dims[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + rows * stride_vb + in_block * stride_vt + kv_head * stride_vh + dims[None, :],
                    mask=kv_mask, other=0.0)
        blocks = tl.load(table + (tokens + BLOCK_N) // BLOCK_SIZE, mask=tokens + BLOCK_N < cache_end, other=0)

        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BLOCK_H, BLOCK_N], float32
        scores = tl.where(token_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: every tile holds at least one token
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new

    if APPEND:
        covers = (start <= last) & (last < end)
        # a row with no context still writes its slot (split 0 does), as write_kv would
        if (slot >= 0) & (covers | ((context_len <= 0) & (split == 0))):
            k_row = k_new_ptr + seq * stride_knb + kv_head * stride_knh
            k_new = tl.load(k_row + dims, mask=dim_ok, other=0.0)
            v_new = tl.load(v_new_ptr + seq * stride_vnb + kv_head * stride_vnh + dims, mask=dim_ok, other=0.0)
            if ROPE:
                k_partner = tl.load(k_row + partner_dims, mask=dim_ok, other=0.0)
                k_new = _rope(k_new.to(tl.float32), k_partner.to(tl.float32), cos, sin,
                              first_half).to(k_new_ptr.dtype.element_ty)
            cache_row = (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
            tl.store(k_cache_ptr + cache_row + dims, k_new.to(k_cache_ptr.dtype.element_ty), mask=dim_ok)
            cache_row = (slot // BLOCK_SIZE) * stride_vb + (slot % BLOCK_SIZE) * stride_vt + kv_head * stride_vh
            tl.store(v_cache_ptr + cache_row + dims, v_new.to(v_cache_ptr.dtype.element_ty), mask=dim_ok)
            if covers:  # one more key for the online softmax, in float32
                s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * qk_scale
                m_new = tl.maximum(m, s_new)
                alpha = tl.exp2(m - m_new)
                p_new = tl.exp2(s_new - m_new)
                l = l * alpha + p_new
                acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
                m = m_new

    result = acc / tl.where(l > 0, l, 1.0)[:, None]  # an empty context or split gives zeros, never NaN
    out_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :]
    if SPLIT:
        first = (seq * NUM_HEADS + heads) * num_splits  # this (sequence, head)'s split 0 in the partials
        tl.store(part_out_ptr + (first + split)[:, None] * HEAD_DIM + dims[None, :], result, mask=q_mask)
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))  # -inf: an empty split
        tl.store(part_lse_ptr + first + split, lse, mask=head_ok)
        # every thread's partial stores come before the release of the count (the barrier orders them CTA-wide)
        tl.debug_barrier()
        counter = counters_ptr + seq * tl.num_programs(1) + kv_head
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == num_splits - 1:  # the last split of this (sequence, kv head): all partials are written
            top = tl.full([BLOCK_H], float("-inf"), tl.float32)
            for s in range(num_splits):  # .cg: read the other programs' partials from L2, never a stale L1
                top = tl.maximum(top, tl.load(part_lse_ptr + first + s, mask=head_ok, other=float("-inf"),
                                              cache_modifier=".cg"))
            top = tl.where(top == float("-inf"), 0.0, top)
            total = tl.zeros([BLOCK_H], tl.float32)
            merged = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
            for s in range(num_splits):
                weight = tl.exp2(tl.load(part_lse_ptr + first + s, mask=head_ok, other=float("-inf"),
                                         cache_modifier=".cg") - top)  # empty splits weigh 0
                part = tl.load(part_out_ptr + (first + s)[:, None] * HEAD_DIM + dims[None, :], mask=q_mask,
                               other=0.0, cache_modifier=".cg")
                total += weight
                merged += part * weight[:, None]
            merged = merged / tl.where(total > 0, total, 1.0)[:, None]
            tl.store(out_ptrs, merged.to(out_ptr.dtype.element_ty), mask=q_mask)
            tl.store(counter, 0)  # ready for the next launch
    else:
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=q_mask)


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """The GPU's SM count (once per device), or an H100's 132 where there is no GPU."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def default_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Split the context only when (sequence, kv head) programs alone would leave the GPU's SMs idle: about two
    programs per SM, each split at least 256 tokens (four tiles), at most 16 splits. A host computation only."""
    sms = multiprocessor_count(device)
    programs = batch * num_kv_heads
    if programs >= sms or max_context <= 512:
        return 1
    return max(1, min(16, triton.cdiv(max_context, 256), triton.cdiv(2 * sms, programs)))


_COUNTERS: dict = {}  # device -> int32 zeros, the split counters of every launch on that device
_RETIRED_COUNTERS: list = []  # outgrown buffers stay allocated: a captured CUDA graph may still use them


def split_counters(device: torch.device, count: int) -> torch.Tensor:
    """A persistent int32 buffer of at least `count` zeros on `device`. The merging split of each launch puts its
    counter back to 0, so it is allocated (and zeroed) once, then grows only for a larger batch: make the first
    call of a shape before a CUDA-graph capture. Launches on several streams at once need their own (`counters`)."""
    buffer = _COUNTERS.get(device)
    if buffer is None or buffer.numel() < count:
        if buffer is not None:
            _RETIRED_COUNTERS.append(buffer)
        buffer = torch.zeros(max(1024, triton.next_power_of_2(count)), dtype=torch.int32, device=device)
        _COUNTERS[device] = buffer
    return buffer


def check_decode_args(q, k_cache, v_cache, block_tables, context_lens, num_splits, out, new_kv=None, rope=None,
                      max_context=None, counters=None) -> None:
    expect_queries_and_cache(q, k_cache, v_cache)
    B = q.shape[0]
    expect_tensor(block_tables, "block_tables", 2, (torch.int32,))
    if block_tables.shape[0] != B:
        expect_failed("block_tables", f"{B} rows (the batch of q)", tuple(block_tables.shape))
    if block_tables.stride(-1) != 1:
        expect_failed("block_tables", "a contiguous last dimension", block_tables.stride())
    expect_tensor(context_lens, "context_lens", 1, (torch.int32,))
    if context_lens.shape[0] != B:
        expect_failed("context_lens", f"{B} entries (the batch of q)", tuple(context_lens.shape))
    if not (num_splits is None or (isinstance(num_splits, int) and num_splits >= 1)):
        expect_failed("num_splits", "None or an int >= 1", num_splits)
    if not (max_context is None or (isinstance(max_context, int) and max_context >= 0)):
        expect_failed("max_context", "None or an int >= 0 (the longest context of the batch)", max_context)
    expect_same_device(q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens)
    expect_out(out, q)
    if counters is not None:
        count = B * k_cache.shape[2]
        if not (isinstance(counters, torch.Tensor) and counters.dtype == torch.int32 and counters.dim() == 1
                and counters.is_contiguous() and counters.numel() >= count and counters.device == q.device):
            expect_failed("counters", f"None or a contiguous int32 vector of >= {count} zeros (batch x kv heads) "
                          f"on {q.device}", lambda: (getattr(counters, "shape", None),
                                                     getattr(counters, "dtype", None)))
    if new_kv is None:
        expect(rope is None, "rope", "None without new_kv (it rotates q and the new k)", type(rope).__name__)
        return
    expect(isinstance(new_kv, (tuple, list)) and len(new_kv) == 3, "new_kv", "None or a (k, v, slot_mapping) tuple",
           lambda: type(new_kv).__name__)
    k, v, slot_mapping = new_kv
    if rope is None:
        check_kv_args(k, v, k_cache, v_cache, slot_mapping)
    else:
        expect(isinstance(rope, (tuple, list)) and len(rope) == 3, "rope", "None or a (positions, cos, sin) tuple",
               lambda: type(rope).__name__)
        check_rope_args(q, k, v, k_cache, v_cache, slot_mapping, *rope)
    expect(k.shape[0] == B, "new_kv", lambda: f"k and v of {B} rows (the batch of q)", lambda: tuple(k.shape))
    expect_same_device(q, new_kv=k)


def decode_buffers(q, k_cache, block_tables, num_splits, out, max_context=None, counters=None):
    """(num_splits, out, partial outputs, partial log-sum-exps, split counters) of a launch. The split count
    defaults to the heuristic on max_context (else the table's capacity): no device sync. The partials are float32
    [B, Hq, splits, D] and [B, Hq, splits]; the partials and counters are None when the context is not split."""
    B, Hq, D = q.shape
    if num_splits is None:
        longest = block_tables.shape[1] * k_cache.shape[1] if max_context is None else max_context
        num_splits = default_num_splits(B, k_cache.shape[2], longest, q.device)
    out = torch.empty_like(q) if out is None else out
    if num_splits == 1:
        return 1, out, None, None, None
    part_out = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    if counters is None:
        counters = split_counters(q.device, B * k_cache.shape[2])
    return num_splits, out, part_out, part_lse, counters


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                           num_splits: int | None = None, out: torch.Tensor | None = None, new_kv=None, rope=None,
                           max_context: int | None = None, counters: torch.Tensor | None = None,
                           check: bool = True):
    """q [B, Hq, D] attends to context_lens[b] cached tokens of sequence b -> out [B, Hq, D] (fp32 accumulation),
    in one launch.

    new_kv = (k, v, slot_mapping): the step's k, v [B, Hkv, D] go to cache slot slot_mapping[b] (int64; < 0
    writes nothing) before attention; context_lens count the new token, whose slot is that of position
    context_lens[b] - 1. rope = (positions, cos, sin) (with new_kv): q and k are rotated at positions [B] (int64)
    with the float32 [P, D/2] tables first. q, k and v may be strided views (a contiguous last dimension).
    max_context: the longest context of the batch, known on the host; it sets the default split count.
    counters: int32 zeros (>= B * Hkv) for the split merge; by default a buffer kept per device.
    check=False skips the argument checks (for a caller that checked the step's first call)."""
    if check:
        check_decode_args(q, k_cache, v_cache, block_tables, context_lens, num_splits, out, new_kv, rope,
                          max_context, counters)
    require_triton(q)
    B, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    num_splits, out, part_out, part_lse, counters = decode_buffers(q, k_cache, block_tables, num_splits, out,
                                                                   max_context, counters)
    if B == 0:
        return out
    k_new, v_new, slot_mapping = new_kv if new_kv is not None else (q, q, context_lens)  # placeholders: not read
    positions, cos, sin = rope if rope is not None else (context_lens, q, q)
    split = num_splits > 1
    if not split:
        part_out = part_lse = counters = out
    block_d = max(16, triton.next_power_of_2(D))
    _decode_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse, counters,
        k_new, v_new, slot_mapping, positions, cos, sin,
        scale * LOG2E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        cos.stride(0), sin.stride(0),
        NUM_HEADS=Hq, GROUP=group, HEAD_DIM=D, BLOCK_SIZE=block_size,
        BLOCK_H=max(16, triton.next_power_of_2(group)),  # tl.dot needs at least 16 rows
        BLOCK_D=block_d, BLOCK_N=BLOCK_N[q.dtype], SPLIT=split, APPEND=new_kv is not None, ROPE=rope is not None,
        num_warps=8 if q.dtype == torch.float32 and block_d >= 128 else 4,
    )
    return out
