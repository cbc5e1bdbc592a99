"""The engine's CUDA-graph path: batch-size buckets, static buffers, the captured thought loop and decode step.

On CPU the same static-buffer steps run eagerly (capture needs CUDA), which checks everything but the capture:
padding to the bucket, the in-loop feedback (thought -> next input, positions / slots / context lengths advanced
on the device), blocks reserved for the whole loop. On a GPU, replayed graphs must give the tokens and thoughts of
the eager engine.
"""
import warnings

import pytest
import torch

from coconut_fast.engine import LLM, SamplingParams
from coconut_fast.engine import cuda_graph
from coconut_fast.engine.cuda_graph import bucket_for
from coconut_fast.engine.sequence import Sequence
from coconut_fast.kernels import cuda_kernels_available, triton_enabled
from coconut_fast.tiny import FAMILIES
from engine_helpers import assert_all_blocks_free, assert_matches_reference, engine_model, full_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [[5, 6, 7, 8, 9, 10, 11], [1, 2, 3], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def generate(llm, counts, max_new_tokens=8, questions=QUESTIONS):
    return llm.generate(questions, SamplingParams(max_new_tokens=max_new_tokens), num_thoughts=counts,
                        use_tqdm=False)


def assert_same_outputs(expected, got):
    for a, b in zip(expected, got, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.thoughts, b.thoughts, atol=1e-5, rtol=1e-5)


def graph_engine(cm, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU fallback notice; checked on its own below
        return LLM(cm, num_blocks=64, block_size=4, cuda_graphs=True, **options)


def test_buckets():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 64, 65, 256)] == [1, 2, 4, 8, 64, 128, 256]
    assert bucket_for(257) is None


def test_latent_run_counts_back_to_back_latent_steps():
    bot, latent, eot = 90, 91, 92
    seq = Sequence(0, [5, bot, latent, latent, latent, eot, 7, bot, latent, latent, eot], latent, SamplingParams(),
                   (60,))
    assert seq.latent_run() == 0  # nothing computed, no thought yet
    seq.num_computed = 2
    seq.add_thought(torch.zeros(4))
    # steps at positions 2 and 3 produce the thoughts of slots 3 and 4; slot 4 then runs with <eot>
    assert seq.latent_run() == 2
    seq.add_thought(torch.zeros(4))
    seq.add_thought(torch.zeros(4))
    seq.num_computed = 4
    assert seq.latent_run() == 0  # the last slot of the block: its output is a token's hidden state
    seq.num_computed = 8
    seq.add_thought(torch.zeros(4))
    assert seq.latent_run() == 1  # the second block: one step to the slot before <eot>


@pytest.mark.parametrize("family", FAMILIES)
def test_static_buffer_loop_matches_reference(family):
    """Three requests padded to bucket 4; five thoughts each: one from the prefill, four from one loop of four
    steps, the last slot with <eot>."""
    cm = engine_model(family)
    llm = graph_engine(cm, kernels="torch")
    outputs = generate(llm, [5, 5, 5])
    assert_matches_reference(cm, outputs, QUESTIONS, [5, 5, 5], 8)
    bodies = llm.runner.graphs.bodies
    assert ("thoughts", 4, 4) in bodies and any(key[0] == "decode" for key in bodies)
    assert all(key[1] in cuda_graph.BATCH_BUCKETS for key in bodies)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mixed_thought_counts_use_the_decode_graph(family):
    cm = engine_model(family)
    llm = graph_engine(cm, kernels="torch")
    counts = [3, 0, 6]
    outputs = generate(llm, counts)
    assert_matches_reference(cm, outputs, QUESTIONS, counts, 8)
    assert any(key[0] == "decode" for key in llm.runner.graphs.bodies)
    assert_all_blocks_free(llm)


def test_graph_engine_equals_plain_engine_and_reuses_buffers():
    cm = engine_model("qwen3")
    plain = LLM(cm, num_blocks=64, block_size=4, kernels="torch")
    graphs = graph_engine(cm, kernels="torch")
    for counts in ([4, 4, 4], [2, 2, 2], [4, 4, 4]):
        assert_same_outputs(generate(plain, counts), generate(graphs, counts))
    runner = graphs.runner.graphs
    assert ("thoughts", 4, 3) in runner.bodies and ("thoughts", 4, 1) not in runner.bodies  # one step: no loop
    assert runner.bodies["thoughts", 4, 3].inputs is runner.bodies["decode", 4].inputs is runner.inputs[4]


def test_the_cpu_fallback_is_said_once_per_engine():
    cm = engine_model("gpt2")
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device") as record:
        llm = LLM(cm, num_blocks=64, block_size=4, kernels="torch", cuda_graphs=True)
        generate(llm, [3, 3, 3])
        generate(llm, [2, 0, 1])
    assert len([w for w in record if "CUDA graphs" in str(w.message)]) == 1
    assert llm.runner.graphs.eager_reason.startswith("CUDA graphs need a CUDA device")


