"""The engine's request API: add_request checks prompts as generate does, abort frees a request's blocks,
generate never swallows the outputs of requests queued with add_request."""
import pytest

from coconut_fast.engine import LLM, SamplingParams
from engine_helpers import assert_all_blocks_free, assert_matches_reference, engine_model, full_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def llm():
    return LLM(engine_model("llama"), num_blocks=32, block_size=4, kernels="torch")


def test_add_request_checks_the_prompt_as_generate_does(llm):
    ids = llm.coconut.latent_ids
    with pytest.raises(TypeError, match="prompt 0 must be a string or a list of token ids"):
        llm.add_request([1.0, 2.0])
    with pytest.raises(TypeError, match="prompt 0 must be a string or a list of token ids"):
        llm.add_request([1, True])
    with pytest.raises(ValueError, match="<bot> without a closing <eot>"):
        llm.add_request([1, 2, ids.start, ids.latent])
    with pytest.raises(ValueError, match="latent token at position 1 outside a <bot>"):
        llm.add_request([1, ids.latent, 2])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        llm.add_request([])
    assert not llm.has_unfinished()
    request = llm.add_request("w1 w2 w3", SamplingParams(max_new_tokens=4))  # text goes through the tokenizer
    assert llm.scheduler.waiting[0].token_ids == [1, 2, 3] and request == 0


def test_generate_refuses_while_add_request_requests_are_unfinished(llm):
    cm = llm.coconut
    queued = llm.add_request(full_prompt(cm, [5, 6, 7], 2), SamplingParams(max_new_tokens=4))
    with pytest.raises(RuntimeError, match="1 request.*queued with add_request are unfinished"):
        llm.generate([[1, 2]], SamplingParams(max_new_tokens=2), num_thoughts=1, use_tqdm=False)
    outputs = {}
    while llm.has_unfinished():
        outputs.update({o.request_id: o for o in llm.step()})
    assert_matches_reference(cm, [outputs[queued]], [[5, 6, 7]], [2], 4)  # its output was not lost
    got = llm.generate([[1, 2]], SamplingParams(max_new_tokens=2), num_thoughts=1, use_tqdm=False)
    assert_matches_reference(cm, got, [[1, 2]], [1], 2)


def test_abort_frees_a_running_and_a_waiting_request(llm):
    cm = llm.coconut
    questions, counts = [[5, 6, 7, 8], [1, 2, 3], [9, 10, 11]], [3, 2, 1]
    llm.scheduler.max_num_seqs = 2  # the third request waits
    rids = [llm.add_request(full_prompt(cm, q, k), SamplingParams(max_new_tokens=5)) for q, k in zip(questions,
                                                                                                    counts)]
    llm.step()
    assert llm.allocator.num_used_blocks > 0
    assert llm.abort(rids[0]) and llm.abort(rids[2])  # one running, one still waiting
    assert not llm.abort(rids[0]) and not llm.abort(12345)  # already gone, never known
    outputs = {}
    while llm.has_unfinished():
        outputs.update({o.request_id: o for o in llm.step()})
    assert set(outputs) == {rids[1]}
    assert_matches_reference(cm, [outputs[rids[1]]], [questions[1]], [counts[1]], 5)
    assert_all_blocks_free(llm)
    assert not llm.abort(rids[1])  # finished
