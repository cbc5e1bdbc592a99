"""KV cache writes, plain and fused with RoPE (Triton, interpreted on CPU; their CUDA twins on a GPU with the
extension), against their torch references."""
import pytest
import torch

from coconut_fast.kernels import (rope_write_kv, rope_write_kv_cuda, rope_write_kv_reference, write_kv, write_kv_cuda,
                                  write_kv_reference)
from kernel_cases import DEVICE, DTYPES, assert_close, implementations, needs_triton, randn

NUM_BLOCKS = 6
PADDING = (2, 5)  # tokens whose slot is negative: nothing of them may reach the cache


def tokens_and_cache(block_size, num_kv_heads, head_dim, dtype, num_tokens=9, seed=0):
    """Random k, v; a random cache; shuffled slots over non-contiguous blocks, two of them negative. The slots
    to be written are poisoned with NaN first, so a missed write shows."""
    gen = torch.Generator().manual_seed(seed)
    k = randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, seed=seed + 1)
    v = randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, seed=seed + 2)
    shape = (NUM_BLOCKS, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = randn(*shape, dtype=dtype, seed=seed + 3), randn(*shape, dtype=dtype, seed=seed + 4)
    slots = torch.randperm(NUM_BLOCKS * block_size, generator=gen)[:num_tokens]
    slots[list(PADDING)] = torch.tensor([-1, -7])
    slots = slots.to(DEVICE)
    kept = slots[slots >= 0]
    for cache in (k_cache, v_cache):
        cache[kept // block_size, kept % block_size] = float("nan")
    return k, v, k_cache, v_cache, slots


@pytest.mark.parametrize("write", implementations(write_kv, write_kv_cuda))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads", [1, 3])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_write_kv_matches_reference(block_size, head_dim, num_kv_heads, dtype, write):
    k, v, k_cache, v_cache, slots = tokens_and_cache(block_size, num_kv_heads, head_dim, dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    write_kv_reference(k, v, expected_k, expected_v, slots)
    write(k, v, k_cache, v_cache, slots)
    assert not k_cache.isnan().any() and not v_cache.isnan().any()
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)  # a copy: exact


@pytest.mark.parametrize("write", implementations(write_kv, write_kv_cuda))
def test_negative_slots_write_nothing(write):
    k, v, k_cache, v_cache, _ = tokens_and_cache(16, 2, 64, torch.float32)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    write(k, v, k_cache, v_cache, torch.full((k.shape[0],), -1, dtype=torch.int64, device=DEVICE))
    torch.testing.assert_close(k_cache, before_k, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, before_v, equal_nan=True, atol=0, rtol=0)


def rope_tables(head_dim, positions=40, seed=5):
    angles = torch.rand(positions, head_dim // 2, generator=torch.Generator().manual_seed(seed)) * 40
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


@pytest.mark.parametrize("rope_write", implementations(rope_write_kv, rope_write_kv_cuda))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_rope_write_kv_matches_reference(block_size, head_dim, gqa, dtype, rope_write):
    num_kv_heads = 2 if gqa == 4 else 1
    k, v, k_cache, v_cache, slots = tokens_and_cache(block_size, num_kv_heads, head_dim, dtype)
    q = randn(k.shape[0], num_kv_heads * gqa, head_dim, dtype=dtype, seed=9)
    positions = torch.randperm(40, generator=torch.Generator().manual_seed(6))[:k.shape[0]].to(DEVICE)
    cos, sin = rope_tables(head_dim)
    expected_k, expected_v = k_cache.float(), v_cache.float()
    expected_q = rope_write_kv_reference(q.float(), k.float(), v.float(), expected_k, expected_v, slots, positions,
                                         cos, sin)
    q_out = rope_write(q, k, v, k_cache, v_cache, slots, positions, cos, sin)
    assert_close(q_out, expected_q, dtype)
    assert_close(k_cache, expected_k, dtype)  # untouched entries are compared too
    assert torch.equal(v_cache.float(), expected_v)  # v is copied, not rotated


def test_rope_reference_matches_hf_llama3_rotary():
    """The reference's rotation against HF's apply_rotary_pos_emb with a llama3-scaled rotary embedding: the
    [P, D/2] tables are the first half of HF's cos/sin."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.arange(64)[None])  # [1, 64, D]
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(5, 4, 64, generator=gen), torch.randn(5, 2, 64, generator=gen)
    positions = torch.tensor([0, 3, 17, 40, 63])
    k_cache, v_cache = torch.zeros(4, 16, 2, 64), torch.zeros(4, 16, 2, 64)
    q_rot = rope_write_kv_reference(q, k, k, k_cache, v_cache, torch.arange(5), positions, cos[0, :, :32],
                                    sin[0, :, :32])
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[:, positions],
                                      sin[:, positions])
    torch.testing.assert_close(q_rot, hf_q[0].transpose(0, 1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(k_cache[0, :5], hf_k[0].transpose(0, 1), atol=1e-6, rtol=1e-5)


def bad_args(**override):
    k, v, k_cache, v_cache, slots = tokens_and_cache(16, 2, 64, torch.float32)
    cos, sin = rope_tables(64)
    args = dict(q=randn(9, 4, 64, dtype=torch.float32, seed=1), k=k, v=v, k_cache=k_cache, v_cache=v_cache,
                slot_mapping=slots, positions=torch.arange(9, device=DEVICE), cos=cos, sin=sin)
    args.update(override)
    return args


@pytest.mark.parametrize("name, value", [
    ("slot_mapping", torch.zeros(9, dtype=torch.int32, device=DEVICE)),
    ("slot_mapping", torch.zeros(8, dtype=torch.int64, device=DEVICE)),
    ("k", torch.zeros(9, 2, 32, device=DEVICE)),
    ("v", torch.zeros(9, 2, 64, dtype=torch.float16, device=DEVICE)),
    ("k_cache", torch.zeros(6, 16, 2, 64, dtype=torch.int8, device=DEVICE)),
])
def test_write_kv_bad_arguments_are_named(name, value):
    args = bad_args(**{name: value})
    with pytest.raises(ValueError, match=name):
        write_kv(args["k"], args["v"], args["k_cache"], args["v_cache"], args["slot_mapping"])


@pytest.mark.parametrize("name, value", [
    ("q", torch.zeros(9, 3, 64, device=DEVICE)),
    ("positions", torch.zeros(9, dtype=torch.int32, device=DEVICE)),
    ("cos", torch.zeros(40, 64, device=DEVICE)),
    ("sin", torch.zeros(40, 32, dtype=torch.float16, device=DEVICE)),
])
def test_rope_write_kv_bad_arguments_are_named(name, value):
    with pytest.raises(ValueError, match=name):
        rope_write_kv(**bad_args(**{name: value}))
