"""The fast training forward: chunked linear cross-entropy, host reads, mixed precision, checkpointing.

Tolerances, measured on CPU over seeds 0-2 of the tiny models and set with a margin:
- float32: loss within 1e-5 relative; every parameter gradient within 1e-5 relative (max abs
  difference over the reference's max abs); chunked CE alone against float64 within 1e-5.
- bf16 autocast (float32 weights) and pure bf16 weights against the float32 reference:
  loss within 1e-3 relative (measured <= 1.3e-4), every gradient's cosine similarity >= 0.999
  (measured >= 0.9997). Chunked CE against the full logits in the same bf16 mode: loss within
  1e-4 relative, gradient cosine >= 0.9999.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from coconut_fast.losses import ChunkedLinearCrossEntropy, causal_lm_linear_loss, linear_cross_entropy
from coconut_fast.passes import Backbone
from coconut_fast.reference import reference_forward
from conftest import make_coconut
from test_model_parity import build_batch, case_rows, rel_err, sequence

RTOL = 1e-5


def grads_of(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def fast_run(cm, batch, **options):
    input_ids, mask, labels = batch
    cm.model.zero_grad(set_to_none=True)
    out = cm(input_ids, attention_mask=mask, labels=labels, **options)
    out.loss.backward()
    return out, grads_of(cm.model)


def reference_run(cm, batch):
    input_ids, mask, labels = batch
    cm.model.zero_grad(set_to_none=True)
    loss, logits, embeds = reference_forward(cm.model, input_ids, cm.latent_ids.latent, mask, labels)
    loss.backward()
    return loss, logits, grads_of(cm.model)


def assert_grads_close(got, expected, rtol=RTOL):
    assert got.keys() == expected.keys() and expected
    for name, g in expected.items():
        assert rel_err(got[name], g) <= rtol, name


def cosine(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


# ------------------------------------------------------------------ chunked linear cross-entropy
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 7, 64, None])
def test_chunked_cross_entropy_matches_float64_reference(bias, chunk_rows):
    gen = torch.Generator().manual_seed(chunk_rows or 0)
    N, H, V = 37, 16, 53
    hidden = torch.randn(N, H, generator=gen, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, requires_grad=True)
    b = torch.randn(V, generator=gen, requires_grad=True) if bias else None
    targets = torch.randint(0, V, (N,), generator=gen)
    upstream = 0.5 + torch.rand((), generator=gen)  # a non-unit incoming gradient
    loss = linear_cross_entropy(hidden, weight, b, targets, chunk_rows=chunk_rows, use_liger=False)
    (loss * upstream).backward()
    leaves = [hidden, weight] + ([b] if bias else [])
    got = [t.grad.clone() for t in leaves]
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    logits = F.linear(doubles[0], doubles[1], doubles[2] if bias else None)
    ref = F.cross_entropy(logits, targets, reduction="sum")
    (ref * upstream.double()).backward()
    assert abs(loss.item() - ref.item()) <= RTOL * abs(ref.item())
    for g, d in zip(got, doubles):
        assert rel_err(g.double(), d.grad) <= RTOL


def test_chunked_cross_entropy_holds_one_chunk_of_logits():
    """What autograd keeps is the inputs and one float per row, never [rows x vocab]."""
    N, H, V = 64, 8, 1000
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = ChunkedLinearCrossEntropy.apply(hidden, weight, None, torch.randint(0, V, (N,)), 8, torch.float32)
    assert sum(saved) == N * H + V * H + N + N  # hidden, weight, targets, log-sum-exp
    loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_chunked_cross_entropy_under_autocast_matches_bf16_logits():
    """Under bf16 autocast the logits come from bf16 matmuls, as with the plain LM head, softmax in float32."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(50, 32, generator=gen, requires_grad=True)
    weight = torch.randn(97, 32, generator=gen, requires_grad=True)
    targets = torch.randint(0, 97, (50,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, None, targets, chunk_rows=16, use_liger=False)
        ref = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    assert loss.dtype == torch.float32
    got = torch.autograd.grad(loss, [hidden, weight])
    expected = torch.autograd.grad(ref, [hidden, weight])
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item())
    for g, e in zip(got, expected):
        assert cosine(g, e) >= 0.9999


def test_liger_kernel_is_called_where_chosen(monkeypatch):
    """The Liger call (CUDA only) is checked with a stand-in: summed loss, the autocast dtype, ignore index unused."""
    import coconut_fast.losses as losses

    calls = []

    def stand_in(hidden, weight, targets, bias=None, reduction="mean"):
        calls.append((hidden.dtype, weight.dtype, reduction))
        return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction=reduction)

    hidden, weight = torch.randn(10, 8, requires_grad=True), torch.randn(20, 8)
    targets = torch.randint(0, 20, (10,))
    monkeypatch.setattr(losses, "liger_fused_linear_cross_entropy", None)
    with pytest.raises(ImportError, match="liger"):
        linear_cross_entropy(hidden, weight, None, targets, use_liger=True)
    monkeypatch.setattr(losses, "liger_fused_linear_cross_entropy", stand_in)
    linear_cross_entropy(hidden, weight, None, targets)  # CPU tensors: the chunked path
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, None, targets, use_liger=True)
    assert calls == [(torch.bfloat16, torch.bfloat16, "sum")] and loss.dtype == torch.float32


