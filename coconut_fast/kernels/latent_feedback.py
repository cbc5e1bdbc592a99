"""The end of a latent step, fused: final norm of (x + residual) -> the thought, written as the step's output and
as the next step's input embedding; each live row (slot >= 0) then advances its position, context length and
cache slot. A captured thought loop runs these steps back to back with no host work between them.

One program per row; the norm has the rounding points of `add_rms_norm` / `add_layer_norm`.
"""

import torch

from ._common import expect, expect_same_device, expect_tensor, require_triton, tl, triton
from .norms import add_layer_norm_reference, add_rms_norm_reference, norm_row


def latent_feedback_reference(x, residual, weight, bias, eps: float, rms: bool, thought_out, next_embeds,
                              positions, context_lens, slot_mapping, block_tables, block_size: int) -> None:
    """Plain torch (no host sync, so it can run inside a CUDA graph too)."""
    if rms:
        normed = add_rms_norm_reference(x, residual, weight, eps)[0]
    else:
        normed = add_layer_norm_reference(x, residual, weight, bias, eps)[0]
    thought_out.copy_(normed)
    next_embeds.copy_(normed)
    live = slot_mapping >= 0
    nxt = positions + 1
    column = (nxt // block_size).clamp(max=block_tables.shape[1] - 1)  # padding rows may run off the table
    blocks = block_tables.gather(1, column[:, None].to(torch.int64))[:, 0].to(torch.int64)
    slot_mapping.copy_(torch.where(live, blocks * block_size + nxt % block_size, slot_mapping))
    positions.copy_(torch.where(live, nxt, positions))
    context_lens.add_(live.to(context_lens.dtype))


@triton.jit
def _latent_feedback_kernel(
    x_ptr, residual_ptr, weight_ptr, bias_ptr, thought_ptr, next_ptr,
    positions_ptr, context_lens_ptr, slot_mapping_ptr, block_tables_ptr, eps,
    stride_x, stride_r, stride_t, stride_e, stride_bt, max_blocks,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    r = tl.load(residual_ptr + row * stride_r + cols, mask=ok, other=0.0)
    h = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)  # HF adds in the dtype
    out = norm_row(h, ok, cols, x_ptr, weight_ptr, bias_ptr, eps, HIDDEN, HAS_BIAS, RMS)
    out = out.to(thought_ptr.dtype.element_ty)
    tl.store(thought_ptr + row * stride_t + cols, out, mask=ok)
    tl.store(next_ptr + row * stride_e + cols, out, mask=ok)
    slot = tl.load(slot_mapping_ptr + row)
    if slot >= 0:
        position = tl.load(positions_ptr + row) + 1
        tl.store(positions_ptr + row, position)
        tl.store(context_lens_ptr + row, tl.load(context_lens_ptr + row) + 1)
        column = tl.minimum(position // BLOCK_SIZE, max_blocks - 1)  # at max_positions: clamp, as the reference
        block = tl.load(block_tables_ptr + row * stride_bt + column).to(tl.int64)
        tl.store(slot_mapping_ptr + row, block * BLOCK_SIZE + position % BLOCK_SIZE)


def check_feedback_args(x, residual, weight, bias, eps, thought_out, next_embeds, positions, context_lens,
                        slot_mapping, block_tables, block_size) -> None:
    expect_tensor(x, "x", 2)
    B, H = x.shape
    for name, t in (("residual", residual), ("thought_out", thought_out), ("next_embeds", next_embeds)):
        expect_tensor(t, name, 2)
        expect(t.shape == x.shape and t.dtype == x.dtype and t.stride(-1) == 1, name,
               f"a tensor like x {tuple(x.shape)} {x.dtype} with a contiguous last dimension",
               (tuple(t.shape), t.dtype))
    expect(x.stride(-1) == 1, "x", "a contiguous last dimension", x.stride())
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None or name == "weight":
            expect_tensor(p, name, 1)
            expect(p.shape[0] == H and p.is_contiguous(), name, f"a contiguous [{H}] vector (hidden size of x)",
                   tuple(p.shape))
    expect(isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0, "eps", "a positive number", eps)
    for name, t, dtype in (("positions", positions, torch.int64), ("context_lens", context_lens, torch.int32),
                           ("slot_mapping", slot_mapping, torch.int64)):
        expect_tensor(t, name, 1, (dtype,))
        expect(t.shape[0] == B and t.is_contiguous(), name, f"a contiguous [{B}] vector (rows of x)", tuple(t.shape))
    expect_tensor(block_tables, "block_tables", 2, (torch.int32,))
    expect(block_tables.shape[0] == B and block_tables.shape[1] >= 1 and block_tables.stride(-1) == 1,
           "block_tables", f"[{B}, max_blocks >= 1] with a contiguous last dimension", tuple(block_tables.shape))
    expect(isinstance(block_size, int) and block_size >= 1, "block_size", "an int >= 1", block_size)
    given = dict(residual=residual, weight=weight, thought_out=thought_out, next_embeds=next_embeds,
                 positions=positions, context_lens=context_lens, slot_mapping=slot_mapping, block_tables=block_tables)
    expect_same_device(x, **given, **({} if bias is None else {"bias": bias}))


def latent_feedback(x, residual, weight, bias, eps: float, rms: bool, thought_out, next_embeds, positions,
                    context_lens, slot_mapping, block_tables, block_size: int) -> None:
    """thought_out = next_embeds = norm(x + residual); live rows (slot >= 0) move one position on, in place."""
    check_feedback_args(x, residual, weight, bias, eps, thought_out, next_embeds, positions, context_lens,
                        slot_mapping, block_tables, block_size)
    require_triton(x)
    B, H = x.shape
    if B == 0:
        return
    _latent_feedback_kernel[(B,)](  # absent bias: weight stands in, never read
        x, residual, weight, weight if bias is None else bias, thought_out, next_embeds,
        positions, context_lens, slot_mapping, block_tables, float(eps),
        x.stride(0), residual.stride(0), thought_out.stride(0), next_embeds.stride(0), block_tables.stride(0),
        block_tables.shape[1],
        HIDDEN=H, BLOCK=triton.next_power_of_2(H), BLOCK_SIZE=block_size, HAS_BIAS=bias is not None, RMS=bool(rms),
    )
