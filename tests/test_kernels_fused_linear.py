"""GEMMs with fused epilogues (Triton, interpreted on CPU) against their torch references: linear_act (none,
gelu_tanh, silu_mul) and linear_add_norm (RMSNorm, LayerNorm), both weight layouts, with and without bias, split-K
with its workspace left at zero for the next call; the references against HF's modules; the split rule.

Tolerances (kernel against reference, atol = rtol): float32 1e-5 (ieee tl.dot: only the summation order differs);
fp16 2e-3 and bf16 3e-2, a few units in the last place: the float32 sums differ in order, so a value near a rounding
boundary of the Linear's output can round the other way, and that unit carries through the activation or the norm.
"""
import math

import pytest
import torch

from coconut_fast.kernels import (fused_linear, linear_act, linear_act_reference, linear_add_norm,
                                  linear_add_norm_reference)
from coconut_fast.kernels.fused_linear import SplitKWorkspace, split_k_for
from kernel_cases import DEVICE, DTYPES, needs_triton, poisoned_like, randn

TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}
ROWS = [1, 3, 16, 64]
ACTS = ["none", "gelu_tanh", "silu_mul"]
NORMS = ["rms", "layer", "layer-no-bias"]
# (K, N, weight layout, bias, rows): GPT-2's tiny widths at every row count, each layout with and without bias; one
# realistic-ish width at M = 1 (split-K chosen by split_k_for) and M = 20 (a full and a partial row block), kept to
# two cases: the interpreter takes seconds per call there
CASES = [
    pytest.param(K, N, layout, with_bias, M, id=f"K{K}-N{N}-{layout}{'-bias' if with_bias else ''}-M{M}")
    for K, N, layout, with_bias in ((64, 64, "nk", True), (64, 64, "kn", False), (128, 128, "kn", True),
                                    (128, 128, "nk", False))
    for M in ROWS
] + [pytest.param(256, 768, "nk", False, 1, id="K256-N768-nk-M1"),
     pytest.param(256, 768, "kn", True, 20, id="K256-N768-kn-bias-M20")]


def assert_close(actual, expected, dtype):
    assert actual.dtype == dtype and not actual.isnan().any(), "NaN in the kernel output"
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def gemm_inputs(M, K, N, layout, with_bias, dtype, seed):
    """x [M, K]; W (as `layout` stores it) scaled so x @ W is of order 1; bias [N] or None."""
    x = randn(M, K, dtype=dtype, seed=seed)
    w = randn(N, K, dtype=torch.float32, seed=seed + 1) / math.sqrt(K)
    w = (w if layout == "nk" else w.t().contiguous()).to(dtype)
    bias = 0.5 * randn(N, dtype=dtype, seed=seed + 2) if with_bias else None
    return x, w, bias


def norm_inputs(M, N, norm, dtype, seed):
    residual = 3 * randn(M, N, dtype=dtype, seed=seed)
    weight = (1 + 0.3 * randn(N, dtype=torch.float32, seed=seed + 1)).to(dtype)
    bias = randn(N, dtype=dtype, seed=seed + 2) if norm == "layer" else None
    return residual, weight, bias


def zeroed_workspace(rows, cols):
    return SplitKWorkspace(torch.zeros(rows, cols, device=DEVICE),
                           torch.zeros(64, dtype=torch.int32, device=DEVICE))


def run_act(x, w, bias, act, layout, **kwargs):
    out_cols = (w.shape[0] if layout == "nk" else w.shape[1]) // (2 if act == "silu_mul" else 1)
    out = poisoned_like(torch.empty(x.shape[0], out_cols, dtype=x.dtype, device=DEVICE))
    result = linear_act(x, w, bias, act, out, weight_layout=layout, **kwargs)
    assert result is out
    return out


