"""The CUDA kernels of `coconut_fast._C` (csrc/), with the argument checks and call signatures of their Triton
twins, so the engine can take either. The extension is optional: without it these raise a clear error."""

import importlib

import torch

from ._common import expect, expect_failed
from .decode_attention import check_decode_args, decode_buffers
from .kv_write import check_kv_args, check_rope_args
from .latent_feedback import check_feedback_args

try:  # by module name: the extension is a leaf, and the package above it is not imported from here
    _C = importlib.import_module("coconut_fast._C")
except ImportError:  # built only by `pip install -e . --no-build-isolation` with a CUDA torch
    _C = None


def cuda_kernels_available() -> bool:
    """True when the compiled extension is importable and a CUDA device is present."""
    return _C is not None and torch.cuda.is_available()


def require_extension(x: torch.Tensor) -> None:
    if _C is None:
        raise RuntimeError("the CUDA kernels need the compiled extension coconut_fast._C: install with "
                           "`pip install -e . --no-build-isolation` in an environment whose torch has CUDA")
    if not x.is_cuda:
        raise RuntimeError(f"the CUDA kernels need CUDA tensors, got {x.device}")


def expect_vector_rows(x: torch.Tensor, name: str, width: int) -> None:
    """16-byte loads: rows of `width` elements must be whole 16-byte vectors."""
    vec = 16 // x.element_size()
    expect(width % vec == 0, name, f"a row width divisible by {vec} ({x.dtype} elements in 16 bytes)", width)


def paged_decode_attention_cuda(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                                num_splits: int | None = None, out: torch.Tensor | None = None, new_kv=None, rope=None,
                                max_context: int | None = None, counters: torch.Tensor | None = None,
                                check: bool = True):
    """CUDA twin of `paged_decode_attention`, the same arguments (the step's k/v appended with new_kv, RoPE with
    rope, the split merge in the launch): split-K, 16-byte K/V loads, one block per GQA group."""
    if check:
        check_decode_args(q, k_cache, v_cache, block_tables, context_lens, num_splits, out, new_kv, rope,
                          max_context, counters)
    require_extension(q)
    Hq, D, Hkv = q.shape[1], q.shape[2], k_cache.shape[2]
    if check and not _C.decode_attention_supported(D, Hq // Hkv, q.dtype):
        expect_failed("q", "head_dim in (16, 32, 64, 128, 256) fitting 32 16-byte loads, and a GQA group <= 8",
                      (D, Hq // Hkv))
    num_splits, out, part_out, part_lse, counters = decode_buffers(q, k_cache, block_tables, num_splits, out,
                                                                   max_context, counters)
    k_new, v_new, slot_mapping = new_kv if new_kv is not None else (None, None, None)
    positions, cos, sin = rope if rope is not None else (None, None, None)
    _C.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse, counters,
                              float(scale), num_splits, k_new, v_new, slot_mapping, positions, cos, sin)
    return out


def write_kv_cuda(k, v, k_cache, v_cache, slot_mapping) -> None:
    """CUDA twin of `write_kv`."""
    check_kv_args(k, v, k_cache, v_cache, slot_mapping)
    require_extension(k)
    expect_vector_rows(k, "k", k.shape[2])
    _C.write_kv(k, v, k_cache, v_cache, slot_mapping)


def rope_write_kv_cuda(q, k, v, k_cache, v_cache, slot_mapping, positions, cos, sin):
    """CUDA twin of `rope_write_kv`: returns the rotated q."""
    check_rope_args(q, k, v, k_cache, v_cache, slot_mapping, positions, cos, sin)
    require_extension(k)
    expect_vector_rows(k, "k", k.shape[2] // 2)
    q_out = torch.empty_like(q)
    _C.rope_write_kv(q, k, v, k_cache, v_cache, slot_mapping, positions, cos, sin, q_out)
    return q_out


def latent_feedback_cuda(x, residual, weight, bias, eps: float, rms: bool, thought_out, next_embeds, positions,
                         context_lens, slot_mapping, block_tables, block_size: int) -> None:
    """CUDA twin of `latent_feedback`."""
    check_feedback_args(x, residual, weight, bias, eps, thought_out, next_embeds, positions, context_lens,
                        slot_mapping, block_tables, block_size)
    require_extension(x)
    _C.latent_feedback(x, residual, weight, bias, float(eps), bool(rms), thought_out, next_embeds, positions,
                       context_lens, slot_mapping, block_tables, block_size)
