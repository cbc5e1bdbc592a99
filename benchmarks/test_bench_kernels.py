"""Kernel timings on a CUDA device: each Triton kernel (and CUDA twin) against its torch reference and the field's
libraries, as device time per call with GB/s next to the measured copy bandwidth.

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-only -s
    # records: benchmarks/results/<device>-<date>-kernels.json

Skipped without CUDA (the CPU interpreter says nothing about kernel speed). Each case is timed by
`gpu_bench.device_seconds`: CUDA events around a CUDA graph of 100 launches (no host work between them; the
argument checks of the wrappers run once, at capture), median of 5; code that syncs with the host (the torch
references, flash-attn's varlen call) is timed over the same 100 launches without a graph, and says so in `method`.
pytest-benchmark's own table only marks the cases; the device times are in extra_info and the records file.

Decode attention shapes: a Llama-8B-like layer (batch 64, 32 query heads over 8 kv heads of 128 dims, contexts 512
to 4096) and GPT-2 (12 heads of 64, batch 1 and 64, contexts 512 and 4096), bf16, every sequence with the same
context in a cache of shuffled blocks. Paths:
- triton: `paged_decode_attention`, blocks of 16 (and of 256, to compare with flash-attn on equal caches), with the
  split-K heuristic and with num_splits=1;
- cuda: `paged_decode_attention_cuda` from the compiled extension, the same blocks, when coconut_fast._C is built;
- reference: `paged_decode_attention_reference`, the same function the tests use;
- flash_attn: `flash_attn_with_kvcache` with a block table, when flash-attn imports (blocks of 256);
- flashinfer: `BatchDecodeWithPagedKVCacheWrapper` (planned outside the timing), when flashinfer imports;
- sdpa: torch SDPA on the context gathered from the block table (gather included).
"""
from __future__ import annotations

import pytest
import torch

from coconut_fast.kernels import (
    add_rms_norm, add_rms_norm_reference, cuda_kernels_available, paged_prefill_attention,
    paged_prefill_attention_reference, rope_write_kv, rope_write_kv_cuda, rope_write_kv_reference, triton_enabled,
    write_kv, write_kv_cuda, write_kv_reference,
)
from gpu_bench import (copy_bandwidth, decode_attention_bytes, decode_attention_call, decode_paths, device_seconds,
                       paged_cache, write_results)

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and triton_enabled()),
                                reason="kernel timings need a CUDA device with triton")

DTYPE = torch.bfloat16
LAUNCHES = 100
DECODE_SHAPES = {  # batch, query heads, kv heads, head_dim, contexts
    "llama8b-b64": (64, 32, 8, 128, (512, 1024, 2048, 4096)),
    "gpt2-b1": (1, 12, 12, 64, (512, 4096)),
    "gpt2-b64": (64, 12, 12, 64, (512, 4096)),
}
BATCH, HQ, HKV, HEAD_DIM, HIDDEN = 64, 32, 8, 128, 4096  # the other kernels: the Llama-8B-like layer
RECORDS: list[dict] = []


@pytest.fixture(scope="module")
def bandwidth():
    measured = copy_bandwidth("cuda")
    yield measured
    if RECORDS:
        path = write_results(RECORDS, "cuda", suffix="-kernels", extra={"copy_bandwidth_gbs": measured / 1e9})
        print(f"\nresults: {path}")


def measure(benchmark, bandwidth, fn, bytes_moved: int, capture: bool = True, **info) -> None:
    """Device time per call of `fn` into extra_info and the records, with GB/s against the copy bandwidth."""
    seconds, method = device_seconds(fn, "cuda", launches=LAUNCHES, capture=capture)
    record = dict(**info, device_us=seconds * 1e6, method=method, launches=LAUNCHES, bytes=bytes_moved,
                  gb_per_s=bytes_moved / seconds / 1e9, copy_bandwidth_gbs=bandwidth / 1e9,
                  fraction_of_copy_bandwidth=bytes_moved / seconds / bandwidth)
    RECORDS.append(record)
    benchmark.extra_info.update(record)
    benchmark.pedantic(lambda: None, rounds=1)  # measured above on the device


OURS = ["triton", *(["cuda"] if cuda_kernels_available() else [])]
DECODE_PATHS = [*[(p, b, s) for p in OURS for b, s in ((16, None), (16, 1), (256, None))], ("reference", 16, None),
                *[p for p in decode_paths(False) if p[0] != "triton"]]  # flash-attn, FlashInfer, SDPA
