"""CoconutModel.forward and .generate against the reference, on tiny models of every family (float32, CPU).

Tolerances (float32): loss within 1e-5 relative; logits within 1e-5 of the largest |logit|;
each parameter gradient within 1e-5 relative (max abs difference over the reference's max abs).
"""
import pytest
import torch

from coconut_fast.reference import (
    causal_lm_loss,
    default_position_ids,
    fill_latents,
    reference_forward,
    reference_generate,
)
from coconut_fast.generation import left_pad
from coconut_fast import CoconutModel
from coconut_fast.tiny import FAMILIES, tiny_config
from conftest import VOCAB, backbone_call_widths, make_coconut, word_tokenizer

RTOL = 1e-5


def build_batch(cm, rows, pad_left=False):
    """Pad token-id rows into (input_ids, attention_mask, labels); labels mask everything up to <eot>."""
    ids = cm.latent_ids
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), cm.tokenizer.pad_token_id)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for b, r in enumerate(rows):
        cols = slice(T - len(r), T) if pad_left else slice(0, len(r))
        input_ids[b, cols] = torch.tensor(r)
        mask[b, cols] = 1
        lab = list(r)
        cut = r.index(ids.end) + 1 if ids.end in r else 2
        lab[:cut] = [-100] * cut
        labels[b, cols] = torch.tensor(lab)
    return input_ids, mask, labels


def sequence(cm, question, k, answer):
    ids = cm.latent_ids
    return list(question) + [ids.start] + [ids.latent] * k + [ids.end] + list(answer) + [cm.tokenizer.eos_token_id]


CASES = {
    "no_latents": ([[5, 6, 7, 8, 9, 10, 60]], False),
    "one_latent": ([("q", [5, 6, 7], 1, [9, 10, 11])], False),
    "several_latents": ([("q", [5, 6, 7], 4, [9, 10, 11]), ("q", [1, 2, 3], 4, [12, 13])], False),
    "different_counts": ([("q", [5, 6, 7, 8], 3, [9, 10]), ("q", [1, 2], 1, [12, 13, 14]), ("q", [3, 4, 5], 0, [7])], False),
    "left_padding": ([("q", [5, 6, 7, 8, 9], 2, [9, 10]), ("q", [1, 2], 3, [12, 13, 14])], True),
    "c_thought_2": ([("q", [5, 6, 7], 2 * 2, [9]), ("q", [1, 2, 3, 4], 2 * 1, [12, 13, 14])], False),
    "with_plain_sample": ([("q", [5, 6, 7], 2, [9, 10]), [1, 2, 3, 4, 5, 60]], False),
}


def case_rows(cm, name):
    spec, left = CASES[name]
    rows = [sequence(cm, s[1], s[2], s[3]) if isinstance(s, tuple) else s for s in spec]
    return build_batch(cm, rows, pad_left=left)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_reference(family, case):
    cm = make_coconut(family)
    input_ids, mask, labels = case_rows(cm, case)
    out = cm(input_ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    fast_grads = {n: p.grad.clone() for n, p in cm.model.named_parameters() if p.grad is not None}
    cm.model.zero_grad()
    ref_loss, ref_logits, ref_embeds = reference_forward(cm.model, input_ids, cm.latent_ids.latent, mask, labels)
    ref_loss.backward()
    valid = mask.bool()
    assert abs(out.loss.item() - ref_loss.item()) <= RTOL * abs(ref_loss.item())
    assert rel_err(out.logits[valid], ref_logits[valid]) <= RTOL
    assert rel_err(out.inputs_embeds[valid], ref_embeds[valid]) <= RTOL
    ref_grads = {n: p.grad for n, p in cm.model.named_parameters() if p.grad is not None}
    assert fast_grads.keys() == ref_grads.keys() and len(ref_grads) > 0
    for n, g in ref_grads.items():
        assert rel_err(fast_grads[n], g) <= RTOL, n


def test_gradients_flow_through_the_thoughts():
    """Cutting the thoughts out of the graph changes the gradients: the fast path keeps them in."""
    cm = make_coconut("llama")
    input_ids, mask, labels = case_rows(cm, "several_latents")
    cm(input_ids, attention_mask=mask, labels=labels).loss.backward()
    fast = {n: p.grad.clone() for n, p in cm.model.named_parameters()}
    cm.model.zero_grad()
    embeds = fill_latents(cm.model, input_ids, mask, default_position_ids(mask), cm.latent_ids.latent).detach()
    logits = cm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=default_position_ids(mask)).logits
    causal_lm_loss(logits, labels).backward()
    detached = {n: p.grad for n, p in cm.model.named_parameters()}
    worst = max(rel_err(fast[n], detached[n]) for n in fast if detached[n] is not None)
    assert worst > 100 * RTOL


