"""Fused residual add + RMSNorm / LayerNorm over the last dimension, with HF's rounding points.

One program per row. The sum x + residual is rounded to the input dtype first (it is the next residual, and
HF adds in the model dtype), then normalised in float32.
"""

import torch
import torch.nn.functional as F

from ._common import expect, expect_same_device, expect_tensor, require_triton, tl, triton


def _add(x, residual):
    return x if residual is None else x + residual


def add_rms_norm_reference(x, residual, weight, eps: float):
    """Plain torch, as HF Llama: h = x + residual; out = weight * (h / rms(h) in float32).to(dtype)."""
    h = _add(x, residual)
    h32 = h.float()
    normed = (h32 * torch.rsqrt(h32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype), h


def add_layer_norm_reference(x, residual, weight, bias, eps: float):
    """Plain torch, as HF GPT-2's nn.LayerNorm: h = x + residual; LayerNorm(h) in float32, cast to dtype."""
    h = _add(x, residual)
    b = None if bias is None else bias.float()
    return F.layer_norm(h.float(), (h.shape[-1],), weight.float(), b, eps).to(x.dtype), h


@triton.jit
def norm_row(h, ok, cols, x_ptr, weight_ptr, bias_ptr, eps, HIDDEN: tl.constexpr, HAS_BIAS: tl.constexpr,
             RMS: tl.constexpr):
    """RMSNorm / LayerNorm of one row `h` (float32, already rounded to x's dtype), in float32."""
    w = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if RMS:
        normed = h * tl.rsqrt(tl.sum(h * h, axis=0) / HIDDEN + eps)
        out = normed.to(x_ptr.dtype.element_ty).to(tl.float32) * w  # HF casts before the weight
    else:
        centered = tl.where(ok, h - tl.sum(h, axis=0) / HIDDEN, 0.0)
        out = centered * tl.rsqrt(tl.sum(centered * centered, axis=0) / HIDDEN + eps) * w
        if HAS_BIAS:
            out += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return out


@triton.jit
def _add_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, bias_ptr, out_ptr, new_residual_ptr, eps,
    stride_x, stride_r, stride_o, stride_nr,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < HIDDEN
    h = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=ok, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * stride_nr + cols, h, mask=ok)
    out = norm_row(h.to(tl.float32), ok, cols, x_ptr, weight_ptr, bias_ptr, eps, HIDDEN, HAS_BIAS, RMS)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def _add_norm(x, residual, weight, bias, eps, rms: bool):
    expect_tensor(x, "x", 2)
    N, H = x.shape
    expect(x.stride(-1) == 1, "x", "a contiguous last dimension", x.stride())
    if residual is not None:
        expect_tensor(residual, "residual", 2)
        expect(residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1, "residual",
               f"None or a tensor like x {tuple(x.shape)} {x.dtype} with a contiguous last dimension",
               (tuple(residual.shape), residual.dtype))
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None or name == "weight":
            expect_tensor(p, name, 1)
            expect(p.shape[0] == H and p.is_contiguous(), name, f"a contiguous [{H}] vector (hidden size of x)",
                   tuple(p.shape))
    given = {"residual": residual, "weight": weight, "bias": bias}
    expect_same_device(x, **{name: t for name, t in given.items() if t is not None})
    expect(isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0, "eps", "a positive number", eps)
    require_triton(x)
    out = torch.empty_like(x)
    new_residual = x if residual is None else torch.empty_like(x)
    if N == 0:
        return out, new_residual
    _add_norm_kernel[(N,)](  # absent residual / bias: x / weight stand in, never read
        x, x if residual is None else residual, weight, weight if bias is None else bias, out, new_residual,
        float(eps), x.stride(0), 0 if residual is None else residual.stride(0), out.stride(0), new_residual.stride(0),
        HIDDEN=H, BLOCK=triton.next_power_of_2(H),
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, RMS=rms,
    )
    return out, new_residual


def add_rms_norm(x, residual, weight, eps: float):
    """x, residual [N, H] (residual may be None) -> (rms_norm(x + residual) * weight, x + residual)."""
    return _add_norm(x, residual, weight, None, eps, rms=True)


def add_layer_norm(x, residual, weight, bias, eps: float):
    """x, residual [N, H] (residual may be None) -> (layer_norm(x + residual) * weight + bias, x + residual)."""
    return _add_norm(x, residual, weight, bias, eps, rms=False)
