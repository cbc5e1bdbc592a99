"""Random batch layouts (latent counts, question lengths, padding side, collator alignment):
CoconutModel.forward equals the reference in float32 within 1e-5 relative."""
import random

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coconut_fast.data import CoconutCollator
from coconut_fast.reference import reference_forward
from conftest import make_coconut

MODELS = {}


def model(family):
    if family not in MODELS:
        MODELS[family] = make_coconut(family, seed=7)
    return MODELS[family]


samples = st.lists(
    st.tuples(st.integers(1, 6), st.integers(0, 5), st.integers(0, 4)),  # question, latents, answer lengths
    min_size=1,
    max_size=4,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(samples=samples, family=st.sampled_from(["gpt2", "llama", "qwen3"]), align=st.booleans(), seed=st.integers(0, 99))
def test_random_layouts_match_reference(samples, family, align, seed):
    cm = model(family)
    ids = cm.latent_ids
    rnd = random.Random(seed)
    features = []
    for q, k, a in samples:
        question = [rnd.randrange(60) for _ in range(q)]
        answer = [rnd.randrange(60) for _ in range(a)] + [cm.tokenizer.eos_token_id]
        tokens = question + [ids.start] + [ids.latent] * k + [ids.end] + answer
        labels = [-100] * (q + k + 2) + answer
        features.append({"input_ids": tokens, "labels": labels, "attention_mask": [1] * len(tokens),
                         "position_ids": list(range(len(tokens)))})
    batch = CoconutCollator(cm.tokenizer.pad_token_id, ids.latent, align_latents=align)(features)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"])
    with torch.no_grad():
        out = cm(*args)
        ref_loss, ref_logits, _ = reference_forward(cm.model, batch["input_ids"], ids.latent, *args[1:])
    valid = batch["attention_mask"].bool()
    assert abs(out.loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    err = (out.logits[valid] - ref_logits[valid]).abs().max() / ref_logits[valid].abs().max()
    assert err.item() <= 1e-5


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompts=st.lists(st.tuples(st.integers(1, 7), st.integers(0, 4)), min_size=1, max_size=4),
    family=st.sampled_from(["gpt2", "llama", "qwen3"]),
    seed=st.integers(0, 99),
)
def test_random_prompts_generate_like_reference(prompts, family, seed):
    from coconut_fast.generation import left_pad
    from coconut_fast.reference import reference_generate

    cm = model(family)
    ids, eos = cm.latent_ids, cm.tokenizer.eos_token_id
    rnd = random.Random(seed)
    questions = [[rnd.randrange(60) for _ in range(q)] for q, _ in prompts]
    counts = [k for _, k in prompts]
    out = cm.generate(*left_pad(questions, cm.tokenizer.pad_token_id), num_thoughts=counts, max_new_tokens=4,
                      return_dict_in_generate=True)
    for b, (q, k) in enumerate(zip(questions, counts)):
        expected, _ = reference_generate(cm.model, q + [ids.start] + [ids.latent] * k + [ids.end], ids.latent, eos, 4)
        got = out.sequences[b, out.prompt_length :].tolist()
        assert got[: len(expected)] == expected
        assert all(t == cm.tokenizer.pad_token_id for t in got[len(expected) :])