def test_unaligned_batch_is_aligned_internally():
    """A batch whose first latents differ in column is aligned internally; results equal the reference."""
    cm = make_coconut("gpt2")
    input_ids, mask, labels = case_rows(cm, "different_counts")
    with torch.no_grad():
        calls = backbone_call_widths(cm, lambda: cm(input_ids, attention_mask=mask, labels=labels))
    # prefix, 3 latent columns (max latents), then the rest
    assert len(calls) == 1 + 3 + 1 and calls[1:4] == [1, 1, 1]


def prompt_batch(cm, prompts):
    return left_pad(prompts, cm.tokenizer.pad_token_id)


def new_tokens(seq_row, prompt_length, eos):
    toks = seq_row[prompt_length:].tolist()
    return toks[: toks.index(eos) + 1] if eos in toks else toks


GEN_CASES = {
    "no_thoughts": [0, 0],
    "one_thought": [1, 1],
    "several": [4, 4],
    "different_counts": [3, 1, 0],
    "c_thought_2": [4, 2],
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(GEN_CASES))
def test_generate_matches_reference(family, case):
    cm = make_coconut(family, seed=1)
    counts = GEN_CASES[case]
    questions = [[5, 6, 7, 8, 9], [1, 2], [30, 31, 32, 33]][: len(counts)]
    ids, mask = prompt_batch(cm, questions)
    eos = cm.tokenizer.eos_token_id
    out = cm.generate(ids, mask, num_thoughts=counts, max_new_tokens=10, return_dict_in_generate=True, output_thoughts=True)
    L = cm.latent_ids
    for b, (q, k) in enumerate(zip(questions, counts)):
        prompt = q + [L.start] + [L.latent] * k + [L.end]
        ref_tokens, ref_thoughts = reference_generate(cm.model, prompt, L.latent, eos, 10)
        assert new_tokens(out.sequences[b], out.prompt_length, eos) == ref_tokens
        assert out.num_thoughts[b].item() == k
        if k:
            assert rel_err(out.thoughts[b, :k], ref_thoughts) <= RTOL
        assert out.sequences[b, out.prompt_length - len(prompt) : out.prompt_length].tolist() == prompt


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_generate_official_format_equals_num_thoughts(family):
    """Prompts that already carry <bot><latent>…<eot> give the same output as num_thoughts."""
    cm = make_coconut(family, seed=2)
    L = cm.latent_ids
    questions, counts = [[5, 6, 7], [8, 9, 10, 11, 12]], [2, 3]
    carried = [q + [L.start] + [L.latent] * k + [L.end] for q, k in zip(questions, counts)]
    a = cm.generate(*prompt_batch(cm, carried), max_new_tokens=6)
    b = cm.generate(*prompt_batch(cm, questions), num_thoughts=counts, max_new_tokens=6)
    assert torch.equal(a, b)


def first_steps(runs, token):
    """The step at which each run first emits `token` (None where it never does)."""
    return [run.index(token) if token in run else None for run in runs]


