"""`CoconutModel.generate(backend="paged")` against `backend="torch"` (float32, CPU).

Greedy: identical `sequences` (prompt part, new tokens, pad after EOS, width) and dict fields;
thoughts within 1e-5 of their largest magnitude. Sampling: the two backends draw from different
random streams (the paged engine has one generator per request, seeded from the global RNG), so
"same" means the same shapes, prompt part, padding and EOS handling, tokens from the allowed
support, reproducible under `torch.manual_seed`; with top_k=1 sampling is greedy and the tokens
are identical.
"""
import pytest
import torch

from coconut_fast.generation import engine_for
from coconut_fast.generation import left_pad
from coconut_fast.tiny import FAMILIES
from engine_helpers import engine_model, full_prompt

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

QUESTIONS = [[5, 6, 7, 8, 9, 10], [1, 2, 3], [12, 13, 14, 15, 16, 17, 18, 19, 20], [4, 5]]


def paged_model(family, **kw):
    """A tiny model whose paged engine uses the torch reference kernels (the Triton ones have their own file)."""
    cm = engine_model(family, **kw)
    engine_for(cm, kernels="torch")
    return cm

COUNTS = [2, 0, 4, 1]


def batch(cm, rows=QUESTIONS):
    return left_pad(rows, cm.tokenizer.pad_token_id)


def assert_same_result(paged, torch_out):
    assert type(paged) is type(torch_out)
    assert torch.equal(paged.sequences, torch_out.sequences)
    assert paged.prompt_length == torch_out.prompt_length
    assert torch.equal(paged.num_thoughts, torch_out.num_thoughts)
    assert paged.thoughts.shape == torch_out.thoughts.shape and paged.thoughts.dtype == torch_out.thoughts.dtype
    scale = torch_out.thoughts.abs().max()
    assert (paged.thoughts - torch_out.thoughts).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_backend_equals_torch_backend(family):
    cm = paged_model(family)
    ids, mask = batch(cm)
    no_eos = cm.generate(ids, mask, num_thoughts=COUNTS, max_new_tokens=9, eos_token_id=[], output_thoughts=True)
    assert_same_result(cm.generate(ids, mask, num_thoughts=COUNTS, max_new_tokens=9, eos_token_id=[],
                                   output_thoughts=True, backend="paged"), no_eos)
    eos = int(no_eos.sequences[0, no_eos.prompt_length + 2])  # row 0 stops after its third token
    kwargs = dict(num_thoughts=COUNTS, max_new_tokens=9, output_thoughts=True, eos_token_id=eos)
    paged = cm.generate(ids, mask, backend="paged", **kwargs)
    reference = cm.generate(ids, mask, backend="torch", **kwargs)
    assert_same_result(paged, reference)
    assert (reference.sequences[0, reference.prompt_length + 3 :] == cm.tokenizer.pad_token_id).all()
    plain = cm.generate(ids, mask, num_thoughts=COUNTS, max_new_tokens=9, eos_token_id=eos, backend="paged")
    assert torch.equal(plain, reference.sequences)


def test_tied_gpt2_and_official_format_prompts():
    from conftest import make_coconut

    cm = make_coconut("gpt2")  # tied embeddings
    engine_for(cm, kernels="torch")
    rows = [full_prompt(cm, q, k) + [7, 8] for q, k in zip(QUESTIONS, COUNTS)]  # text after <eot> too
    ids, mask = batch(cm, rows)
    kwargs = dict(max_new_tokens=5, return_dict_in_generate=True, output_thoughts=True)
    assert_same_result(cm.generate(ids, mask, backend="paged", **kwargs), cm.generate(ids, mask, **kwargs))


def test_custom_eos_pad_and_zero_new_tokens():
    cm = paged_model("llama")
    ids, mask = batch(cm)
    for kwargs in (dict(eos_token_id=[14, 23, 50], pad_token_id=0, max_new_tokens=8),
                   dict(max_new_tokens=0), dict(eos_token_id=[], max_new_tokens=4)):
        args = dict(num_thoughts=COUNTS, return_dict_in_generate=True, output_thoughts=True, **kwargs)
        assert_same_result(cm.generate(ids, mask, backend="paged", **args), cm.generate(ids, mask, **args))


def test_sampling_with_top_k_1_is_greedy():
    cm = paged_model("qwen2")
    ids, mask = batch(cm)
    greedy = cm.generate(ids, mask, num_thoughts=COUNTS, max_new_tokens=8)
    sampled = cm.generate(ids, mask, num_thoughts=COUNTS, max_new_tokens=8, backend="paged", do_sample=True,
                          top_k=1, temperature=0.7)
    assert torch.equal(sampled, greedy)


