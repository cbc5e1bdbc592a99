"""The paged engine against the reference (float32, CPU, torch reference kernels).

Greedy tokens must be identical to `reference_generate`; thoughts agree within 1e-5 of their
largest magnitude. Every run ends with every cache block free.
"""
import pytest

from coconut_fast.engine import LLM, Phase, SamplingParams
from coconut_fast.reference import reference_generate
from coconut_fast.tiny import FAMILIES
from conftest import make_coconut
from engine_helpers import (EOS, assert_all_blocks_free, assert_matches_reference, engine_model, full_prompt,
                            reference)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

QUESTIONS = [[5, 6, 7, 8, 9, 10, 11], [1, 2, 3], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [4]]
COUNTS = [3, 0, 5, 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_and_thoughts_match_reference(family):
    cm = engine_model(family)
    llm = LLM(cm, num_blocks=64, block_size=4, kernels="torch")
    outputs = llm.generate(QUESTIONS, SamplingParams(max_new_tokens=10), num_thoughts=COUNTS, use_tqdm=False)
    assert_matches_reference(cm, outputs, QUESTIONS, COUNTS, 10)
    assert any(o.token_ids[-1] == EOS for o in outputs) or all(len(o.token_ids) == 10 for o in outputs)
    assert_all_blocks_free(llm)


def test_answers_vary_so_parity_means_something():
    cm = engine_model("gpt2")
    answers = [tuple(reference(cm, q, k, 10)[0]) for q, k in zip(QUESTIONS, COUNTS)]
    assert len(set(answers)) == len(answers) and all(len(set(a)) > 2 for a in answers)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_prefill_latent_and_decode_share_a_step(family):
    cm = engine_model(family)
    llm = LLM(cm, num_blocks=64, block_size=4, kernels="torch")
    questions, counts = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14]], [0, 4, 2]
    ids = []
    for q, k in zip(questions, counts):  # admitted one step apart
        ids.append(llm.add_request(full_prompt(cm, q, k), SamplingParams(max_new_tokens=8)))
        outputs = {o.request_id: o for o in llm.step()}
    while llm.has_unfinished():
        outputs.update({o.request_id: o for o in llm.step()})
    third = llm.stats.steps[2]  # request 0 answers, request 1 thinks, request 2 is prefilled
    assert third.phases == {Phase.DECODE: 1, Phase.LATENT: 1, Phase.PREFILL: 1}
    assert llm.stats.steps_with(Phase.PREFILL, Phase.LATENT, Phase.DECODE) >= 1
    assert_matches_reference(cm, [outputs[i] for i in ids], questions, counts, 8)
    assert_all_blocks_free(llm)


def test_token_budget_staggers_admission_into_mixed_steps():
    cm = engine_model("llama")
    llm = LLM(cm, num_blocks=64, block_size=4, kernels="torch", max_num_batched_tokens=12)
    questions, counts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15, 16, 17, 18]], [0, 3, 2]
    outputs = llm.generate(questions, SamplingParams(max_new_tokens=8), num_thoughts=counts, use_tqdm=False)
    assert llm.stats.steps[0].phases == {Phase.PREFILL: 1}  # the second prompt did not fit the budget
    assert llm.stats.steps_with(Phase.PREFILL, Phase.LATENT, Phase.DECODE) >= 1
    assert_matches_reference(cm, outputs, questions, counts, 8)


@pytest.mark.parametrize("family", FAMILIES)
def test_preemption_by_a_tiny_pool_keeps_answers_identical(family):
    cm = engine_model(family)
    questions = [[5, 6, 7, 8, 9], [1, 2, 3], [12, 13, 14, 15, 16, 17, 18], [4, 5], [20, 21, 22, 23]]
    counts = [6, 2, 4, 0, 5]
    # the longest request needs 10 blocks of 2; five requests together need far more
    llm = LLM(cm, num_blocks=12, block_size=2, kernels="torch")
    outputs = llm.generate(questions, SamplingParams(max_new_tokens=6), num_thoughts=counts, use_tqdm=False)
    assert llm.stats.num_preemptions > 0
    assert llm.stats.preempted_phases[Phase.LATENT] > 0  # recomputed from the kept thought vectors
    assert sum(o.num_preemptions for o in outputs) == llm.stats.num_preemptions
    assert llm.stats.peak_used_blocks <= 12
    assert_matches_reference(cm, outputs, questions, counts, 6)
    assert_all_blocks_free(llm)