def run_add_norm(x, w, bias, residual, norm_w, norm_b, rms, layout, **kwargs):
    out, h = poisoned_like(residual), poisoned_like(residual)
    result = linear_add_norm(x, w, bias, residual, norm_w, norm_b, 1e-5, rms, out, weight_layout=layout, h_out=h,
                             **kwargs)
    assert result[0] is out and result[1] is h
    return out, h


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("K, N, layout, with_bias, M", CASES)
def test_linear_act_matches_reference(K, N, layout, with_bias, M, act, dtype):
    x, w, bias = gemm_inputs(M, K, N, layout, with_bias, dtype, seed=M + K)
    out = run_act(x, w, bias, act, layout)
    assert_close(out, linear_act_reference(x, w, bias, act, weight_layout=layout), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("K, N, layout, with_bias, M", CASES)
def test_linear_add_norm_matches_reference(K, N, layout, with_bias, M, norm, dtype):
    x, w, bias = gemm_inputs(M, K, N, layout, with_bias, dtype, seed=M + K)
    residual, norm_w, norm_b = norm_inputs(M, N, norm, dtype, seed=M + N + 7)
    out, h = run_add_norm(x, w, bias, residual, norm_w, norm_b, norm == "rms", layout)
    expected_out, expected_h = linear_add_norm_reference(x, w, bias, residual, norm_w, norm_b, 1e-5, norm == "rms",
                                                         weight_layout=layout)
    assert_close(h, expected_h, dtype)
    assert_close(out, expected_out, dtype)


# K = 192: three K blocks in fp16 / bf16 (six in float32), so split_k 2 and 3 both split
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("M", [1, 17])
@pytest.mark.parametrize("split_k", [2, 3])
def test_linear_act_split_k_leaves_the_workspace_zero(split_k, M, act, dtype):
    x, w, bias = gemm_inputs(M, 192, 128, "nk", True, dtype, seed=split_k + M)
    workspace = zeroed_workspace(M, 128)
    expected = linear_act_reference(x, w, bias, act, weight_layout="nk")
    first = run_act(x, w, bias, act, "nk", split_k=split_k, workspace=workspace)
    assert_close(first, expected, dtype)
    assert not workspace.partials.any() and not workspace.counters.any()
    second = run_act(x, w, bias, act, "nk", split_k=split_k, workspace=workspace)
    if DEVICE == "cpu":  # the interpreter adds the partials in one order
        assert torch.equal(second, first)
    assert_close(second, expected, dtype)
    assert not workspace.partials.any() and not workspace.counters.any()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("M", [1, 17])
@pytest.mark.parametrize("split_k", [1, 3])
def test_linear_add_norm_split_k_leaves_the_workspace_zero(split_k, M, norm, dtype):
    x, w, bias = gemm_inputs(M, 192, 96, "kn", True, dtype, seed=split_k + M)
    residual, norm_w, norm_b = norm_inputs(M, 96, norm, dtype, seed=5)
    workspace = zeroed_workspace(M, 96)
    expected = linear_add_norm_reference(x, w, bias, residual, norm_w, norm_b, 1e-5, norm == "rms",
                                         weight_layout="kn")
    first = run_add_norm(x, w, bias, residual, norm_w, norm_b, norm == "rms", "kn", split_k=split_k,
                         workspace=workspace)
    for got, want in zip(first, expected):
        assert_close(got, want, dtype)
    assert not workspace.partials.any() and not workspace.counters.any()
    second = run_add_norm(x, w, bias, residual, norm_w, norm_b, norm == "rms", "kn", split_k=split_k,
                          workspace=workspace)
    for got, again in zip(first, second):
        if DEVICE == "cpu":
            assert torch.equal(again, got)
        assert_close(again, got, dtype)
    assert not workspace.partials.any() and not workspace.counters.any()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_module_workspace_is_zero_after_calls_of_several_widths(dtype):
    """The module's own workspaces (split chosen by split_k_for: M = 1 splits K = 512) are left at zero."""
    for act, n in (("none", 64), ("silu_mul", 128)):
        x, w, bias = gemm_inputs(1, 512, n, "nk", True, dtype, seed=n)
        assert_close(run_act(x, w, bias, act, "nk"), linear_act_reference(x, w, bias, act, weight_layout="nk"), dtype)
    x, w, bias = gemm_inputs(1, 512, 64, "kn", False, dtype, seed=3)
    residual, norm_w, _ = norm_inputs(1, 64, "rms", dtype, seed=4)
    run_add_norm(x, w, bias, residual, norm_w, None, True, "kn")
    assert split_k_for(1, 512, 64, fused_linear.DEFAULT_SM_COUNT, element_size=x.element_size(),
                       block_k=fused_linear._block_k(dtype)) > 1
    for key in [(torch.device(DEVICE), 64), (torch.device(DEVICE), 128)]:
        ws = fused_linear._WORKSPACES[key]
        assert not ws.partials.any() and not ws.counters.any()


@needs_triton
@pytest.mark.parametrize("split_k", [1, 3])
def test_residual_updated_in_place(split_k):
    """h_out may be the residual itself: each element is read before it is overwritten, by the same program."""
    x, w, bias = gemm_inputs(5, 192, 96, "nk", True, torch.float32, seed=11)
    residual, norm_w, norm_b = norm_inputs(5, 96, "layer", torch.float32, seed=12)
    expected_out, expected_h = linear_add_norm_reference(x, w, bias, residual, norm_w, norm_b, 1e-5, False,
                                                         weight_layout="nk")
    out, h = linear_add_norm(x, w, bias, residual, norm_w, norm_b, 1e-5, False, weight_layout="nk", h_out=residual,
                             split_k=split_k)
    assert h is residual
    assert_close(residual, expected_h, torch.float32)
    assert_close(out, expected_out, torch.float32)


def test_references_match_hf_modules():
    """The references against GPT-2's MLP input (Conv1D + gelu_new), Llama's act(gate) * up and GPT-2's attention
    output + residual + ln_2, in float32."""
    from transformers import GPT2Config, LlamaConfig
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    torch.manual_seed(0)
    x = torch.randn(3, 32)
    gpt2 = GPT2MLP(128, GPT2Config(n_embd=32, activation_function="gelu_new")).eval()
    with torch.no_grad():
        expected = gpt2.act(gpt2.c_fc(x))
        got = linear_act_reference(x, gpt2.c_fc.weight, gpt2.c_fc.bias, "gelu_tanh", weight_layout="kn")
        torch.testing.assert_close(got, expected)
        llama = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act="silu")).eval()
        fused = torch.cat([llama.gate_proj.weight, llama.up_proj.weight])
        expected = llama.act_fn(llama.gate_proj(x)) * llama.up_proj(x)
        torch.testing.assert_close(linear_act_reference(x, fused, None, "silu_mul", weight_layout="nk"), expected)

        residual = torch.randn(3, 32)
        proj, ln = torch.nn.Linear(48, 32), torch.nn.LayerNorm(32, eps=1e-5)
        torch.nn.init.normal_(ln.weight, 1.0, 0.3)
        torch.nn.init.normal_(ln.bias)
        a = torch.randn(3, 48)
        h = proj(a) + residual
        out, got_h = linear_add_norm_reference(a, proj.weight, proj.bias, residual, ln.weight, ln.bias, 1e-5, False,
                                               weight_layout="nk")
        torch.testing.assert_close(got_h, h)
        torch.testing.assert_close(out, ln(h))
        rms = LlamaRMSNorm(32, eps=1e-6)
        torch.nn.init.normal_(rms.weight, 1.0, 0.3)
        out, _ = linear_add_norm_reference(a, proj.weight, proj.bias, residual, rms.weight, None, 1e-6, True,
                                           weight_layout="nk")
        torch.testing.assert_close(out, rms(h))