DECODE_CASES = [(shape, context, *path) for shape, spec in DECODE_SHAPES.items() for context in spec[4]
                for path in DECODE_PATHS]


@pytest.mark.benchmark(group="decode_attention")
@pytest.mark.parametrize("shape, context, path, block_size, num_splits", DECODE_CASES,
                         ids=[f"{s}-ctx{c}-{p}-block{b}-splits{n}" for s, c, p, b, n in DECODE_CASES])
def test_decode_attention(benchmark, bandwidth, shape, context, path, block_size, num_splits):
    batch, hq, hkv, head_dim, _ = DECODE_SHAPES[shape]
    fn, capturable = decode_attention_call(path, batch, hq, hkv, head_dim, context, block_size, num_splits, DTYPE)
    measure(benchmark, bandwidth, fn, decode_attention_bytes(batch, context, hq, hkv, head_dim, 2), capturable,
            kernel="decode_attention", shape=shape, batch=batch, context=context, block_size=block_size, path=path,
            num_splits=num_splits)


@pytest.mark.benchmark(group="prefill_attention")
@pytest.mark.parametrize("context", [512, 1024, 2048])
@pytest.mark.parametrize("path, block_size", [("kernel", 16), ("kernel", 256), ("reference", 16)])
def test_prefill_attention(benchmark, bandwidth, path, block_size, context):
    """Whole prompts: the last `context` tokens of each sequence are its queries. With blocks of 256 the
    launcher takes flash-attn's varlen kernel when flash-attn is installed (it reads lengths on the host)."""
    k_cache, v_cache, tables, lens = paged_cache(BATCH, HKV, HEAD_DIM, context, block_size, DTYPE)
    q = torch.randn(BATCH * context, HQ, HEAD_DIM, device="cuda").to(DTYPE)
    cu = torch.arange(0, BATCH + 1, device="cuda", dtype=torch.int32) * context
    fn = paged_prefill_attention if path == "kernel" else paged_prefill_attention_reference
    moved = 2 * q.numel() * 2 + 2 * BATCH * context * HKV * HEAD_DIM * 2  # q, out, K, V once
    measure(benchmark, bandwidth, lambda: fn(q, k_cache, v_cache, tables, cu, lens, HEAD_DIM ** -0.5), moved,
            path == "kernel", kernel="prefill_attention", batch=BATCH, context=context, block_size=block_size,
            path=path)


def kv_inputs(tokens, block_size=16):
    k_cache, v_cache, _, _ = paged_cache(BATCH, HKV, HEAD_DIM, max(tokens // BATCH, 1) * 2, block_size, DTYPE)
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
def test_write_kv(benchmark, bandwidth, path, tokens):
    _, k, v, k_cache, v_cache, slots, _, _, _ = kv_inputs(tokens)
    fn = {"kernel": write_kv, "reference": write_kv_reference, "cuda": write_kv_cuda}[path]
    measure(benchmark, bandwidth, lambda: fn(k, v, k_cache, v_cache, slots), 4 * k.numel() * 2,
            path != "reference", kernel="write_kv", tokens=tokens, path=path)  # the reference indexes on the host


@pytest.mark.benchmark(group="rope_write_kv")
@pytest.mark.parametrize("tokens", [BATCH, BATCH * 512])
@pytest.mark.parametrize("path", WRITE_PATHS)
def test_rope_write_kv(benchmark, bandwidth, path, tokens):
    args = kv_inputs(tokens)
    fn = {"kernel": rope_write_kv, "reference": rope_write_kv_reference, "cuda": rope_write_kv_cuda}[path]
    moved = (2 * args[0].numel() + 4 * args[1].numel()) * 2  # q in and out, k and v in, k and v to the cache
    measure(benchmark, bandwidth, lambda: fn(*args), moved, path != "reference", kernel="rope_write_kv",
            tokens=tokens, path=path)


@pytest.mark.benchmark(group="add_rms_norm")
@pytest.mark.parametrize("tokens", [BATCH, BATCH * 512])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_add_rms_norm(benchmark, bandwidth, path, tokens):
    x = torch.randn(tokens, HIDDEN, device="cuda").to(DTYPE)
    residual = torch.randn(tokens, HIDDEN, device="cuda").to(DTYPE)
    weight = torch.randn(HIDDEN, device="cuda").to(DTYPE)
    fn = add_rms_norm if path == "kernel" else add_rms_norm_reference
    measure(benchmark, bandwidth, lambda: fn(x, residual, weight, 1e-5), 4 * x.numel() * 2, kernel="add_rms_norm",
            tokens=tokens, path=path)  # x and residual in, out and the new residual out
