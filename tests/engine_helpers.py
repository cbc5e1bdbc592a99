"""Shared pieces of the engine tests: tiny models with varied answers, reference answers, checks."""
import torch

from coconut_fast.reference import reference_generate
from conftest import make_coconut

THOUGHT_RTOL = 1e-5
EOS = 60


def engine_model(family: str, seed: int = 0):
    """A tiny CoconutModel whose greedy answers vary: a random GPT-2 with tied embeddings only ever
    repeats its last input token, so GPT-2 gets an untied random LM head here."""
    cm = make_coconut(family, seed=seed)
    if family == "gpt2":
        head = cm.model.lm_head
        gen = torch.Generator().manual_seed(seed + 7)
        head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=gen))
    return cm


def full_prompt(cm, question, k):
    ids = cm.latent_ids
    return list(question) + [ids.start] + [ids.latent] * k + [ids.end]


def reference(cm, question, k, max_new_tokens):
    return reference_generate(cm.model, full_prompt(cm, question, k), cm.latent_ids.latent, EOS, max_new_tokens)


def assert_matches_reference(cm, outputs, questions, counts, max_new_tokens):
    for out, q, k in zip(outputs, questions, counts):
        tokens, thoughts = reference(cm, q, k, max_new_tokens)
        assert out.prompt_token_ids == full_prompt(cm, q, k)
        assert out.token_ids == tokens, f"prompt {q} with {k} thoughts"
        assert out.thoughts.shape == thoughts.shape
        if k:
            err = (out.thoughts - thoughts).abs().max() / thoughts.abs().max()
            assert err <= THOUGHT_RTOL, f"thoughts differ by {err:.2e} (relative)"


def assert_all_blocks_free(llm):
    assert llm.allocator.num_free_blocks == llm.num_blocks
    assert all(b.ref_count == 0 for b in llm.allocator.blocks)
    assert not llm.has_unfinished()