def test_split_k_for_parallelism_and_bytes():
    # GPT-2's o_proj (K = N = 768, fp16) on 132 SMs: 12 tiles at M = 1 want 22 splits, the bytes allow 17
    assert split_k_for(1, 768, 768, 132) == 12  # ... and K has 12 blocks of 64
    assert split_k_for(3, 768, 768, 132) == 4
    assert split_k_for(8, 768, 768, 132) == 1
    assert split_k_for(64, 768, 768, 132) == 1
    assert split_k_for(1, 2048, 2048, 132) == 8  # Llama 1B o_proj: 32 tiles want 9 splits, whole K blocks give 8
    assert split_k_for(1, 768, 768 * 200, 132) == 1  # enough tiles already
    for M in (1, 2, 3, 5, 16, 64, 256):
        for K, N in ((768, 768), (3072, 768), (2048, 2048), (8192, 2048), (4096, 4096)):
            for element_size in (2, 4):
                split = split_k_for(M, K, N, 132, element_size=element_size)
                assert 1 <= split <= -(-K // 64)
                if split > 1:  # the workspace traffic stays within its share of the weight bytes
                    assert (split + 2) * M * N * 4 <= fused_linear.WORKSPACE_BYTES_FRACTION * K * N * element_size
                assert split_k_for(M + 1, K, N, 132, element_size=element_size) <= split


def test_bytes_models():
    """One split: the tensors once each (and h read back by the norm); a split adds its workspace traffic, which
    split_k_for keeps within its share of the weight bytes (GPT-2's o_proj at M = 1 in fp16: 12 splits)."""
    x, w, bias = gemm_inputs(3, 64, 32, "nk", True, torch.float16, seed=0)
    residual, norm_w, norm_b = norm_inputs(3, 32, "layer", torch.float16, seed=1)
    tensors = 2 * (3 * 64 + 32 * 64 + 32)
    assert fused_linear.linear_act_bytes(x, w, bias, "none", weight_layout="nk", split_k=1) == tensors + 2 * 3 * 32
    assert fused_linear.linear_act_bytes(x, w, bias, "silu_mul", weight_layout="nk", split_k=1) == tensors + 2 * 3 * 16
    assert fused_linear.linear_act_bytes(x, w, bias, "none", weight_layout="nk", split_k=4) == (
        tensors + 2 * 3 * 32)  # K = 64 is one block: one split whatever is asked
    x4, w4, _ = gemm_inputs(3, 256, 32, "nk", False, torch.float16, seed=0)  # four K blocks: four splits
    assert fused_linear.linear_act_bytes(x4, w4, None, "none", weight_layout="nk", split_k=4) == (
        2 * (3 * 256 + 32 * 256 + 3 * 32) + (4 + 2) * 3 * 32 * 4)
    norm = 2 * 2 * 32 + 3 * 2 * 3 * 32  # norm weight and bias; residual read, out and h written
    assert fused_linear.linear_add_norm_bytes(x, w, bias, residual, norm_w, norm_b, 1e-5, False, weight_layout="nk",
                                              split_k=1) == tensors + norm + 2 * 3 * 32
    x, w, bias = gemm_inputs(1, 768, 768, "kn", True, torch.float16, seed=2)
    residual, norm_w, norm_b = norm_inputs(1, 768, "layer", torch.float16, seed=3)
    moved = fused_linear.linear_add_norm_bytes(x, w, bias, residual, norm_w, norm_b, 1e-5, False, weight_layout="kn")
    floor = 768 * 768 * 2 + 2 * (768 + 768 + 3 * 768 + 2 * 768)
    assert moved == floor + (12 + 2) * 768 * 4
    assert moved <= (1 + fused_linear.WORKSPACE_BYTES_FRACTION) * floor


def bad_case(name, value):
    x, w, bias = gemm_inputs(3, 64, 32, "nk", True, torch.float32, seed=0)
    residual, norm_w, norm_b = norm_inputs(3, 32, "layer", torch.float32, seed=1)
    args = {"x": x, "weight": w, "bias": bias, "residual": residual, "norm_weight": norm_w, "norm_bias": norm_b,
            "eps": 1e-5, "rms": False, "out": None, "weight_layout": "nk", "h_out": None, "split_k": None,
            "workspace": None}
    if isinstance(value, SplitKWorkspace):
        value = SplitKWorkspace(value.partials.to(DEVICE), value.counters.to(DEVICE))
    args[name] = value.to(DEVICE) if isinstance(value, torch.Tensor) else value
    return args


@pytest.mark.parametrize("name, value", [
    ("x", torch.zeros(3, 2, 64)),
    ("x", torch.zeros(3, 64, dtype=torch.int32)),
    ("x", torch.zeros(64, 3).t()),
    ("weight", torch.zeros(32, 63)),
    ("weight", torch.zeros(32, 64, dtype=torch.float16)),
    ("bias", torch.zeros(31)),
    ("weight_layout", "km"),
    ("split_k", 0),
    ("out", torch.zeros(3, 31)),
    ("workspace", SplitKWorkspace(torch.zeros(3, 32, dtype=torch.float16), torch.zeros(64, dtype=torch.int32))),
])
def test_bad_arguments_are_named(name, value):
    args = bad_case(name, value)
    for key in ("residual", "norm_weight", "norm_bias", "eps", "rms", "h_out"):
        del args[key]
    with pytest.raises(ValueError, match=name):
        linear_act(**{**args, "split_k": 2 if name == "workspace" else args["split_k"]}, act="none")


def test_bad_act_and_odd_gate_up_are_named():
    args = {k: v for k, v in bad_case("x", torch.zeros(3, 64).to(DEVICE)).items() if k in ("x", "weight", "bias")}
    with pytest.raises(ValueError, match="act"):
        linear_act(**args, act="gelu", weight_layout="nk")
    with pytest.raises(ValueError, match="weight"):
        linear_act(args["x"], torch.zeros(31, 64, device=DEVICE), None, "silu_mul", weight_layout="nk")


@pytest.mark.parametrize("name, value", [
    ("x", torch.zeros(3, 2, 64)),
    ("weight", torch.zeros(64, 32)),  # [K, N] given as "nk"
    ("residual", torch.zeros(4, 32)),
    ("residual", torch.zeros(3, 32, dtype=torch.float16)),
    ("norm_weight", torch.zeros(31)),
    ("norm_bias", torch.zeros(3, 32)),
    ("eps", 0.0),
    ("rms", 1),
    ("h_out", torch.zeros(3, 31)),
    ("workspace", SplitKWorkspace(torch.zeros(3, 31), torch.zeros(64, dtype=torch.int32))),
])
def test_bad_norm_arguments_are_named(name, value):
    with pytest.raises(ValueError, match=name):
        linear_add_norm(**bad_case(name, value))


def test_rms_with_a_norm_bias_is_refused():
    args = bad_case("rms", True)
    with pytest.raises(ValueError, match="norm_bias"):
        linear_add_norm(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path outside the interpreter")
def test_cpu_tensors_without_the_interpreter_point_to_the_references(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, bias = gemm_inputs(3, 64, 32, "nk", True, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="_reference"):
        linear_act(x, w, bias, "none", weight_layout="nk")
