"""GEMMs of the single-position steps (x: one row per request, 1..256 rows) with their epilogues fused (Triton):

- `linear_act`: act(x @ W + b) with act "none", "gelu_tanh" (HF gelu_new) or "silu_mul" (silu(gate) * up from the
  fused gate/up matrix, each program computing the same columns of both halves);
- `linear_add_norm`: h = x @ W + b + residual, out = RMSNorm / LayerNorm(h): o_proj or the MLP's down projection
  together with the residual add and the next norm, in one launch.

W comes as nn.Linear stores it ([N, K], weight_layout="nk") or as GPT-2's Conv1D does ([K, N], "kn"). tl.dot needs
16 rows: the row tile is padded to 16 and masked. Operands go to tl.dot in their dtype (fp16 / bf16 as they are,
float32 as "ieee": tf32 would round them to 10 bits); sums in float32.

Rounding points are HF's in the model dtype: the Linear output (bias added in float32) is rounded to the dtype; the
activation is computed in float32 from it and rounded once (HF's gelu_new rounds after each of its 8 ops, so fp16
differs from HF by a few units in the last place); silu_mul rounds gate, up, silu(gate) and the product, as
LlamaMLP; residual add and norm as `add_rms_norm` / `add_layer_norm` (norms.py), whose `norm_row` is reused.

Split-K (see `split_k_for`): with few output tiles there are too few programs to keep every SM loading weights, so
`split_k` programs each sum a slice of K and add their float32 partial tile into a workspace with atomics. An int32
counter per tile (linear_act) or per row block (linear_add_norm) counts arrivals; the program that arrives last
(acq_rel atomic) runs the epilogue, then zeroes its workspace rows and resets the counter, so the next call or
CUDA-graph replay needs no zeroing launch. No program waits for another, so the interpreter (programs one after
another) cannot deadlock. The norm needs whole rows, so linear_add_norm's last program per row block always runs
the norm of those rows (at most 16), whatever split_k.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._common import expect, expect_same_device, expect_tensor, require_triton, tl, triton
from .norms import add_layer_norm_reference, add_rms_norm_reference, norm_row

ACTS = {"none": 0, "gelu_tanh": 1, "silu_mul": 2}
WEIGHT_LAYOUTS = ("nk", "kn")  # nn.Linear [out, in]; Conv1D [in, out]
# split_k keeps the workspace traffic ((split_k + 2) * M * N * 4 bytes: the atomic adds, the epilogue's read and
# its zeroing) within this fraction of the weight bytes K * N * element_size
WORKSPACE_BYTES_FRACTION = 0.05
PROGRAMS_PER_SM = 2  # programs wanted per SM: loads in flight on every SM for a memory-bound GEMV
DEFAULT_SM_COUNT = 132  # H100 / H200: the split choice on CPU tensors (interpreter, compile checks)
WORKSPACE_ROWS = 256  # workspace rows allocated at least: one buffer serves every batch up to 256 rows
BLOCK_N = 64
NORM_BLOCK_M = 16  # linear_add_norm's row block: the rows one last-arriving program normalises


def _fail(name: str, what: str, got) -> None:
    expect(False, name, what, got)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------- torch references
def _linear_reference(x, weight, bias, weight_layout: str):
    """x @ W + b in float32 (fp16 / bf16 products are exact there), then rounded to x's dtype once, as cuBLAS."""
    w = weight.t() if weight_layout == "nk" else weight
    y = x.float() @ w.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def linear_act_reference(x, weight, bias, act: str, out=None, *, weight_layout: str, split_k=None, workspace=None):
    """Plain torch with the kernel's rounding points (split_k and workspace are ignored)."""
    y = _linear_reference(x, weight, bias, weight_layout)
    if act == "silu_mul":
        gate, up = y.chunk(2, dim=-1)
        result = (F.silu(gate.float()).to(x.dtype).float() * up.float()).to(x.dtype)
    elif act == "gelu_tanh":
        z = y.float()
        result = (0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z.pow(3))))).to(x.dtype)
    else:
        result = y
    return result if out is None else out.copy_(result)