def test_loop_needs_blocks_for_all_its_steps():
    """When the pool cannot hold every step of the loop, the step runs one position, and answers stay exact."""
    cm = engine_model("gpt2")
    llm = graph_engine(cm, kernels="torch")
    question = [5, 6, 7, 8, 9, 10]  # <bot> at 6, latents at 7..11: the loop covers positions 7..10
    llm.add_request(full_prompt(cm, question, 5), SamplingParams(max_new_tokens=4))
    llm.step()  # prefill: blocks for positions 0..6
    held = [llm.allocator.take_free_block() for _ in range(llm.allocator.num_free_blocks)]
    step = llm.scheduler.schedule()  # one latent step: position 7, block 1
    seq = step.chunks[0][0]
    assert step.latent_steps == 1 and len(seq.block_table) == 2
    for block_id in held:  # give them back
        llm.allocator.blocks[block_id].ref_count = 0
        llm.allocator.free_ids.append(block_id)
    assert llm.scheduler.latent_steps(step.chunks) == 4 and len(seq.block_table) == 3


def test_batches_beyond_the_largest_bucket_run_unpadded(monkeypatch):
    monkeypatch.setattr(cuda_graph, "BATCH_BUCKETS", (1, 2))
    cm = engine_model("llama")
    llm = graph_engine(cm, kernels="torch")
    outputs = generate(llm, [4, 4, 4])
    assert_matches_reference(cm, outputs, QUESTIONS, [4, 4, 4], 8)
    assert all(key[1] <= 2 for key in llm.runner.graphs.bodies)


@pytest.mark.skipif(not triton_enabled(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_static_buffer_loop_on_triton_kernels(family):
    """The Triton latent feedback kernel inside the loop (interpreted on CPU)."""
    cm = engine_model(family)
    llm = graph_engine(cm, kernels="triton")
    questions = [[5, 6, 7, 8], [1, 2]]
    outputs = generate(llm, [4, 4], max_new_tokens=3, questions=questions)
    assert_matches_reference(cm, outputs, questions, [4, 4], 3)
    assert ("thoughts", 2, 3) in llm.runner.graphs.bodies


# ---------------------------------------------------------------- GPU: real capture and replay
GPU_KERNELS = ["triton", pytest.param("cuda", marks=pytest.mark.skipif(
    not cuda_kernels_available(), reason="needs the compiled coconut_fast._C"))]


@needs_cuda
@pytest.mark.parametrize("kernels", GPU_KERNELS)
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_replayed_graphs_equal_the_eager_engine(family, kernels):
    cm = engine_model(family).to("cuda")
    eager = LLM(cm, num_blocks=64, block_size=16, kernels=kernels)
    graphs = LLM(cm, num_blocks=64, block_size=16, kernels=kernels, cuda_graphs=True)
    for counts in ([6, 6, 6], [3, 0, 5], [6, 6, 6]):
        got = generate(graphs, counts)
        assert_same_outputs(generate(eager, counts), got)
    runner = graphs.runner.graphs
    assert runner.eager_reason is None and ("thoughts", 4, 5) in runner.graphs
    assert any(key[0] == "decode" for key in runner.graphs)
    assert_matches_reference(cm, got, QUESTIONS, [6, 6, 6], 8)


@needs_cuda
def test_uncapturable_kernels_fall_back_once_on_the_gpu():
    """The torch reference kernels read context lengths on the host: capture fails, the engine says so once."""
    cm = engine_model("gpt2").to("cuda")
    with pytest.warns(UserWarning, match="CUDA graph capture failed") as record:
        llm = LLM(cm, num_blocks=64, block_size=16, kernels="torch", cuda_graphs=True)
        outputs = generate(llm, [5, 5, 5])
    assert len([w for w in record if "CUDA graph" in str(w.message)]) == 1
    assert_matches_reference(cm, outputs, QUESTIONS, [5, 5, 5], 8)


def test_unused_block_table_entries_point_at_the_scratch_block():
    """Padding columns and padding rows name the scratch block, so a loop step past a request's reserved blocks
    (or a padding row) writes there and never into block 0, which another request may hold."""
    cm = engine_model("llama")
    llm = graph_engine(cm, kernels="torch")
    scratch = llm.runner.cache.scratch_block
    assert scratch == llm.num_blocks and llm.runner.cache.k[0].shape[0] == llm.num_blocks + 1
    for q, k in ((QUESTIONS[0], 2), (QUESTIONS[2], 2), (QUESTIONS[1], 2)):
        llm.add_request(full_prompt(cm, q, k), SamplingParams(max_new_tokens=2))
    chunks = llm.scheduler.schedule().chunks
    embeds, meta = llm.runner.prepare(chunks)
    for row, (seq, _) in enumerate(chunks):
        n = len(seq.block_table)
        assert meta.block_tables[row, :n].tolist() == seq.block_table
        assert (meta.block_tables[row, n:] == scratch).all()
        assert scratch not in seq.block_table
    inputs = llm.runner.graphs.bucket_inputs(len(chunks))  # bucket 4: one padding row
    single = llm.runner.prepare([(seq, seq.num_computed + 1) for seq, _ in chunks])[1]
    inputs.load(embeds[: len(chunks)], single)
    assert (inputs.meta.block_tables[len(chunks):] == scratch).all()
    width = single.block_tables.shape[1]
    assert (inputs.meta.block_tables[:, width:] == scratch).all()