def test_identical_prompts_share_prefix_blocks():
    cm = engine_model("llama")
    question = list(range(1, 12))  # 11 tokens: two full shareable blocks of 4
    prompts = [full_prompt(cm, question, 2), full_prompt(cm, question, 2), full_prompt(cm, [30, 31, 32], 1)]
    llm = LLM(cm, num_blocks=64, block_size=4, kernels="torch")
    for p in prompts:
        llm.add_request(p, SamplingParams(max_new_tokens=6))
    llm.scheduler.schedule()  # admission only; inspect the tables before running
    a, b, c = llm.scheduler.running
    assert a.block_table[:2] == b.block_table[:2] and a.block_table[2:] != b.block_table[2:]
    assert [llm.allocator.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    assert b.num_cached_tokens == 8 and a.num_cached_tokens == 0 and not set(c.block_table) & set(a.block_table)

    shared = LLM(cm, num_blocks=64, block_size=4, kernels="torch")
    alone = LLM(cm, num_blocks=64, block_size=4, kernels="torch", enable_prefix_caching=False)
    sp = SamplingParams(max_new_tokens=6)
    out_shared = shared.generate(prompts, sp, use_tqdm=False)
    out_alone = alone.generate(prompts, sp, use_tqdm=False)
    assert shared.stats.peak_used_blocks == alone.stats.peak_used_blocks - 2
    assert shared.stats.steps[0].phases == {Phase.PREFILL: 3}  # a request with a cached prefix is still prefilled
    assert shared.stats.steps[0].num_tokens == alone.stats.steps[0].num_tokens - 8
    assert [o.token_ids for o in out_shared] == [o.token_ids for o in out_alone]
    assert out_shared[0].token_ids == out_shared[1].token_ids
    assert_matches_reference(cm, out_shared, [question, question, [30, 31, 32]], [2, 2, 1], 6)
    assert_all_blocks_free(shared)

    # a later identical prompt revives the freed blocks, whose contents are still valid
    steps_before = len(shared.stats.steps)
    again = shared.generate([prompts[0]], sp, use_tqdm=False)[0]
    assert again.token_ids == out_shared[0].token_ids
    assert shared.stats.steps[steps_before].num_tokens == len(question) + 1 - 8  # through <bot>, 8 cached
    assert_all_blocks_free(shared)


def test_offline_api_returns_results_in_input_order():
    cm = engine_model("qwen2")
    questions = [[5, 6, 7, 8, 9], [1, 2, 3], [12, 13, 14, 15]]
    counts = [4, 0, 2]
    lengths = [10, 2, 5]  # the first prompt finishes last
    params = [SamplingParams(max_new_tokens=n, eos_token_ids=()) for n in lengths]
    llm = LLM(cm, num_blocks=64, block_size=4, kernels="torch")
    finish_order = []
    for q, k, p in zip(questions, counts, params):
        llm.add_request(full_prompt(cm, q, k), p)
    while llm.has_unfinished():
        finish_order += [o.request_id for o in llm.step()]
    assert finish_order != sorted(finish_order)
    outputs = llm.generate(questions, params, num_thoughts=counts, use_tqdm=True)
    assert [len(o.token_ids) for o in outputs] == lengths
    assert [o.request_id for o in outputs] == sorted(o.request_id for o in outputs)
    for out, q, k, n in zip(outputs, questions, counts, lengths):
        assert out.token_ids == reference_generate(cm.model, full_prompt(cm, q, k), cm.latent_ids.latent, None, n)[0]
        assert out.finish_reason == "length"


def test_text_prompts_in_the_official_format():
    cm = engine_model("llama")
    tok = cm.tokenizer
    texts = ["w5 w6 w7 <|start-latent|> <|latent|> <|latent|> <|end-latent|>", "w1 w2"]
    llm = LLM(cm, num_blocks=32, block_size=4, kernels="torch")
    outputs = llm.generate(texts, SamplingParams(max_new_tokens=5), num_thoughts=[None, 1], use_tqdm=False)
    assert outputs[0].prompt_token_ids == full_prompt(cm, [5, 6, 7], 2)
    assert outputs[1].prompt_token_ids == full_prompt(cm, [1, 2], 1)
    assert_matches_reference(cm, outputs, [[5, 6, 7], [1, 2]], [2, 1], 5)
    assert outputs[0].text == tok.decode(outputs[0].token_ids, skip_special_tokens=True)


def test_zero_new_tokens_still_computes_thoughts():
    cm = engine_model("qwen3")
    llm = LLM(cm, num_blocks=16, block_size=4, kernels="torch")
    out = llm.generate([[3, 4, 5]], SamplingParams(max_new_tokens=0), num_thoughts=3, use_tqdm=False)[0]
    assert out.token_ids == [] and out.finish_reason == "length"
    assert_matches_reference(cm, [out], [[3, 4, 5]], [3], 0)
    assert_all_blocks_free(llm)


# ------------------------------------------------------------------ errors
def test_bad_options_and_requests_are_clear_errors():
    cm = engine_model("gpt2")
    with pytest.raises(ValueError, match="kernels must be one of"):
        LLM(cm, num_blocks=8, kernels="cutlass")
    with pytest.raises(ValueError, match="num_blocks"):
        LLM(cm, num_blocks=0, kernels="torch")
    llm = LLM(cm, num_blocks=4, block_size=4, kernels="torch")
    with pytest.raises(ValueError, match="needs up to 5 blocks"):
        llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=12), num_thoughts=1, use_tqdm=False)
    with pytest.raises(ValueError, match="context of 256 positions"):
        LLM(cm, num_blocks=200, kernels="torch").generate([[1]], SamplingParams(max_new_tokens=300), use_tqdm=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="outside a <bot>"):
        llm.generate([[1, cm.latent_ids.latent, 2]], use_tqdm=False)
    with pytest.raises(ValueError, match="already carries"):
        llm.generate([full_prompt(cm, [1], 1)], num_thoughts=2, use_tqdm=False)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 67\)"):
        llm.add_request([1, 99])
    with pytest.raises(TypeError, match="string or a list of token ids"):
        llm.generate([3.5], use_tqdm=False)
    with pytest.raises(ValueError, match="needs up to"):  # the first prompt is fine, the second too long
        llm.generate([[1, 2], list(range(1, 14))], SamplingParams(max_new_tokens=2), num_thoughts=1, use_tqdm=False)
    assert not llm.has_unfinished()


