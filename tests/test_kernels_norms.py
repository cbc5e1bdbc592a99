"""Fused residual add + RMSNorm / LayerNorm (Triton; interpreted on CPU) against their torch references."""
import pytest
import torch

from coconut_fast.kernels import add_layer_norm, add_layer_norm_reference, add_rms_norm, add_rms_norm_reference
from kernel_cases import DEVICE, DTYPES, assert_close, needs_triton, randn

ROWS = 5


def inputs(hidden, dtype, with_residual, seed=0):
    x = randn(ROWS, hidden, dtype=dtype, seed=seed)
    residual = randn(ROWS, hidden, dtype=dtype, seed=seed + 1) * 3 if with_residual else None
    weight = (1 + 0.3 * randn(hidden, dtype=torch.float32, seed=seed + 2)).to(dtype)
    bias = randn(hidden, dtype=dtype, seed=seed + 3)
    return x, residual, weight, bias


def check(out, new_residual, expected_out, expected_residual, dtype):
    assert out.dtype == dtype and new_residual.dtype == dtype
    assert_close(out, expected_out, dtype)
    assert torch.equal(new_residual, expected_residual)  # one rounded add in both: exact


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [64, 96, 128])
def test_add_rms_norm_matches_reference(hidden, with_residual, dtype):
    x, residual, weight, _ = inputs(hidden, dtype, with_residual)
    out, new_residual = add_rms_norm(x, residual, weight, 1e-6)
    check(out, new_residual, *add_rms_norm_reference(x, residual, weight, 1e-6), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [64, 96, 128])
def test_add_layer_norm_matches_reference(hidden, with_residual, with_bias, dtype):
    x, residual, weight, bias = inputs(hidden, dtype, with_residual)
    bias = bias if with_bias else None
    out, new_residual = add_layer_norm(x, residual, weight, bias, 1e-5)
    check(out, new_residual, *add_layer_norm_reference(x, residual, weight, bias, 1e-5), dtype)


def test_references_match_hf_modules():
    """The references against HF Llama's RMSNorm and torch's LayerNorm (GPT-2's) applied to x + residual."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, residual, weight, bias = inputs(96, torch.float32, True)
    rms = LlamaRMSNorm(96, eps=1e-6).to(DEVICE)
    layer = torch.nn.LayerNorm(96, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        rms.weight.copy_(weight)
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        torch.testing.assert_close(add_rms_norm_reference(x, residual, weight, 1e-6)[0], rms(x + residual))
        torch.testing.assert_close(add_layer_norm_reference(x, residual, weight, bias, 1e-5)[0], layer(x + residual))


@pytest.mark.parametrize("name, value", [
    ("x", torch.zeros(5, 2, 96, device=DEVICE)),
    ("x", torch.zeros(5, 96, dtype=torch.int32, device=DEVICE)),
    ("residual", torch.zeros(4, 96, device=DEVICE)),
    ("residual", torch.zeros(5, 96, dtype=torch.float16, device=DEVICE)),
    ("weight", torch.zeros(64, device=DEVICE)),
    ("bias", torch.zeros(5, 96, device=DEVICE)),
    ("eps", -1.0),
])
def test_bad_arguments_are_named(name, value):
    x, residual, weight, bias = inputs(96, torch.float32, True)
    args = dict(x=x, residual=residual, weight=weight, bias=bias, eps=1e-5)
    args[name] = value
    with pytest.raises(ValueError, match=name):
        add_layer_norm(**args)
    if name != "bias":
        del args["bias"]
        with pytest.raises(ValueError, match=name):
            add_rms_norm(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path outside the interpreter")
def test_cpu_tensors_without_the_interpreter_point_to_the_references(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, residual, weight, _ = inputs(64, torch.float32, True)
    with pytest.raises(RuntimeError, match="_reference"):
        add_rms_norm(x, residual, weight, 1e-6)
