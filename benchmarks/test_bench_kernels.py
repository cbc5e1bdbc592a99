"""Kernel timings on a CUDA device: each Triton kernel (and CUDA twin) against its torch reference (pytest-benchmark).

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-only \\
        --benchmark-json=benchmarks/results/kernels.json

Skipped without CUDA (the CPU interpreter says nothing about kernel speed). Shapes: a Llama-8B-like layer,
32 query heads over 8 kv heads of 128 dims, bf16, batch 64, every sequence with the same context of 512 to
4096 tokens in a cache of shuffled blocks.

Decode attention paths:
- triton: `paged_decode_attention`, blocks of 16 (and of 256, to compare with flash-attn on equal caches),
  with the split-K heuristic and with num_splits=1;
- cuda: `paged_decode_attention_cuda` from the compiled extension, the same blocks, when coconut_fast._C is built;
- reference: `paged_decode_attention_reference`, the same function the tests use;
- flash_attn: flash-attn's `flash_attn_with_kvcache` with a block table, when flash-attn imports (its paged
  cache needs blocks of a multiple of 256 tokens, so it runs on the 256-token cache);
- sdpa: without flash-attn, torch SDPA on the context gathered from the block table (gather included).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from coconut_fast.kernels import (
    add_rms_norm, add_rms_norm_reference, cuda_kernels_available, paged_decode_attention,
    paged_decode_attention_cuda, paged_decode_attention_reference, rope_write_kv_cuda, write_kv_cuda,
    paged_prefill_attention, paged_prefill_attention_reference, rope_write_kv, rope_write_kv_reference,
    triton_enabled, write_kv, write_kv_reference,
)

try:
    from flash_attn import flash_attn_with_kvcache
except ImportError:  # flash-attn is optional
    flash_attn_with_kvcache = None

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and triton_enabled()),
                                reason="kernel timings need a CUDA device with triton")

BATCH, HQ, HKV, HEAD_DIM, HIDDEN, DTYPE = 64, 32, 8, 128, 4096, torch.bfloat16
CONTEXTS = [512, 1024, 2048, 4096]


def synced(fn):
    """Time the kernel to completion, not its launch."""
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def paged_cache(context, block_size, seed=0):
    """Caches with BATCH contexts of `context` tokens in shuffled blocks, and the block table."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = BATCH * blocks_per_seq
    shape = (num_blocks, block_size, HKV, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen, device="cuda").to(DTYPE)
    v_cache = torch.randn(shape, generator=gen, device="cuda").to(DTYPE)
    order = torch.randperm(num_blocks, generator=gen, device="cuda")
    tables = order.view(BATCH, blocks_per_seq).to(torch.int32)
    lens = torch.full((BATCH,), context, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, tables, lens


def decode_call(path, context, block_size, num_splits):
    k_cache, v_cache, tables, lens = paged_cache(context, block_size)
    q = torch.randn(BATCH, HQ, HEAD_DIM, device="cuda").to(DTYPE)
    scale = HEAD_DIM ** -0.5
    if path == "triton":
        return lambda: paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, num_splits=num_splits)
    if path == "cuda":
        return lambda: paged_decode_attention_cuda(q, k_cache, v_cache, tables, lens, scale, num_splits=num_splits)
    if path == "reference":
        return lambda: paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, scale)
    if path == "flash_attn":
        return lambda: flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=lens, block_table=tables,
                                               softmax_scale=scale)

    def sdpa():  # every context has the same length, so one batched call after the gather
        k = k_cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2)  # [B, Hkv, n, D]
        v = v_cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2)
        return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)
    return sdpa


DECODE_CASES = [
    ("triton", 16, None), ("triton", 16, 1), ("triton", 256, None), ("reference", 16, None),
    ("flash_attn" if flash_attn_with_kvcache is not None else "sdpa", 256, None),
    *([("cuda", 16, None), ("cuda", 16, 1), ("cuda", 256, None)] if cuda_kernels_available() else []),
]


