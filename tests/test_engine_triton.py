"""The engine with its Triton kernels, interpreted on CPU (TRITON_INTERPRET=1), on tiny models.

Same bar as the torch-kernel runs: greedy tokens identical to the reference in float32, thoughts
within 1e-5, with prefill, latent and decode work in one step and with preemption forced by a
tiny pool. The interpreter is slow, so the prompts are few and short.
"""
import pytest
import torch

from coconut_fast.engine import LLM, Phase, SamplingParams
from coconut_fast.kernels import triton_enabled
from coconut_fast.tiny import FAMILIES
from engine_helpers import assert_all_blocks_free, assert_matches_reference, engine_model, full_prompt

pytestmark = [pytest.mark.skipif(not triton_enabled(), reason="needs triton with CUDA or TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("one_thread")]

QUESTIONS, COUNTS, NEW_TOKENS = [[5, 6, 7, 8], [1, 2], [12, 13, 14]], [0, 3, 1], 4


@pytest.mark.parametrize("family", FAMILIES)
def test_interpreted_kernels_match_reference_with_mixed_phases_and_preemption(family):
    cm = engine_model(family)
    # 8 blocks of 2: step 3 holds all three requests (decode, latent, prefill), then the
    # first one needs a fifth block and the newest is preempted
    llm = LLM(cm, num_blocks=8, block_size=2, kernels="triton")
    assert llm.runner.kernels.name == "triton"
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    ids, outputs = [], {}
    for q, k in zip(QUESTIONS, COUNTS):  # admitted one step apart
        ids.append(llm.add_request(full_prompt(cm, q, k), params))
        outputs.update({o.request_id: o for o in llm.step()})
    while llm.has_unfinished():
        outputs.update({o.request_id: o for o in llm.step()})
    assert llm.stats.steps_with(Phase.PREFILL, Phase.LATENT, Phase.DECODE) >= 1
    assert llm.stats.num_preemptions > 0
    assert_matches_reference(cm, [outputs[i] for i in ids], QUESTIONS, COUNTS, NEW_TOKENS)
    assert_all_blocks_free(llm)


def test_generate_paged_picks_triton_and_equals_torch_backend():
    from coconut_fast.generation import engine_for
    from coconut_fast.generation import left_pad

    cm = engine_model("qwen3")  # its per-head q/k norms go through the RMSNorm kernel too
    ids, mask = left_pad([[5, 6, 7], [1, 2, 3, 4, 5]], cm.tokenizer.pad_token_id)
    kwargs = dict(num_thoughts=[2, 1], max_new_tokens=3, output_thoughts=True)
    paged, reference = cm.generate(ids, mask, backend="paged", **kwargs), cm.generate(ids, mask, **kwargs)
    assert engine_for(cm).runner.kernels.name == "triton"  # kernels="auto" where Triton runs
    assert torch.equal(paged.sequences, reference.sequences)
    assert (paged.thoughts - reference.thoughts).abs().max() <= 1e-5 * reference.thoughts.abs().max()


def test_bfloat16_under_the_interpreter_takes_the_torch_kernels_or_is_refused():
    """The interpreter computes bfloat16 wrongly (all-zero tokens): "auto" picks the torch kernels there, and an
    explicit "triton" says why it cannot."""
    from coconut_fast.generation import engine_for
    from coconut_fast.prompts import left_pad

    if torch.cuda.is_available():
        pytest.skip("the Triton kernels are compiled on a GPU, not interpreted")
    cm = engine_model("llama")
    cm.to(torch.bfloat16)
    ids, mask = left_pad([[5, 6, 7, 8, 9], [1, 2, 3]], cm.tokenizer.pad_token_id)
    paged = cm.generate(ids, mask, num_thoughts=2, max_new_tokens=4, backend="paged")
    assert engine_for(cm).runner.kernels.name == "torch"
    assert torch.equal(paged, cm.generate(ids, mask, num_thoughts=2, max_new_tokens=4, backend="torch"))
    with pytest.raises(ValueError, match="interpreter.*computes bfloat16 wrongly; use kernels='torch'"):
        LLM(cm, num_blocks=8, kernels="triton")