def test_an_interrupted_run_leaves_nothing_behind(monkeypatch):
    cm = engine_model("llama")
    llm = LLM(cm, num_blocks=32, block_size=4, kernels="torch")
    calls = []

    def interrupt(chunks, run=llm.runner.run):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run(chunks)

    monkeypatch.setattr(llm.runner, "run", interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(QUESTIONS, SamplingParams(max_new_tokens=6), num_thoughts=COUNTS, use_tqdm=False)
    assert_all_blocks_free(llm)
    monkeypatch.undo()
    outputs = llm.generate(QUESTIONS[:2], SamplingParams(max_new_tokens=6), num_thoughts=COUNTS[:2], use_tqdm=False)
    assert_matches_reference(cm, outputs, QUESTIONS[:2], COUNTS[:2], 6)


def test_kernel_choice_follows_where_triton_runs(monkeypatch):
    from coconut_fast import kernels

    cm = engine_model("gpt2")
    monkeypatch.setattr(kernels, "triton_enabled", lambda: False)
    assert LLM(cm, num_blocks=4, kernels="auto").runner.kernels.name == "torch"
    with pytest.raises(ValueError, match="kernels='triton' needs triton"):
        LLM(cm, num_blocks=4, kernels="triton")
    monkeypatch.setattr(kernels, "triton_enabled", lambda: True)
    llm = LLM(cm, num_blocks=4, kernels="auto")
    assert llm.runner.kernels.name == "triton" and llm.runner.kernels.add_layer_norm is kernels.add_layer_norm


def test_sliding_window_beyond_a_request_is_refused():
    cm = make_coconut("mistral")
    cm.model.config.sliding_window = 16
    llm = LLM(cm, num_blocks=32, block_size=4, kernels="torch")
    short = llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4), num_thoughts=2, use_tqdm=False)[0]
    assert short.token_ids == reference(cm, [1, 2, 3], 2, 4)[0]  # within the window nothing changes
    with pytest.raises(ValueError, match="sliding attention window of 16"):
        llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=12), num_thoughts=2, use_tqdm=False)


def test_unsupported_family_is_named():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from coconut_fast import CoconutModel
    from conftest import VOCAB, word_tokenizer

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64))
    cm = CoconutModel.from_pretrained(model, tokenizer=word_tokenizer())
    with pytest.raises(NotImplementedError, match="'gpt_neox'"):
        LLM(cm, num_blocks=8, kernels="torch")