@pytest.mark.benchmark(group="decode_attention")
@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("path, block_size, num_splits", DECODE_CASES,
                         ids=[f"{p}-block{b}-splits{s}" for p, b, s in DECODE_CASES])
def test_decode_attention(benchmark, path, block_size, num_splits, context):
    fn = decode_call(path, context, block_size, num_splits)
    benchmark.extra_info.update(batch=BATCH, context=context, block_size=block_size, path=path)
    benchmark(synced(fn))


@pytest.mark.benchmark(group="prefill_attention")
@pytest.mark.parametrize("context", [512, 1024, 2048])
@pytest.mark.parametrize("path, block_size", [("kernel", 16), ("kernel", 256), ("reference", 16)])
def test_prefill_attention(benchmark, path, block_size, context):
    """Whole prompts: the last `context` tokens of each sequence are its queries. With blocks of 256 the
    launcher takes flash-attn's varlen kernel when flash-attn is installed."""
    k_cache, v_cache, tables, lens = paged_cache(context, block_size)
    q = torch.randn(BATCH * context, HQ, HEAD_DIM, device="cuda").to(DTYPE)
    cu = torch.arange(0, BATCH + 1, device="cuda", dtype=torch.int32) * context
    fn = paged_prefill_attention if path == "kernel" else paged_prefill_attention_reference
    benchmark.extra_info.update(batch=BATCH, context=context, block_size=block_size, path=path)
    benchmark(synced(lambda: fn(q, k_cache, v_cache, tables, cu, lens, HEAD_DIM ** -0.5)))


def kv_inputs(tokens, block_size=16):
    k_cache, v_cache, _, _ = paged_cache(max(tokens // BATCH, 1) * 2, block_size)
    slots = torch.randperm(k_cache.shape[0] * block_size, device="cuda")[:tokens]
    k = torch.randn(tokens, HKV, HEAD_DIM, device="cuda").to(DTYPE)
    v = torch.randn(tokens, HKV, HEAD_DIM, device="cuda").to(DTYPE)
    q = torch.randn(tokens, HQ, HEAD_DIM, device="cuda").to(DTYPE)
    angles = torch.rand(8192, HEAD_DIM // 2, device="cuda") * 100
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    return q, k, v, k_cache, v_cache, slots, positions, angles.cos(), angles.sin()


WRITE_PATHS = ["kernel", "reference", *(["cuda"] if cuda_kernels_available() else [])]


@pytest.mark.benchmark(group="kv_write")
@pytest.mark.parametrize("tokens", [BATCH, BATCH * 512])
@pytest.mark.parametrize("path", WRITE_PATHS)
def test_write_kv(benchmark, path, tokens):
    _, k, v, k_cache, v_cache, slots, _, _, _ = kv_inputs(tokens)
    fn = {"kernel": write_kv, "reference": write_kv_reference, "cuda": write_kv_cuda}[path]
    benchmark(synced(lambda: fn(k, v, k_cache, v_cache, slots)))


@pytest.mark.benchmark(group="rope_write_kv")
@pytest.mark.parametrize("tokens", [BATCH, BATCH * 512])
@pytest.mark.parametrize("path", WRITE_PATHS)
def test_rope_write_kv(benchmark, path, tokens):
    args = kv_inputs(tokens)
    fn = {"kernel": rope_write_kv, "reference": rope_write_kv_reference, "cuda": rope_write_kv_cuda}[path]
    benchmark(synced(lambda: fn(*args)))


@pytest.mark.benchmark(group="add_rms_norm")
@pytest.mark.parametrize("tokens", [BATCH, BATCH * 512])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_add_rms_norm(benchmark, path, tokens):
    x = torch.randn(tokens, HIDDEN, device="cuda").to(DTYPE)
    residual = torch.randn(tokens, HIDDEN, device="cuda").to(DTYPE)
    weight = torch.randn(HIDDEN, device="cuda").to(DTYPE)
    fn = add_rms_norm if path == "kernel" else add_rms_norm_reference
    benchmark(synced(lambda: fn(x, residual, weight, 1e-5)))
