"""What every layer of the engine's forward shares: the kernel choice, the step metadata, paged attention,
the RoPE table."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

KERNEL_CHOICES = ("auto", "triton", "cuda", "torch")
KERNEL_NAMES = ("write_kv", "rope_write_kv", "paged_decode_attention", "paged_prefill_attention",
                "add_rms_norm", "add_layer_norm", "latent_feedback", "linear_act", "linear_add_norm")
# steps of at most this many rows run the fused-epilogue GEMMs; longer prefills the library GEMMs
FUSED_MAX_ROWS = 256
CUDA_KERNEL_NAMES = ("write_kv", "rope_write_kv", "paged_decode_attention", "latent_feedback")


def interpreter_miscomputes(device, dtype) -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1 without a GPU) computes bfloat16 wrongly: all-zero outputs."""
    return device is not None and torch.device(device).type == "cpu" and dtype == torch.bfloat16


def select_kernels(choice: str = "auto", device=None, dtype: torch.dtype | None = None) -> SimpleNamespace:
    """The kernels under the kernel names: "triton", "torch" (the references), "cuda" (the compiled
    extension's kernels for the cache writes, decode attention and latent feedback; Triton for the rest).

    "auto" takes Triton when it can run here (CUDA, or the interpreter with TRITON_INTERPRET=1) on a model of
    `device` and `dtype`, else torch: a bfloat16 model on CPU gets torch, as the interpreter miscomputes bfloat16.
    """
    from .. import kernels

    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {choice!r}")
    if choice == "cuda" and not kernels.cuda_kernels_available():
        raise ValueError("kernels='cuda' needs the compiled extension coconut_fast._C and a CUDA device (install "
                         "with `pip install -e . --no-build-isolation` on a CUDA torch); use 'triton' or 'auto'")
    use_triton = kernels.triton_enabled() if choice == "auto" else choice in ("triton", "cuda")
    if use_triton and not kernels.triton_enabled():
        raise ValueError(f"kernels={choice!r} needs triton and a CUDA device (or TRITON_INTERPRET=1); "
                         "use kernels='torch' or 'auto'")
    if use_triton and interpreter_miscomputes(device, dtype):
        if choice != "auto":
            raise ValueError(f"kernels={choice!r} on a bfloat16 model on CPU runs in Triton's interpreter "
                             "(TRITON_INTERPRET=1), which computes bfloat16 wrongly; use kernels='torch' or 'auto', "
                             "or a float32 / float16 model")
        use_triton = False
    suffix = "" if use_triton else "_reference"
    chosen = {n: getattr(kernels, n + suffix) for n in KERNEL_NAMES}
    if choice == "cuda":
        chosen.update({n: getattr(kernels, n + "_cuda") for n in CUDA_KERNEL_NAMES})
    name = choice if choice == "cuda" else ("triton" if use_triton else "torch")
    return SimpleNamespace(name=name, **chosen)


@dataclass
class StepMetadata:
    """Where a step's flattened tokens sit and what they attend to.

    Rows are ordered decode sequences first (one new position each), then prefill sequences
    (several new positions each); `block_tables` and `context_lens` follow the same order.
    """

    positions: torch.Tensor  # int64 [T]
    slot_mapping: torch.Tensor  # int64 [T]
    block_tables: torch.Tensor  # int32 [B, max blocks]
    context_lens: torch.Tensor  # int32 [B], including this step's positions
    num_decode: int  # the first num_decode sequences (and rows) are single-position
    prefill_cu_seqlens: torch.Tensor  # int32 [B - num_decode + 1], offsets of the prefill rows
    max_context: int | None = None  # the longest context of the step (host-side; None: the tables' capacity)


class PagedAttention:
    """Writes the step's new K/V into the cache and attends over it: single-position (decode) rows in one launch
    that appends their K/V (and rotates q and k with RoPE when given the tables), prefill rows through the cache
    write and the prefill kernel. Q, K and V may be strided views of one projection output."""

    def __init__(self, kernels: SimpleNamespace, scale: float):
        self.kernels = kernels
        self.scale = scale

    def __call__(self, q, k, v, k_cache, v_cache, meta: StepMetadata, rope=None, check: bool = True) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] -> out [T, Hq, D]; `rope` = (cos, sin) tables for the Llama family.

        Every K/V the step writes is in the cache before any row attends: a single-position row may read a
        prompt block that another request's prefill row of the same step writes (a shared prefix admitted in
        this step), so the prefill rows' cache write comes first. The single-position rows write only their
        own tail blocks, which no other row reads, so their append may stay inside the attention launch."""
        ops, nd, T = self.kernels, meta.num_decode, q.shape[0]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        rows = None
        if nd < T:
            slots = meta.slot_mapping[nd:]
            if rope is None:
                ops.write_kv(k[nd:], v[nd:], k_cache, v_cache, slots)
                rows = q[nd:]
            else:
                rows = ops.rope_write_kv(q[nd:], k[nd:], v[nd:], k_cache, v_cache, slots, meta.positions[nd:], *rope)
        if nd:
            ops.paged_decode_attention(
                q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.context_lens[:nd], self.scale, out=out[:nd],
                new_kv=(k[:nd], v[:nd], meta.slot_mapping[:nd]),
                rope=None if rope is None else (meta.positions[:nd], *rope), max_context=meta.max_context,
                check=check)
        if rows is not None:
            ops.paged_prefill_attention(rows, k_cache, v_cache, meta.block_tables[nd:], meta.prefill_cu_seqlens,
                                        meta.context_lens[nd:], self.scale, out=out[nd:])
        return out


def rope_table(rotary_emb, num_positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [P, D/2] (float32) from the HF model's own rotary module, so its rope scaling and
    attention scaling are exactly the model's."""
    rope_type = getattr(rotary_emb, "rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise NotImplementedError(
            f"rope_type {rope_type!r} changes its frequencies with the sequence length; the paged engine "
            "supports rope types with a fixed table (default, linear, llama3, yarn, ...)")
    positions = torch.arange(num_positions, device=device)[None]
    cos, sin = rotary_emb(torch.zeros(1, dtype=torch.float32, device=device), positions)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()