def test_causal_lm_linear_loss_uses_only_labelled_positions():
    gen = torch.Generator().manual_seed(4)
    head = torch.nn.Linear(16, 40, bias=True)
    hidden = torch.randn(3, 9, 16, generator=gen)
    labels = torch.randint(0, 40, (3, 9), generator=gen)
    labels[0, :5] = -100
    labels[2, 3:] = -100
    logits = head(hidden)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1), ignore_index=-100)
    got = causal_lm_linear_loss(hidden, head, labels, chunk_rows=4, use_liger=False)
    assert abs(got.item() - expected.item()) <= RTOL * abs(expected.item())


# ------------------------------------------------------------------ the forward, float32
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
@pytest.mark.parametrize("case", ["different_counts", "left_padding", "with_plain_sample"])
def test_forward_without_logits_matches_reference(family, case):
    cm = make_coconut(family)
    batch = case_rows(cm, case)
    out, grads = fast_run(cm, batch, return_logits=False)
    ref_loss, _, ref_grads = reference_run(cm, batch)
    assert out.logits is None
    assert abs(out.loss.item() - ref_loss.item()) <= RTOL * abs(ref_loss.item())
    assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_eager_attention_takes_the_sliced_additive_mask(family):
    """Eager attention gets float masks (sdpa: boolean): the sliced full mask matches the reference too."""
    cm = make_coconut(family)
    cm.model.set_attn_implementation("eager")
    batch = case_rows(cm, "left_padding")
    embeds = cm.model.get_input_embeddings()(batch[0])
    assert cm.backbone.full_mask(embeds, batch[1], torch.zeros_like(batch[0])).is_floating_point()
    out, grads = fast_run(cm, batch, return_logits=False)
    ref_loss, _, ref_grads = reference_run(cm, batch)
    assert abs(out.loss.item() - ref_loss.item()) <= RTOL * abs(ref_loss.item())
    assert_grads_close(grads, ref_grads)


def test_forward_options_are_checked():
    cm = make_coconut("gpt2")
    input_ids, mask, labels = case_rows(cm, "several_latents")
    with pytest.raises(ValueError, match="return_logits=False .* needs labels"):
        cm(input_ids, attention_mask=mask, return_logits=False)
    with pytest.raises(ValueError, match="latent_mode must be one of"):
        cm(input_ids, attention_mask=mask, latent_mode="jacobi")
    with pytest.raises(ValueError, match="needs jacobi_iterations"):
        cm(input_ids, attention_mask=mask, latent_mode="parallel")
    with pytest.raises(ValueError, match="jacobi_iterations applies to latent_mode='parallel'"):
        cm(input_ids, attention_mask=mask, jacobi_iterations=2)


# ------------------------------------------------------------------ host reads
READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere", "masked_select",
         "unique"}


class HostReads(TorchFunctionMode):
    """Counts torch calls that read a device value back to the host (a sync on an accelerator)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name == "__getitem__" else ()
        index = index if isinstance(index, tuple) else (index,)
        if name in READS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def count_host_reads(cm, k, **options):
    rows = [sequence(cm, [5, 6, 7], k, [9, 10]), sequence(cm, [1, 2], k - 1, [12, 13, 14])]
    input_ids, mask, labels = build_batch(cm, rows)
    with HostReads() as reads:
        cm(input_ids, attention_mask=mask, labels=labels, **options).loss.backward()
    return len(reads.calls)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_host_reads_do_not_grow_with_the_number_of_passes(family):
    cm = make_coconut(family)
    assert count_host_reads(cm, 1) == count_host_reads(cm, 6) == 1
    assert count_host_reads(cm, 1, return_logits=False) == count_host_reads(cm, 6, return_logits=False) == 2
    parallel = dict(latent_mode="parallel", jacobi_iterations=3)
    assert count_host_reads(cm, 2, **parallel) == count_host_reads(cm, 6, **parallel) == 1
    input_ids, mask, labels = case_rows(cm, "left_padding")
    input_ids[input_ids == cm.latent_ids.latent] = 7  # no latents: one uncached pass
    with HostReads() as reads:
        cm(input_ids, attention_mask=mask, labels=labels).loss.backward()
    assert len(reads.calls) == 1


def test_host_read_counter_sees_per_pass_mask_building(monkeypatch):
    """The counter is able to fail: with the model building each pass's mask, reads grow per pass."""
    cm = make_coconut("llama")
    monkeypatch.setattr(Backbone, "full_mask", lambda *args: None)
    assert count_host_reads(cm, 6) > count_host_reads(cm, 1) + 4