def test_sampling_shapes_padding_eos_and_seed():
    cm = paged_model("llama")
    ids, mask = batch(cm)
    eos = list(range(0, 64, 3))  # frequent stops, so rows end at different lengths
    kwargs = dict(num_thoughts=COUNTS, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=20, top_p=0.95,
                  eos_token_id=eos, output_thoughts=True)
    torch.manual_seed(0)
    first = cm.generate(ids, mask, backend="paged", **kwargs)
    torch.manual_seed(0)
    again = cm.generate(ids, mask, backend="paged", **kwargs)
    assert torch.equal(first.sequences, again.sequences)
    torch.manual_seed(0)
    reference = cm.generate(ids, mask, backend="torch", **kwargs)
    width = reference.prompt_length
    assert first.prompt_length == width
    assert torch.equal(first.sequences[:, :width], reference.sequences[:, :width])
    assert (first.thoughts - reference.thoughts).abs().max() <= 1e-5 * reference.thoughts.abs().max()
    new = first.sequences[:, width:]
    lengths = []
    for row in new.tolist():
        stops = [i for i, t in enumerate(row) if t in eos]
        n = stops[0] + 1 if stops else len(row)
        assert all(t == cm.tokenizer.pad_token_id for t in row[n:]), row
        assert stops or n == 12
        lengths.append(n)
    assert new.shape[1] == max(lengths)
    draws = set()
    for seed in range(4):
        torch.manual_seed(seed)
        draws.add(tuple(cm.generate(ids, mask, backend="paged", **kwargs).sequences[0].tolist()))
    assert len(draws) > 1  # the seed matters


def test_sampled_tokens_come_from_the_top_k():
    cm = paged_model("mistral")
    ids, mask = batch(cm)
    torch.manual_seed(1)
    out = cm.generate(ids, mask, num_thoughts=COUNTS, max_new_tokens=6, do_sample=True, top_k=3, eos_token_id=[],
                      backend="paged")
    ranks = []
    for b, (q, k) in enumerate(zip(QUESTIONS, COUNTS)):
        prompt, new = full_prompt(cm, q, k), out[b, -6:].tolist()
        logits = cm(torch.tensor([prompt + new])).logits[0, len(prompt) - 1 : -1]
        ranks += [int((row > row[t]).sum()) for row, t in zip(logits, new)]
    assert max(ranks) <= 2 and max(ranks) > 0  # within the top 3, and not always the greedy token


def test_engine_is_reused_and_grows():
    cm = paged_model("qwen3")
    ids, mask = batch(cm)
    cm.generate(ids[:1], mask[:1], num_thoughts=1, max_new_tokens=3, backend="paged")
    small = engine_for(cm)
    cm.generate(ids[:1], mask[:1], num_thoughts=1, max_new_tokens=3, backend="paged")
    assert engine_for(cm) is small
    cm.generate(ids, mask, num_thoughts=COUNTS, max_new_tokens=6, backend="paged")
    grown = engine_for(cm)
    assert grown is not small and grown.num_blocks > small.num_blocks
    assert "_paged_engine" not in dict(cm.named_modules()) and not any("engine" in k for k in cm.state_dict())
    configured = engine_for(cm, num_blocks=7, block_size=4, kernels="torch")  # a small pool: preemption
    out = cm.generate(ids, mask, num_thoughts=COUNTS, max_new_tokens=6, backend="paged")
    assert engine_for(cm) is configured and configured.stats.num_preemptions > 0
    assert torch.equal(out, cm.generate(ids, mask, num_thoughts=COUNTS, max_new_tokens=6))


def test_bfloat16_runs_in_the_model_dtype():
    cm = paged_model("llama")
    ids, mask = batch(cm)
    kwargs = dict(num_thoughts=COUNTS, max_new_tokens=6, output_thoughts=True, eos_token_id=[])
    float32 = cm.generate(ids, mask, **kwargs)
    cm.model.to(torch.bfloat16)
    paged, reference = cm.generate(ids, mask, backend="paged", **kwargs), cm.generate(ids, mask, **kwargs)
    assert paged.thoughts.dtype == torch.bfloat16 and paged.sequences.shape == reference.sequences.shape
    assert engine_for(cm).runner.cache.k[0].dtype == torch.bfloat16
    # bfloat16 keeps 8 mantissa bits and rounds at every layer; both backends land within 5% of float32
    scale = float32.thoughts.abs().max()
    for out in (paged, reference):
        assert (out.thoughts.float() - float32.thoughts).abs().max() <= 5e-2 * scale


def test_bad_backend_is_named():
    cm = paged_model("gpt2")
    ids, mask = batch(cm)
    with pytest.raises(ValueError, match="backend must be one of .*'vllm'"):
        cm.generate(ids, mask, num_thoughts=1, backend="vllm")


def test_a_memory_fraction_too_small_for_one_block_is_named():
    from coconut_fast.engine import LLM

    with pytest.raises(ValueError, match="memory_fraction 1e-30 .* holds no cache block"):
        LLM(paged_model("gpt2"), memory_fraction=1e-30)
