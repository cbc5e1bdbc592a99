"""Linear cross-entropy that never holds the whole [tokens x vocab] logits at once.

`linear_cross_entropy(hidden, weight, bias, targets)` equals
`F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")`, loss and
gradients. It uses Liger-Kernel's fused kernel on CUDA when `liger_kernel` is installed, else
`ChunkedLinearCrossEntropy`: logits one chunk of rows at a time, recomputed in backward, so
the peak is one chunk's logits and the saved state is the inputs plus one log-sum-exp per row.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # optional: `pip install coconut-fast[liger]`
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
except ImportError:
    liger_fused_linear_cross_entropy = None

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels that are not -100."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def default_chunk_rows(rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk so that a chunk's logits are about as large as the hidden states."""
    return max(1, math.ceil(rows / max(1, math.ceil(vocab / hidden))))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The matmul dtype the LM head would use here: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias` against `targets`, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int, dtype: torch.dtype):
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                logits = F.linear(hidden[rows].to(dtype), w, b).float()
                lse[rows] = logits.logsumexp(-1)
                total += (lse[rows] - logits.gather(1, targets[rows, None]).squeeze(1)).sum()
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_rows, ctx.dtype = chunk_rows, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype, chunk_rows = ctx.dtype, ctx.chunk_rows
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                h = hidden[rows].to(dtype)
                # d(sum CE)/d logits = softmax - one_hot(target), scaled by the incoming gradient
                d_logits = (F.linear(h, w, b).float() - lse[rows, None]).exp_()
                d_logits.scatter_add_(1, targets[rows, None], d_logits.new_full((h.shape[0], 1), -1.0))
                d_logits *= grad_total
                if need_h:
                    grad_h[rows] = (d_logits.to(dtype) @ w).to(hidden.dtype)
                if need_w:
                    grad_w += (d_logits.to(dtype).T @ h).float()
                if need_b:
                    grad_b += d_logits.sum(0)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
        )


def linear_cross_entropy(hidden, weight, bias, targets, chunk_rows: int | None = None, use_liger: bool | None = None):
    """Summed cross-entropy of the logits `hidden @ weight.T + bias` (float32 softmax) at `targets`.

    hidden [N, H], weight [V, H], bias [V] or None, targets [N] (all valid, no ignore index).
    `use_liger=None` takes Liger-Kernel where it runs (CUDA tensors, `liger_kernel` importable).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, H] and targets [N], got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[1]}], got {tuple(weight.shape)}")
    dtype = _compute_dtype(hidden)
    if use_liger is None:
        use_liger = liger_fused_linear_cross_entropy is not None and hidden.is_cuda
    if use_liger:
        if liger_fused_linear_cross_entropy is None:
            raise ImportError("use_liger=True needs liger_kernel (pip install coconut-fast[liger])")
        b = None if bias is None else bias.to(dtype)
        return liger_fused_linear_cross_entropy(hidden.to(dtype), weight.to(dtype), targets, b, reduction="sum").float()
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(hidden.shape[0], hidden.shape[1], weight.shape[0])
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, dtype)


def causal_lm_linear_loss(hidden, lm_head: torch.nn.Module, labels, chunk_rows: int | None = None, use_liger=None):
    """`causal_lm_loss(lm_head(hidden), labels)` without the full logits.

    Mean next-token cross-entropy over labels that are not -100; only those positions go
    through the LM head (one host sync to count them)."""
    if not isinstance(lm_head, torch.nn.Linear):
        raise ValueError(f"the chunked loss needs a plain nn.Linear LM head, got {type(lm_head).__name__}; "
                         "use return_logits=True")
    targets = labels[:, 1:].reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # the one host sync: how many rows are labelled
    T = labels.shape[1]
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows + rows // max(T - 1, 1))  # row b*(T-1)+t is b*T+t
    total = linear_cross_entropy(h, lm_head.weight, lm_head.bias, targets.index_select(0, rows), chunk_rows, use_liger)
    return total / rows.numel()  # 0 / 0 = nan when nothing is labelled, like F.cross_entropy's mean