# ------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("precision", ["bf16_autocast", "bf16_weights"])
def test_bf16_training_step_is_close_to_float32_reference(family, precision):
    cm = make_coconut(family)
    batch = case_rows(cm, "different_counts")
    ref_loss, _, ref_grads = reference_run(cm, batch)
    results = {}
    for return_logits in (True, False):
        m = copy.deepcopy(cm)
        if precision == "bf16_weights":
            m.model.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16_autocast"):
            out, grads = fast_run(m, batch, return_logits=return_logits)
        assert out.loss.dtype == torch.float32 and grads.keys() == ref_grads.keys()
        assert abs(out.loss.item() - ref_loss.item()) <= 1e-3 * abs(ref_loss.item())
        for name, g in ref_grads.items():
            assert cosine(grads[name], g) >= 0.999, name
        results[return_logits] = out.loss, grads
    (full_loss, full_grads), (chunked_loss, chunked_grads) = results[True], results[False]
    assert abs(full_loss.item() - chunked_loss.item()) <= 1e-4 * abs(full_loss.item())
    for name, g in full_grads.items():
        assert cosine(chunked_grads[name], g) >= 0.9999, name


# ------------------------------------------------------------------ activation checkpointing
def count_recomputes(cm, run):
    """Decoder-layer MLP calls during backward (a replayed layer calls its MLP again)."""
    calls = []
    mlps = [m for n, m in cm.model.named_modules() if n.endswith("mlp")]
    handles = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in mlps]
    try:
        out = run()
        forward_calls = len(calls)
        out.loss.backward()
    finally:
        for h in handles:
            h.remove()
    return len(calls) - forward_calls, out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradient_checkpointing_matches_reference_and_recomputes(family):
    cm = make_coconut(family)
    batch = case_rows(cm, "different_counts")
    input_ids, mask, labels = batch
    ref_loss, _, ref_grads = reference_run(cm, batch)
    passes = 1 + 3 + 1  # prefix, three latent columns, the rest
    for options in (dict(gradient_checkpointing=True), dict(gradient_checkpointing=True, return_logits=False)):
        cm.model.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            recomputed, out = count_recomputes(cm, lambda: cm(input_ids, attention_mask=mask, labels=labels, **options))
        assert recomputed == passes * 2  # every pass of both layers replayed once
        assert abs(out.loss.item() - ref_loss.item()) <= RTOL * abs(ref_loss.item())
        assert_grads_close(grads_of(cm.model), ref_grads)
    cm.model.zero_grad(set_to_none=True)
    plain_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain_saved.append(t.numel()) or t, lambda t: t):
        out = cm(input_ids, attention_mask=mask, labels=labels)
    assert sum(saved) < sum(plain_saved) / 3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_activation_checkpointing_flag_is_honoured_with_the_cache(family):
    """HF's own checkpointing drops the KV cache in training; forward checkpoints the marked layers itself."""
    cm = make_coconut(family)
    batch = case_rows(cm, "several_latents")
    input_ids, mask, labels = batch
    ref_loss, _, ref_grads = reference_run(cm, batch)
    cm.model.activation_checkpointing_enable(every_n_layers=2)  # marks one of the two layers
    marked = [n for n, m in cm.model.named_modules() if getattr(m, "gradient_checkpointing", False) is True]
    cm.train()
    cm.model.zero_grad(set_to_none=True)
    recomputed, out = count_recomputes(cm, lambda: cm(input_ids, attention_mask=mask, labels=labels))
    assert recomputed == 1 + 4 + 1  # the marked layer, once per pass
    assert abs(out.loss.item() - ref_loss.item()) <= RTOL * abs(ref_loss.item())
    assert_grads_close(grads_of(cm.model), ref_grads)
    assert marked == [n for n, m in cm.model.named_modules() if getattr(m, "gradient_checkpointing", False) is True]
    cm.eval()
    cm.model.zero_grad(set_to_none=True)
    recomputed, _ = count_recomputes(cm, lambda: cm(input_ids, attention_mask=mask, labels=labels))
    assert recomputed == 0  # like HF: only in training mode


def test_checkpointing_with_sliding_window_cache_matches_reference():
    """Sliding-window layers keep a cut cache and take per-pass masks; the replay restores them too."""
    from transformers import MistralForCausalLM

    from coconut_fast import CoconutModel
    from coconut_fast.tiny import tiny_config
    from conftest import VOCAB, word_tokenizer

    config = tiny_config("mistral", VOCAB)
    config.sliding_window = 4
    torch.manual_seed(0)
    cm = CoconutModel.from_pretrained(MistralForCausalLM(config).eval(), tokenizer=word_tokenizer())
    assert cm.backbone.sliding
    batch = case_rows(cm, "several_latents")
    out, grads = fast_run(cm, batch, gradient_checkpointing=True, return_logits=False)
    ref_loss, _, ref_grads = reference_run(cm, batch)
    assert abs(out.loss.item() - ref_loss.item()) <= RTOL * abs(ref_loss.item())
    assert_grads_close(grads, ref_grads)
