"""Paged decode attention (Triton, interpreted on CPU; its CUDA twin on a GPU with the extension) against its
float32 torch reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from coconut_fast.kernels import (paged_decode_attention, paged_decode_attention_cuda,
                                  paged_decode_attention_reference)
from coconut_fast.kernels.decode_attention import default_num_splits
from kernel_cases import (DEVICE, DTYPES, assert_close, implementations, needs_triton, paged_context, poisoned_like,
                          randn)

IMPLEMENTATIONS = implementations(paged_decode_attention, paged_decode_attention_cuda)

CONTEXTS = [1, 70]  # a ragged batch: a one-token context and a length that is not a multiple of the block size


def run_case(context_lens, block_size, head_dim, gqa, dtype, num_splits, seed=0, attend=paged_decode_attention):
    num_kv_heads = 2 if gqa == 4 else 1  # one case with several kv heads: each must read its own
    k_cache, v_cache, tables, lens = paged_context(context_lens, block_size, num_kv_heads, head_dim, dtype, seed)
    q = randn(len(context_lens), num_kv_heads * gqa, head_dim, dtype=dtype, seed=seed + 1)
    scale = 1 / math.sqrt(head_dim)
    out = poisoned_like(q)
    result = attend(q, k_cache, v_cache, tables, lens, scale, num_splits=num_splits, out=out)
    assert result is out
    expected = paged_decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables, lens, scale)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_matches_reference(block_size, head_dim, gqa, num_splits, dtype, attend):
    run_case(CONTEXTS, block_size, head_dim, gqa, dtype, num_splits, attend=attend)


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
def test_default_splits_on_a_long_table(attend):
    """With num_splits=None a 600-token context is split (the heuristic sees the table's capacity, 624 tokens
    here) and the merged result still matches."""
    assert default_num_splits(2, 2, 624, torch.device("cpu")) > 1
    run_case([600, 45], 16, 64, 4, torch.float32, None, attend=attend)


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
def test_more_splits_than_tiles_leaves_empty_splits_harmless(attend):
    run_case([1, 20], 16, 64, 4, torch.float32, 8, attend=attend)


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
@pytest.mark.parametrize("num_splits", [1, 2])
def test_empty_context_gives_zeros(num_splits, attend):
    """A padding row with no context yields zeros, as the reference does, and never NaN."""
    run_case([0, 17], 16, 64, 4, torch.float32, num_splits, attend=attend)


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_head_dims_and_long_contexts(dtype, attend):
    """head_dim 16 and 32 (the engine's tiny models) and 256 (16-bit: the CUDA kernel reads a row with one warp),
    with contexts over many blocks of 16."""
    for head_dim, gqa in ((16, 2), (32, 8), (256, 4)):
        if head_dim == 256 and dtype == torch.float32:
            continue
        run_case([1000, 3, 257], 16, head_dim, gqa, dtype, None, seed=head_dim, attend=attend)


@needs_triton
def test_small_and_odd_head_dims():
    """The engine's tiny models use head_dim 16; odd sizes are padded inside the kernel."""
    run_case([9, 33], 16, 16, 2, torch.float32, 1)
    run_case([9, 33], 32, 48, 3, torch.float32, 2)


def test_reference_matches_sdpa():
    """The reference itself against torch SDPA on the gathered, contiguous context."""
    k_cache, v_cache, tables, lens = paged_context([5, 21], 16, 2, 64, torch.float32, seed=3)
    q = randn(2, 8, 64, dtype=torch.float32, seed=4)
    out = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, 0.1)
    for b, n in enumerate(lens.tolist()):
        k = k_cache[tables[b, :2].long()].flatten(0, 1)[:n].transpose(0, 1)  # [Hkv, n, D]
        v = v_cache[tables[b, :2].long()].flatten(0, 1)[:n].transpose(0, 1)
        sdpa = F.scaled_dot_product_attention(q[b][:, None], k.repeat_interleave(4, 0), v.repeat_interleave(4, 0),
                                              scale=0.1)
        torch.testing.assert_close(out[b], sdpa[:, 0], atol=1e-6, rtol=1e-5)


def bad_args(**override):
    k_cache, v_cache, tables, lens = paged_context([3, 5], 16, 2, 64, torch.float32, seed=0)
    args = dict(q=randn(2, 4, 64, dtype=torch.float32, seed=1), k_cache=k_cache, v_cache=v_cache,
                block_tables=tables, context_lens=lens, scale=0.1)
    args.update(override)
    return args


@pytest.mark.parametrize("name, value", [
    ("q", torch.zeros(2, 4, 32, device=DEVICE)),  # head_dim differs from the cache
    ("q", torch.zeros(2, 3, 64, device=DEVICE)),  # 3 heads over 2 kv heads
    ("q", torch.zeros(2, 4, 64, dtype=torch.float16, device=DEVICE)),  # dtype differs from the cache
    ("block_tables", torch.zeros(2, 2, dtype=torch.int64, device=DEVICE)),
    ("block_tables", torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)),
    ("context_lens", torch.ones(3, dtype=torch.int32, device=DEVICE)),
    ("context_lens", torch.ones(2, dtype=torch.float32, device=DEVICE)),
    ("v_cache", torch.zeros(8, 16, 2, 64, dtype=torch.int32, device=DEVICE)),
    ("num_splits", 0),
    ("out", torch.zeros(2, 4, 64, dtype=torch.float16, device=DEVICE)),
])
def test_bad_arguments_are_named(name, value):
    with pytest.raises(ValueError, match=name):
        paged_decode_attention(**bad_args(**{name: value}))