def test_generate_stops_each_sample_at_eos_and_pads():
    """With an EOS the model really emits, each sample stops at its own EOS, then pads; the others go on."""
    cm = make_coconut("llama", seed=3)
    L, pad, n = cm.latent_ids, cm.tokenizer.pad_token_id, 8
    questions, counts = [[1, 2, 7], [5, 6, 7, 8, 9], [30, 31, 32, 33]], [1, 2, 0]
    ids, mask = prompt_batch(cm, questions)
    free = cm.generate(ids, mask, num_thoughts=counts, max_new_tokens=n, eos_token_id=[], return_dict_in_generate=True)
    runs = free.sequences[:, free.prompt_length :].tolist()
    # the EOS: a token two samples emit mid-sequence at different steps and the third never emits
    chosen = [t for t in sorted(set(runs[0]))
              if (s := first_steps(runs, t))[1] is None and None not in (s[0], s[2]) and s[0] != s[2]
              and max(s[0], s[2]) < n - 1]
    assert chosen, f"no token fits as EOS in the greedy runs {runs}"
    eos = chosen[0]
    out = cm.generate(ids, mask, num_thoughts=counts, max_new_tokens=n, eos_token_id=eos, return_dict_in_generate=True)
    new = out.sequences[:, out.prompt_length :].tolist()
    stops = [s + 1 if s is not None else n for s in first_steps(runs, eos)]
    assert stops[1] == n and stops[0] < n and stops[2] < n and stops[0] != stops[2]
    for b, (q, k) in enumerate(zip(questions, counts)):
        # up to its EOS the sample is its free run, then only pad; a sample without EOS runs all n steps
        assert new[b] == runs[b][: stops[b]] + [pad] * (n - stops[b]), b
        ref, _ = reference_generate(cm.model, q + [L.start] + [L.latent] * k + [L.end], L.latent, eos, n)
        assert ref == runs[b][: stops[b]], b


def test_sampling_is_seeded_and_respects_top_k():
    cm = make_coconut("qwen2", seed=4)
    ids, mask = prompt_batch(cm, [[1, 2, 3], [4, 5]])
    torch.manual_seed(0)
    a = cm.generate(ids, mask, num_thoughts=2, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=5, top_p=0.9)
    torch.manual_seed(0)
    b = cm.generate(ids, mask, num_thoughts=2, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=5, top_p=0.9)
    assert torch.equal(a, b)
    torch.manual_seed(0)
    c = cm.generate(ids, mask, num_thoughts=2, max_new_tokens=1, do_sample=True, top_k=1)
    greedy = cm.generate(ids, mask, num_thoughts=2, max_new_tokens=1)
    assert torch.equal(c, greedy)  # top_k=1 sampling is greedy


def test_sliding_window_attention_matches_reference():
    """Mistral with a window shorter than the sequence: the cache keeps only the window, like the mask."""
    from transformers import MistralForCausalLM

    config = tiny_config("mistral", VOCAB)
    config.sliding_window = 4
    torch.manual_seed(0)
    cm = CoconutModel.from_pretrained(MistralForCausalLM(config).eval(), tokenizer=word_tokenizer())
    input_ids, mask, labels = case_rows(cm, "several_latents")
    with torch.no_grad():
        out = cm(input_ids, attention_mask=mask, labels=labels)
        ref_loss, ref_logits, _ = reference_forward(cm.model, input_ids, cm.latent_ids.latent, mask, labels)
    valid = mask.bool()
    assert abs(out.loss.item() - ref_loss.item()) <= RTOL * abs(ref_loss.item())
    assert rel_err(out.logits[valid], ref_logits[valid]) <= RTOL


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bfloat16_forward_is_close_to_float32_reference(family):
    """bf16 weights and activations: loss within 2e-2 relative and logits within 5e-2 of the largest, against float32."""
    cm = make_coconut(family)
    input_ids, mask, labels = case_rows(cm, "different_counts")
    with torch.no_grad():
        ref_loss, ref_logits, _ = reference_forward(cm.model, input_ids, cm.latent_ids.latent, mask, labels)
        cm.model.to(torch.bfloat16)
        out = cm(input_ids, attention_mask=mask, labels=labels)
    valid = mask.bool()
    assert out.logits.dtype == torch.bfloat16
    assert abs(out.loss.item() - ref_loss.item()) <= 2e-2 * abs(ref_loss.item())
    assert rel_err(out.logits[valid].float(), ref_logits[valid]) <= 5e-2
