"""Writing new keys and values into their cache slots, optionally rotating q and k with RoPE on the way.

One program per token: it reads the token's slot (negative = padding, nothing written) and copies all kv heads
at once; the RoPE variant also rotates every query and key head of the token with its position's cos/sin row.
"""

import torch

from ._common import expect, expect_paged_cache, expect_same_device, expect_tensor, require_triton, tl, triton


def write_kv_reference(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Plain torch: cache[slot // block_size, slot % block_size] = token, for every slot >= 0."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    k_cache[slots // block_size, slots % block_size] = k[keep].to(k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = v[keep].to(v_cache.dtype)


def _rotate(x, cos, sin):
    """HF rotate_half RoPE in float32: cat(x1*cos - x2*sin, x2*cos + x1*sin); cos, sin: [N, 1, D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope_write_kv_reference(q, k, v, k_cache, v_cache, slot_mapping, positions, cos, sin):
    """Plain torch: rotate q and k at `positions`, write rotated k and v to the cache, return rotated q."""
    c = cos[positions].float()[:, None, :]
    s = sin[positions].float()[:, None, :]
    write_kv_reference(_rotate(k, c, s), v, k_cache, v_cache, slot_mapping)
    return _rotate(q, c, s)


@triton.jit
def _cache_offsets(slot, heads, dims, stride_b, stride_t, stride_h, BLOCK_SIZE: tl.constexpr):
    return ((slot // BLOCK_SIZE) * stride_b + (slot % BLOCK_SIZE) * stride_t
            + heads[:, None] * stride_h + dims[None, :])


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot >= 0:
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_D)
        mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
        v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
        tl.store(k_cache_ptr + _cache_offsets(slot, heads, dims, stride_kcb, stride_kct, stride_kch, BLOCK_SIZE),
                 k, mask=mask)
        tl.store(v_cache_ptr + _cache_offsets(slot, heads, dims, stride_vcb, stride_vct, stride_vch, BLOCK_SIZE),
                 v, mask=mask)


@triton.jit
def _rotate_heads(x_ptr, heads, halves, mask, stride_h, cos, sin, HALF: tl.constexpr):
    """Load both halves of the given heads and rotate them in float32 (HF rotate_half convention)."""
    x1 = tl.load(x_ptr + heads[:, None] * stride_h + halves[None, :], mask=mask).to(tl.float32)
    x2 = tl.load(x_ptr + heads[:, None] * stride_h + HALF + halves[None, :], mask=mask).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, positions_ptr, cos_ptr, sin_ptr, q_out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_cos, stride_sin,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token)
    halves = tl.arange(0, BLOCK_HALF)
    half_ok = halves < HALF
    cos = tl.load(cos_ptr + position * stride_cos + halves, mask=half_ok)[None, :]
    sin = tl.load(sin_ptr + position * stride_sin + halves, mask=half_ok)[None, :]

    q_heads = tl.arange(0, BLOCK_HQ)
    q_mask = (q_heads < NUM_Q_HEADS)[:, None] & half_ok[None, :]
    q1, q2 = _rotate_heads(q_ptr + token * stride_qt, q_heads, halves, q_mask, stride_qh, cos, sin, HALF)
    q_out = q_out_ptr + token * stride_ot + q_heads[:, None] * stride_oh + halves[None, :]
    tl.store(q_out, q1.to(q_out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_out + HALF, q2.to(q_out_ptr.dtype.element_ty), mask=q_mask)

    slot = tl.load(slot_mapping_ptr + token)
    if slot >= 0:
        kv_heads = tl.arange(0, BLOCK_HKV)
        kv_mask = (kv_heads < NUM_KV_HEADS)[:, None] & half_ok[None, :]
        k1, k2 = _rotate_heads(k_ptr + token * stride_kt, kv_heads, halves, kv_mask, stride_kh, cos, sin, HALF)
        k_dst = k_cache_ptr + _cache_offsets(slot, kv_heads, halves, stride_kcb, stride_kct, stride_kch, BLOCK_SIZE)
        tl.store(k_dst, k1.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(k_dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
        v_src = v_ptr + token * stride_vt + kv_heads[:, None] * stride_vh + halves[None, :]
        v_dst = v_cache_ptr + _cache_offsets(slot, kv_heads, halves, stride_vcb, stride_vct, stride_vch, BLOCK_SIZE)
        tl.store(v_dst, tl.load(v_src, mask=kv_mask), mask=kv_mask)
        tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=kv_mask), mask=kv_mask)


def check_kv_args(k, v, k_cache, v_cache, slot_mapping) -> None:
    expect_tensor(k, "k", 3)
    expect_tensor(v, "v", 3)
    expect_paged_cache(k_cache, v_cache)
    expect(k.shape[1:] == k_cache.shape[2:], "k", f"[N, {k_cache.shape[2]}, {k_cache.shape[3]}] (kv heads and "
           "head_dim of k_cache)", tuple(k.shape))
    expect(v.shape == k.shape, "v", f"the shape of k {tuple(k.shape)}", tuple(v.shape))
    expect(k.dtype == k_cache.dtype and v.dtype == k_cache.dtype, "k/v", f"the dtype of k_cache {k_cache.dtype}",
           (k.dtype, v.dtype))
    expect(k.stride(-1) == 1 and v.stride(-1) == 1, "k/v", "a contiguous last dimension", (k.stride(), v.stride()))
    expect_tensor(slot_mapping, "slot_mapping", 1, (torch.int64,))
    expect(slot_mapping.shape[0] == k.shape[0], "slot_mapping", f"{k.shape[0]} entries (tokens of k)",
           tuple(slot_mapping.shape))
    expect_same_device(k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Write k, v [N, Hkv, D] into the cache at slot_mapping [N] (slot = block * block_size + offset; < 0 skips)."""
    check_kv_args(k, v, k_cache, v_cache, slot_mapping)
    require_triton(k)
    N, Hkv, D = k.shape
    if N == 0:
        return
    _write_kv_kernel[(N,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=Hkv, HEAD_DIM=D, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(Hkv), BLOCK_D=triton.next_power_of_2(D),
    )


def check_rope_args(q, k, v, k_cache, v_cache, slot_mapping, positions, cos, sin) -> None:
    check_kv_args(k, v, k_cache, v_cache, slot_mapping)
    N, Hkv, D = k.shape
    expect_tensor(q, "q", 3)
    expect(q.shape[0] == N and q.shape[2] == D and q.shape[1] % Hkv == 0, "q",
           f"[{N}, a multiple of {Hkv}, {D}] (tokens and head_dim of k)", tuple(q.shape))
    expect(q.dtype == k.dtype, "q", f"the dtype of k {k.dtype}", q.dtype)
    expect(q.stride(-1) == 1, "q", "a contiguous last dimension", q.stride())
    expect(D % 2 == 0, "k", "an even head_dim", D)
    expect_tensor(positions, "positions", 1, (torch.int64,))
    expect(positions.shape[0] == N, "positions", f"{N} entries (tokens of k)", tuple(positions.shape))
    for name, table in (("cos", cos), ("sin", sin)):
        expect_tensor(table, name, 2, (torch.float32,))
        expect(table.shape[1] == D // 2 and table.stride(-1) == 1, name,
               f"a [P, {D // 2}] table (head_dim / 2) with a contiguous last dimension", tuple(table.shape))
    expect_same_device(k, q=q, positions=positions, cos=cos, sin=sin)


def rope_write_kv(q, k, v, k_cache, v_cache, slot_mapping, positions, cos, sin):
    """Rotate q [N, Hq, D] and k at `positions` with the cos/sin [P, D/2] tables, write k and v into the cache,
    return the rotated q."""
    check_rope_args(q, k, v, k_cache, v_cache, slot_mapping, positions, cos, sin)
    require_triton(k)
    N, Hkv, D = k.shape
    q_out = torch.empty_like(q)
    if N == 0:
        return q_out
    _rope_write_kv_kernel[(N,)](
        q, k, v, k_cache, v_cache, slot_mapping, positions, cos, sin, q_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), q_out.stride(0),
        q_out.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        NUM_Q_HEADS=q.shape[1], NUM_KV_HEADS=Hkv, HALF=D // 2, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_HQ=triton.next_power_of_2(q.shape[1]), BLOCK_HKV=triton.next_power_of_2(Hkv),
        BLOCK_HALF=triton.next_power_of_2(D // 2),
    )
    return q_out
