"""Shared pieces of the kernel tests: tolerances per dtype, dtype parameters, paged caches with poisoned holes."""
import pytest
import torch

from coconut_fast.kernels import cuda_kernels_available, triton_enabled

# Kernel output (in its dtype) against the reference computed in float32: (atol, rtol), a few units in the last
# place of the output dtype. In attention: float32 uses ieee tl.dot (never tf32), so only the summation order
# differs; fp16/bf16 products q @ k are exact (float32 sums) and p is rounded to the dtype before p @ v, adding one
# rounding (2^-11 fp16, 2^-8 bf16, relative) of each weight to the output's own.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

# triton's CPU interpreter computes bf16 arithmetic and bf16 tl.dot wrongly (fp16 is right): bf16 cases run on a
# GPU only, where they check the compiled kernels.
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="GPU only: triton's CPU interpreter computes bf16 arithmetic and bf16 tl.dot wrongly")),
]

needs_triton = pytest.mark.skipif(not triton_enabled(), reason="needs triton with CUDA or TRITON_INTERPRET=1")

needs_cuda_extension = pytest.mark.skipif(not cuda_kernels_available(),
                                          reason="needs the compiled coconut_fast._C and a CUDA device")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def implementations(triton_fn, cuda_fn) -> list:
    """A kernel's Triton implementation (interpreted on CPU) and its CUDA twin (GPU with the extension only)."""
    return [pytest.param(triton_fn, id="triton", marks=needs_triton),
            pytest.param(cuda_fn, id="cuda", marks=needs_cuda_extension)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """No NaN anywhere in `actual`, and within the tolerance of `dtype` of the float32 `expected`."""
    assert not actual.isnan().any(), "NaN in the kernel output"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


def paged_context(context_lens, block_size, num_kv_heads, head_dim, dtype, seed, spare_blocks=2):
    """Caches holding random K/V for each context through a block table of shuffled, non-contiguous block ids.

    Every cache entry outside the contexts is NaN, and unused table entries point at block 0, which is never
    handed out and is all NaN: a kernel that reads past a context or through an unused entry returns NaN.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(n + block_size - 1) // block_size for n in context_lens]
    num_blocks = 1 + sum(blocks_per_seq) + spare_blocks
    block_ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(context_lens), max(blocks_per_seq + [1]) + 1, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    for b, (n, count) in enumerate(zip(context_lens, blocks_per_seq)):
        ids = [block_ids.pop() for _ in range(count)]
        table[b, :count] = torch.tensor(ids, dtype=torch.int32)
        for cache in (k_cache, v_cache):
            tokens = torch.randn(n, num_kv_heads, head_dim, generator=gen)
            for j, block in enumerate(ids):
                chunk = tokens[j * block_size:(j + 1) * block_size]
                cache[block, :len(chunk)] = chunk
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return (k_cache.to(dtype).to(DEVICE), v_cache.to(dtype).to(DEVICE), table.to(DEVICE), lens.to(DEVICE))


def randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
