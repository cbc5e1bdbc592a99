"""The triton import (optional) and the argument checks shared by the kernel launchers."""

import os
from typing import NoReturn

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the kernel modules still import, so their torch references stay usable
    HAS_TRITON = False

    class _NoTriton:
        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def require_triton(x: torch.Tensor) -> None:
    """The launchers run on CUDA tensors, or on CPU tensors in triton's interpreter (TRITON_INTERPRET=1)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use the *_reference functions or install triton")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {x.device}; "
                           "use the *_reference functions")


def expect_failed(name: str, what, got) -> NoReturn:
    """Raise the ValueError of a failed check: the argument, what was expected (a string, or a zero-argument
    callable that builds it) and what was given (likewise)."""
    what = what() if callable(what) else what
    got = got() if callable(got) else got
    raise ValueError(f"{name}: expected {what}, got {got}")


def expect(ok: bool, name: str, what, got) -> None:
    """Raise a ValueError naming the argument, what was expected and what was given. `what` and `got` may be
    zero-argument callables, called only on failure: a passing check then formats nothing (the host cost of a
    launch's checks is mostly message building otherwise)."""
    if not ok:
        expect_failed(name, what, got)


# The helpers below test with plain `if`s and build their messages only on failure.
def expect_tensor(x, name: str, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        expect_failed(name, "a torch.Tensor", type(x).__name__)
    if x.dim() != ndim:
        expect_failed(name, f"{ndim} dimensions", tuple(x.shape))
    if x.dtype not in dtypes:
        expect_failed(name, lambda: f"dtype in {[str(d) for d in dtypes]}", x.dtype)


def expect_same_device(x: torch.Tensor, **others) -> None:
    for name, other in others.items():
        if other.device != x.device:
            expect_failed(name, f"a tensor on {x.device} (the device of the queries/inputs)", other.device)


def expect_out(out, like: torch.Tensor) -> None:
    """An optional output buffer: None, or a tensor of the shape, dtype and device of `like`."""
    if out is not None and not (isinstance(out, torch.Tensor) and out.shape == like.shape
                                and out.dtype == like.dtype and out.device == like.device and out.stride(-1) == 1):
        expect_failed("out", f"None or a tensor of shape {tuple(like.shape)}, {like.dtype} on {like.device}",
                      (getattr(out, "shape", None), getattr(out, "dtype", None)))


def expect_paged_cache(k_cache, v_cache) -> None:
    """k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], same shape and dtype."""
    expect_tensor(k_cache, "k_cache", 4)
    expect_tensor(v_cache, "v_cache", 4)
    if v_cache.shape != k_cache.shape:
        expect_failed("v_cache", f"the shape of k_cache {tuple(k_cache.shape)}", tuple(v_cache.shape))
    if v_cache.dtype != k_cache.dtype:
        expect_failed("v_cache", f"the dtype of k_cache {k_cache.dtype}", v_cache.dtype)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        expect_failed("k_cache/v_cache", "a contiguous last dimension", (k_cache.stride(), v_cache.stride()))


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, block_table_ptr, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                 stride_vh, kv_head, tokens, token_ok, dims, dim_ok, BLOCK_SIZE: tl.constexpr):
    """K and V of one sequence's cached `tokens` for one kv head, [tokens, dims] in the cache dtype, 0 where masked.

    `block_table_ptr` points at the sequence's row of the block table; token t sits in slot
    t % BLOCK_SIZE of block block_table[t // BLOCK_SIZE]."""
    blocks = tl.load(block_table_ptr + tokens // BLOCK_SIZE, mask=token_ok, other=0)
    offsets = tokens % BLOCK_SIZE
    kv_mask = token_ok[:, None] & dim_ok[None, :]
    k = tl.load(k_cache_ptr + blocks[:, None].to(tl.int64) * stride_kb + offsets[:, None] * stride_kt
                + kv_head * stride_kh + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + blocks[:, None].to(tl.int64) * stride_vb + offsets[:, None] * stride_vt
                + kv_head * stride_vh + dims[None, :], mask=kv_mask, other=0.0)
    return k, v


def expect_queries_and_cache(q, k_cache, v_cache) -> None:
    """q [rows, Hq, D] against a paged cache: the cache's head_dim and dtype, whole GQA groups, contiguous rows."""
    expect_tensor(q, "q", 3)
    expect_paged_cache(k_cache, v_cache)
    Hq, D = q.shape[1:]
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != D:
        expect_failed("k_cache", f"head_dim {D} (from q) in dimension 3", tuple(k_cache.shape))
    if Hq % Hkv != 0:
        expect_failed("q", f"a number of heads divisible by the {Hkv} kv heads of k_cache", Hq)
    if q.dtype != k_cache.dtype:
        expect_failed("q", f"the dtype of k_cache {k_cache.dtype}", q.dtype)
    if q.stride(-1) != 1:
        expect_failed("q", "a contiguous last dimension", q.stride())


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence, [length, num_kv_heads, head_dim] in float32."""
    block_size = cache.shape[1]
    blocks = block_table[: (length + block_size - 1) // block_size].long()
    return cache[blocks].flatten(0, 1)[:length].float()