def linear_add_norm_reference(x, weight, bias, residual, norm_weight, norm_bias, eps: float, rms: bool, out=None, *,
                              weight_layout: str, h_out=None, split_k=None, workspace=None):
    """Plain torch: y = x @ W + b rounded to the dtype, then add_rms_norm_reference / add_layer_norm_reference."""
    y = _linear_reference(x, weight, bias, weight_layout)
    if rms:
        normed, h = add_rms_norm_reference(y, residual, norm_weight, eps)
    else:
        normed, h = add_layer_norm_reference(y, residual, norm_weight, norm_bias, eps)
    return (normed if out is None else out.copy_(normed)), (h if h_out is None else h_out.copy_(h))


# ---------------------------------------------------------------- kernels
@triton.jit
def _partial_tile(x_ptr, w_ptr, rows, row_ok, cols, col_ok, k_start, k_end, stride_xm, stride_wk, stride_wn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[rows, k_start:k_end] @ W[k_start:k_end, cols] as a float32 [BLOCK_M, BLOCK_N] tile (W read as [K, N] via
    its strides, whichever layout it is stored in)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn, mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")  # fp16/bf16: tensor cores as they are; float32: no tf32
    return acc


@triton.jit
def _act_epilogue(acc, acc_up, b_ptr, cols, col_ok, up_offset, out_ty: tl.constexpr, HAS_BIAS: tl.constexpr,
                  ACT: tl.constexpr):
    """act(round(acc + b)) in out_ty; silu_mul: round(round(silu(round(gate))) * round(up))."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(out_ty).to(tl.float32)  # the Linear's output, in the model dtype as HF's
    if ACT == 1:  # 0.5 * y * (1 + tanh(u)) == y * sigmoid(2u): no cancellation in 1 + tanh for negative u
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y / (1.0 + tl.exp(-2.0 * u))
    if ACT == 2:
        if HAS_BIAS:
            acc_up += tl.load(b_ptr + up_offset + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        up = acc_up.to(out_ty).to(tl.float32)
        y = (y / (1.0 + tl.exp(-y))).to(out_ty).to(tl.float32) * up
    return y.to(out_ty)


@triton.jit
def _linear_act_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, ws_ptr, counter_ptr,
    M, N, K, k_per_split, up_offset,  # N: output columns; up_offset: W's column where the up half starts
    stride_xm, stride_wk, stride_wn, stride_om, stride_ws,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)  # fastest: the row blocks sharing a weight tile run together (it stays in L2)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = _partial_tile(x_ptr, w_ptr, rows, row_ok, cols, col_ok, k_start, k_end, stride_xm, stride_wk, stride_wn,
                        BLOCK_M, BLOCK_N, BLOCK_K)
    acc_up = acc
    if ACT == 2:  # the same columns of the up half: the epilogue has both
        acc_up = _partial_tile(x_ptr, w_ptr + up_offset * stride_wn, rows, row_ok, cols, col_ok, k_start, k_end,
                               stride_xm, stride_wk, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = row_ok[:, None] & col_ok[None, :]
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, _act_epilogue(acc, acc_up, b_ptr, cols, col_ok, up_offset, out_ty, HAS_BIAS, ACT),
                 mask=mask)
    else:
        ws = ws_ptr + rows[:, None] * stride_ws + cols[None, :]  # silu_mul: gate partials, then up at + N
        tl.atomic_add(ws, acc, mask=mask, sem="relaxed")
        if ACT == 2:
            tl.atomic_add(ws + N, acc_up, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial is issued before the count is released
        counter = counter_ptr + pid_m * tl.num_programs(1) + pid_n
        if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:  # the last split of this tile
            acc = tl.load(ws, mask=mask, other=0.0, cache_modifier=".cg")  # from L2, where the atomics landed
            if ACT == 2:
                acc_up = tl.load(ws + N, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(ws + N, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), mask=mask)
            tl.store(out_ptrs, _act_epilogue(acc, acc_up, b_ptr, cols, col_ok, up_offset, out_ty, HAS_BIAS, ACT),
                     mask=mask)
            tl.store(ws, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), mask=mask)
            tl.store(counter, 0)


@triton.jit
def _linear_add_norm_kernel(
    x_ptr, w_ptr, b_ptr, residual_ptr, norm_w_ptr, norm_b_ptr, out_ptr, h_ptr, ws_ptr, counter_ptr, eps,
    M, K, k_per_split,
    stride_xm, stride_wk, stride_wn, stride_rm, stride_om, stride_hm, stride_ws,
    HIDDEN: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM_BIAS: tl.constexpr,
    RMS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < HIDDEN
    k_start = pid_k * k_per_split
    acc = _partial_tile(x_ptr, w_ptr, rows, row_ok, cols, col_ok, k_start, tl.minimum(k_start + k_per_split, K),
                        stride_xm, stride_wk, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = row_ok[:, None] & col_ok[None, :]
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    if SPLIT_K == 1:  # the whole sum is here: this tile's residual sum h is written now, the norm waits for the row
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        r_tile = tl.load(residual_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
        h_tile = (acc.to(dtype).to(tl.float32) + r_tile.to(tl.float32)).to(dtype)  # HF: Linear in the dtype, then +
        tl.store(h_ptr + rows[:, None] * stride_hm + cols[None, :], h_tile, mask=mask)
    else:
        tl.atomic_add(ws_ptr + rows[:, None] * stride_ws + cols[None, :], acc, mask=mask, sem="relaxed")
    tl.debug_barrier()  # every thread's stores / atomics are issued before the count is released
    counter = counter_ptr + pid_m
    if tl.atomic_add(counter, 1, sem="acq_rel") == tl.num_programs(1) * SPLIT_K - 1:  # the row block is complete
        hcols = tl.arange(0, NORM_BLOCK)
        ok = hcols < HIDDEN
        for row in range(pid_m * BLOCK_M, tl.minimum(pid_m * BLOCK_M + BLOCK_M, M)):
            if SPLIT_K == 1:
                h = tl.load(h_ptr + row * stride_hm + hcols, mask=ok, other=0.0, cache_modifier=".cg")
            else:
                ws_row = ws_ptr + row * stride_ws + hcols
                y = tl.load(ws_row, mask=ok, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    y += tl.load(b_ptr + hcols, mask=ok, other=0.0).to(tl.float32)
                r = tl.load(residual_ptr + row * stride_rm + hcols, mask=ok, other=0.0)
                h = (y.to(dtype).to(tl.float32) + r.to(tl.float32)).to(dtype)
                tl.store(h_ptr + row * stride_hm + hcols, h, mask=ok)
                tl.store(ws_row, tl.zeros([NORM_BLOCK], dtype=tl.float32), mask=ok)
            out = norm_row(h.to(tl.float32), ok, hcols, x_ptr, norm_w_ptr, norm_b_ptr, eps, HIDDEN, HAS_NORM_BIAS, RMS)
            tl.store(out_ptr + row * stride_om + hcols, out.to(dtype), mask=ok)
        tl.store(counter, 0)


# ---------------------------------------------------------------- launch choices
def split_k_for(M: int, K: int, N: int, sm_count: int, *, element_size: int = 2, block_m: int = 16,
                block_n: int = BLOCK_N, block_k: int = 64) -> int:
    """How many programs share each output tile's K (1: no split), for an [M, K] @ [K, N] GEMM on `sm_count` SMs.

    - parallelism: enough splits for PROGRAMS_PER_SM programs per SM over the cdiv(M, block_m) * cdiv(N, block_n)
      tiles (at M = 1 and N of a few thousand there are only tens of tiles);
    - bytes: the workspace traffic (split_k + 2) * M * N * 4 stays within WORKSPACE_BYTES_FRACTION of the weight
      bytes K * N * element_size, so the split falls as M grows;
    - at least one K block per split, every split non-empty (rounded to whole K blocks of `block_k`).
    On 132 SMs in fp16: GPT-2's o_proj (K = N = 768) 12 at M = 1 (its 12 K blocks), 4 at M = 3, 2 at M = 4, 1 from
    M = 5; Llama 1B's o_proj (K = N = 2048) 8 up to M = 5, 1 from M = 13.
    """
    tiles = _cdiv(M, block_m) * _cdiv(N, block_n)
    wanted = _cdiv(PROGRAMS_PER_SM * sm_count, tiles)
    by_bytes = int(WORKSPACE_BYTES_FRACTION * K * element_size / (4 * M)) - 2
    split = max(1, min(wanted, by_bytes, _cdiv(K, block_k)))
    return _cdiv(K, _k_per_split(K, split, block_k))


def _k_per_split(K: int, split: int, block_k: int) -> int:
    return _cdiv(_cdiv(K, split), block_k) * block_k


def _split(split_k, x, K: int, N: int, block_m: int) -> tuple[int, int]:
    """(splits, K per split) of a launch: split_k (or split_k_for's choice) rounded to whole K blocks."""
    block_k = _block_k(x.dtype)
    if split_k is None:
        split_k = split_k_for(x.shape[0], K, N, _sm_count(x.device), element_size=x.element_size(), block_m=block_m,
                              block_k=block_k)
    k_per_split = _k_per_split(K, split_k, block_k)
    return _cdiv(K, k_per_split), k_per_split


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


def _block_k(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 64  # the same bytes per stage in shared memory


def _act_block_m(M: int, dtype: torch.dtype) -> int:
    """Rows per tile: 16 (tl.dot's least) up to 64; float32 up to 32 (its FMA dots spill at 64 rows on sm_80)."""
    return 16 if M <= 16 else 32 if M <= 32 or dtype == torch.float32 else 64


@dataclass
class SplitKWorkspace:
    """float32 partial sums [rows, cols] and int32 arrival counters, all zero between calls (each call's last
    programs zero what they used). Calls sharing one must be ordered on one stream."""
    partials: torch.Tensor
    counters: torch.Tensor


_WORKSPACES: dict = {}
_RETIRED: list = []  # outgrown workspaces: a captured CUDA graph may still point at them


def split_k_workspace(device, rows: int, cols: int) -> SplitKWorkspace:
    """The module's workspace for `cols` columns on `device` (at least WORKSPACE_ROWS rows), made on first use: make
    it (one eager call) before capturing a CUDA graph."""
    key = (torch.device(device), cols)
    ws = _WORKSPACES.get(key)
    if ws is None or ws.partials.shape[0] < rows:
        capacity = max(WORKSPACE_ROWS, triton.next_power_of_2(rows))
        if ws is not None:
            _RETIRED.append(ws)
        ws = _WORKSPACES[key] = SplitKWorkspace(
            torch.zeros(capacity, cols, dtype=torch.float32, device=device),
            torch.zeros(_cdiv(capacity, 16) * _cdiv(cols, 16), dtype=torch.int32, device=device))
    return ws


def _check_workspace(ws, x, rows: int, cols: int, counters: int) -> None:
    ok = (isinstance(ws, SplitKWorkspace) and ws.partials.dtype == torch.float32 and ws.partials.dim() == 2
          and ws.partials.shape[0] >= rows and ws.partials.shape[1] >= cols and ws.partials.stride(-1) == 1
          and ws.counters.dtype == torch.int32 and ws.counters.dim() == 1 and ws.counters.numel() >= counters
          and ws.counters.is_contiguous() and ws.partials.device == x.device and ws.counters.device == x.device)
    if not ok:
        _fail("workspace", f"None or a SplitKWorkspace on {x.device} with float32 partials of at least [{rows}, {cols}]"
              f" and at least {counters} contiguous int32 counters", ws)


def _check_common(x, weight, bias, weight_layout, split_k):
    """The GEMM's arguments; returns (M, K, N of the weight)."""
    expect_tensor(x, "x", 2)
    if x.stride(-1) != 1:
        _fail("x", "a contiguous last dimension", x.stride())
    if weight_layout not in WEIGHT_LAYOUTS:
        _fail("weight_layout", "'nk' (nn.Linear's [out, in]) or 'kn' (Conv1D's [in, out])", weight_layout)
    expect_tensor(weight, "weight", 2)
    M, K = x.shape
    w_k, w_n = weight.shape if weight_layout == "kn" else weight.shape[::-1]
    if weight.dtype != x.dtype or w_k != K:
        _fail("weight", f"a {x.dtype} matrix with K = {K} (x's columns) in layout {weight_layout!r}",
              (tuple(weight.shape), weight.dtype))
    if bias is not None:
        expect_tensor(bias, "bias", 1)
        if bias.shape[0] != w_n or bias.dtype != x.dtype or not bias.is_contiguous():
            _fail("bias", f"None or a contiguous [{w_n}] {x.dtype} vector", (tuple(bias.shape), bias.dtype))
    if split_k is not None and not (isinstance(split_k, int) and not isinstance(split_k, bool) and split_k >= 1):
        _fail("split_k", "None or an int >= 1", split_k)
    expect_same_device(x, weight=weight, **({} if bias is None else {"bias": bias}))
    if K == 0:
        _fail("x", "at least one column", tuple(x.shape))
    return M, K, w_n


def _check_output(t, name: str, shape, x) -> None:
    if t is not None and not (isinstance(t, torch.Tensor) and tuple(t.shape) == shape and t.dtype == x.dtype
                              and t.device == x.device and t.stride(-1) == 1):
        _fail(name, f"None or a {list(shape)} {x.dtype} tensor on {x.device} with a contiguous last dimension",
              (getattr(t, "shape", None), getattr(t, "dtype", None)))
    if t is not None and t.data_ptr() == x.data_ptr():
        _fail(name, "a buffer other than x (x is read while it is written)", "x itself")


def _weight_strides(weight, weight_layout: str):
    """(stride along K, stride along N) of the weight as a [K, N] matrix."""
    return (weight.stride(0), weight.stride(1)) if weight_layout == "kn" else (weight.stride(1), weight.stride(0))


# ---------------------------------------------------------------- launchers
def linear_act(x, weight, bias, act: str, out=None, *, weight_layout: str, split_k=None, workspace=None):
    """act(x @ W + b) -> [M, N] in x's dtype (written into `out` when given).

    x [M, K]; weight [N, K] (weight_layout="nk", nn.Linear) or [K, N] ("kn", Conv1D), x's dtype; bias [N] or None.
    act: "none", "gelu_tanh" (HF gelu_new) or "silu_mul": the weight is the fused gate/up matrix (N = 2I: gate
    then up along N, rows 0..I-1 / I..2I-1 of an "nk" weight) with bias [2I] or None, and the output is
    silu(gate) * up, [M, I]. split_k: None (split_k_for) or the number of K slices wanted (rounded to whole K blocks);
    workspace: None (the module's, per device and width) or a SplitKWorkspace, used only when split_k > 1."""
    M, K, w_n = _check_common(x, weight, bias, weight_layout, split_k)
    if act not in ACTS:
        _fail("act", f"one of {list(ACTS)}", act)
    if act == "silu_mul" and w_n % 2:
        _fail("weight", "an even number of output features (the gate half, then the up half)", w_n)
    N = w_n // 2 if act == "silu_mul" else w_n
    _check_output(out, "out", (M, N), x)
    require_triton(x)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    if M == 0 or N == 0:
        return out
    block_m, block_k = _act_block_m(M, x.dtype), _block_k(x.dtype)
    split_k, k_per_split = _split(split_k, x, K, N, block_m)
    grid = (_cdiv(M, block_m), _cdiv(N, BLOCK_N), split_k)
    ws_ptr, counters = x, x  # stand-ins, never touched without a split
    stride_ws = 0
    if split_k > 1:
        if workspace is None:
            workspace = split_k_workspace(x.device, M, w_n)
        _check_workspace(workspace, x, M, w_n, grid[0] * grid[1])
        ws_ptr, counters, stride_ws = workspace.partials, workspace.counters, workspace.partials.stride(0)
    stride_wk, stride_wn = _weight_strides(weight, weight_layout)
    _linear_act_kernel[grid](  # absent bias: x stands in, never read
        x, weight, x if bias is None else bias, out, ws_ptr, counters,
        M, N, K, k_per_split, N if act == "silu_mul" else 0,
        x.stride(0), stride_wk, stride_wn, out.stride(0), stride_ws,
        HAS_BIAS=bias is not None, ACT=ACTS[act], SPLIT_K=split_k,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k, num_warps=4, num_stages=3,
    )
    return out


def linear_add_norm(x, weight, bias, residual, norm_weight, norm_bias, eps: float, rms: bool, out=None, *,
                    weight_layout: str, h_out=None, split_k=None, workspace=None):
    """(norm(h), h) with h = x @ W + b + residual, both [M, N] in x's dtype.

    x [M, K]; weight [N, K] ("nk") or [K, N] ("kn"); bias [N] or None; residual [M, N]; norm_weight [N];
    norm_bias [N] or None (LayerNorm only); rms: RMSNorm (HF Llama) or LayerNorm (GPT-2). out / h_out: buffers for
    the two results (h_out may be `residual` itself: the residual stream updated in place). split_k: None
    (split_k_for) or the K slices wanted; workspace: None (the module's) or a SplitKWorkspace."""
    M, K, N = _check_common(x, weight, bias, weight_layout, split_k)
    expect_tensor(residual, "residual", 2)
    if tuple(residual.shape) != (M, N) or residual.dtype != x.dtype or residual.stride(-1) != 1:
        _fail("residual", f"a [{M}, {N}] {x.dtype} tensor with a contiguous last dimension",
              (tuple(residual.shape), residual.dtype))
    for name, p in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if p is not None or name == "norm_weight":
            expect_tensor(p, name, 1)
            if p.shape[0] != N or not p.is_contiguous():
                _fail(name, f"a contiguous [{N}] vector (the output width)", tuple(p.shape))
    if not isinstance(rms, bool):
        _fail("rms", "a bool (True: RMSNorm, False: LayerNorm)", rms)
    if rms and norm_bias is not None:
        _fail("norm_bias", "None with rms=True (RMSNorm has no bias)", tuple(norm_bias.shape))
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0):
        _fail("eps", "a positive number", eps)
    _check_output(out, "out", (M, N), x)
    _check_output(h_out, "h_out", (M, N), x)
    if out is not None and h_out is not None and out.data_ptr() == h_out.data_ptr():
        _fail("out", "a buffer other than h_out (both are written)", "h_out itself")
    expect_same_device(x, residual=residual, norm_weight=norm_weight,
                       **({} if norm_bias is None else {"norm_bias": norm_bias}))
    require_triton(x)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    h = torch.empty(M, N, dtype=x.dtype, device=x.device) if h_out is None else h_out
    if M == 0 or N == 0:
        return out, h
    block_k = _block_k(x.dtype)
    split_k, k_per_split = _split(split_k, x, K, N, NORM_BLOCK_M)
    grid = (_cdiv(M, NORM_BLOCK_M), _cdiv(N, BLOCK_N), split_k)
    if workspace is None:
        workspace = split_k_workspace(x.device, M, N)
    _check_workspace(workspace, x, M, N, grid[0])
    norm_block = triton.next_power_of_2(N)
    stride_wk, stride_wn = _weight_strides(weight, weight_layout)
    _linear_add_norm_kernel[grid](  # absent biases: x / norm_weight stand in, never read
        x, weight, x if bias is None else bias, residual, norm_weight,
        norm_weight if norm_bias is None else norm_bias, out, h, workspace.partials, workspace.counters, float(eps),
        M, K, k_per_split,
        x.stride(0), stride_wk, stride_wn, residual.stride(0), out.stride(0), h.stride(0),
        workspace.partials.stride(0),
        HIDDEN=N, NORM_BLOCK=norm_block, HAS_BIAS=bias is not None, HAS_NORM_BIAS=norm_bias is not None, RMS=rms,
        SPLIT_K=split_k, BLOCK_M=NORM_BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
        num_warps=8 if norm_block > 4096 else 4, num_stages=3,
    )
    return out, h


# ---------------------------------------------------------------- bytes moved (the step profiler's kernel models)
def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def linear_act_bytes(x, weight, bias, act: str, out=None, *, weight_layout: str, split_k=None, workspace=None) -> int:
    """What one linear_act call moves: x, W and b read, the output written; with a split, the workspace traffic
    (split_k atomic adds of the float32 partials, the epilogue's read and its zeroing)."""
    M, K = x.shape
    w_n = weight.shape[1] if weight_layout == "kn" else weight.shape[0]
    N = w_n // 2 if act == "silu_mul" else w_n
    split, _ = _split(split_k, x, K, N, _act_block_m(M, x.dtype))
    moved = _nbytes(x) + _nbytes(weight) + _nbytes(bias) + M * N * x.element_size()
    return moved + ((split + 2) * M * w_n * 4 if split > 1 else 0)


def linear_add_norm_bytes(x, weight, bias, residual, norm_weight, norm_bias, eps, rms, out=None, *,
                          weight_layout: str, h_out=None, split_k=None, workspace=None) -> int:
    """What one linear_add_norm call moves: x, W, b, residual and the norm's parameters read, out and h written;
    h read back by the norm (one split) or the workspace traffic (a split: the atomic adds, the read, the zeroing)."""
    M, K = x.shape
    N = residual.shape[1]
    split, _ = _split(split_k, x, K, N, NORM_BLOCK_M)
    moved = sum(_nbytes(t) for t in (x, weight, bias, residual, norm_weight, norm_bias)) + 2 * _nbytes(residual)
    return moved + ((split + 2) * M * N * 4 if split > 1 else _nbytes(residual))
