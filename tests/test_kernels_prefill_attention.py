"""Paged prefill attention (Triton; interpreted on CPU) against its float32 torch reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from coconut_fast.kernels import paged_prefill_attention, paged_prefill_attention_reference
from coconut_fast.kernels.prefill_attention import flash_attn_usable
from kernel_cases import DEVICE, DTYPES, assert_close, needs_triton, paged_context, poisoned_like, randn

# (new query tokens, context length incl. them): a one-token prompt, new tokens after a cached prefix,
# a whole prompt, all with lengths that are not multiples of the block size
SEQS = [(1, 1), (5, 37), (23, 23)]


def run_case(seqs, block_size, head_dim, gqa, dtype, seed=0):
    num_kv_heads = 2 if gqa == 4 else 1  # one case with several kv heads: each must read its own
    q_lens, context_lens = zip(*seqs)
    k_cache, v_cache, tables, lens = paged_context(context_lens, block_size, num_kv_heads, head_dim, dtype, seed)
    cu_seqlens_q = F.pad(torch.tensor(q_lens).cumsum(0), (1, 0)).to(torch.int32).to(DEVICE)
    q = randn(sum(q_lens), num_kv_heads * gqa, head_dim, dtype=dtype, seed=seed + 1)
    scale = 1 / math.sqrt(head_dim)
    out = poisoned_like(q)
    result = paged_prefill_attention(q, k_cache, v_cache, tables, cu_seqlens_q, lens, scale, out=out)
    assert result is out
    expected = paged_prefill_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables, cu_seqlens_q,
                                                 lens, scale)
    assert_close(out, expected, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_matches_reference(block_size, head_dim, gqa, dtype):
    run_case(SEQS, block_size, head_dim, gqa, dtype)


@needs_triton
def test_query_tiles_across_sequences():
    """Queries longer than one 64-row tile, at offsets that are not tile-aligned, and a sequence with no
    new tokens in the middle of the batch."""
    run_case([(3, 10), (70, 75), (0, 9), (66, 66)], 16, 64, 4, torch.float32)


@needs_triton
def test_small_and_odd_head_dims():
    """The engine's tiny models use head_dim 16 and blocks of a few tokens."""
    run_case([(4, 9), (7, 7)], 2, 16, 2, torch.float32)
    run_case([(4, 9), (7, 7)], 32, 48, 3, torch.float32)  # a group of 3 heads leaves padding rows


def test_reference_matches_sdpa():
    """The reference against torch SDPA: the last 6 of 20 positions, causal, with the prefix as context."""
    k_cache, v_cache, tables, lens = paged_context([20], 16, 2, 64, torch.float32, seed=3)
    q = randn(6, 4, 64, dtype=torch.float32, seed=4)
    cu = torch.tensor([0, 6], dtype=torch.int32, device=DEVICE)
    out = paged_prefill_attention_reference(q, k_cache, v_cache, tables, cu, lens, 0.1)
    k = k_cache[tables[0, :2].long()].flatten(0, 1)[:20].transpose(0, 1).repeat_interleave(2, 0)  # [Hq, 20, D]
    v = v_cache[tables[0, :2].long()].flatten(0, 1)[:20].transpose(0, 1).repeat_interleave(2, 0)
    mask = torch.arange(20, device=DEVICE)[None, :] <= torch.arange(14, 20, device=DEVICE)[:, None]
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=0.1)
    torch.testing.assert_close(out, sdpa.transpose(0, 1), atol=1e-6, rtol=1e-5)


def test_flash_attn_only_where_it_can_read_the_cache():
    k_cache = torch.zeros(4, 16, 2, 64, dtype=torch.float16, device=DEVICE)
    assert not flash_attn_usable(torch.zeros(3, 4, 64, dtype=torch.float16, device=DEVICE), k_cache)  # 16-token blocks


def bad_args(**override):
    k_cache, v_cache, tables, lens = paged_context([3, 5], 16, 2, 64, torch.float32, seed=0)
    args = dict(q=randn(4, 4, 64, dtype=torch.float32, seed=1), k_cache=k_cache, v_cache=v_cache,
                block_tables=tables, cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE),
                context_lens=lens, scale=0.1)
    args.update(override)
    return args


@pytest.mark.parametrize("name, value", [
    ("q", torch.zeros(4, 4, 32, device=DEVICE)),
    ("q", torch.zeros(4, 3, 64, device=DEVICE)),
    ("q", torch.zeros(4, 64, device=DEVICE)),
    ("cu_seqlens_q", torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)),
    ("cu_seqlens_q", torch.tensor([0, 2, 4], dtype=torch.int64, device=DEVICE)),
    ("block_tables", torch.zeros(2, 2, dtype=torch.int64, device=DEVICE)),
    ("context_lens", torch.ones(2, 1, dtype=torch.int32, device=DEVICE)),
    ("k_cache", torch.zeros(8, 16, 2, 64, dtype=torch.float16, device=DEVICE)),
])
def test_bad_arguments_are_named(name, value):
    with pytest.raises(ValueError, match=name):
        paged_prefill_attention(**bad_args(**{name: value}))
