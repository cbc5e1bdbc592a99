"""The paged engine never serves K/V computed under other weights or never computed at all.

Weights changed between two `backend="paged"` calls (in place four ways, or replaced) must give the
tokens of `backend="torch"` and thoughts within 1e-5 of its largest magnitude; a step that fails while
its prompt blocks are being written leaves no key behind; a model with active dropout is refused.
"""
import pytest
import torch

from coconut_fast import CoconutModel
from coconut_fast.engine import LLM, SamplingParams
from coconut_fast.generation import engine_for
from coconut_fast.prompts import left_pad
from conftest import make_coconut
from engine_helpers import assert_all_blocks_free, assert_matches_reference, engine_model

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 4
# long enough for two shareable prompt blocks each, so a second call would hit the prefix cache
QUESTIONS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
COUNTS = [2, 3]
NEW = 6


def generate(cm, backend):
    ids, mask = left_pad(QUESTIONS, cm.tokenizer.pad_token_id)
    return cm.generate(ids, mask, num_thoughts=COUNTS, max_new_tokens=NEW, backend=backend, output_thoughts=True)


def assert_paged_equals_torch(cm):
    paged, plain = generate(cm, "paged"), generate(cm, "torch")
    assert torch.equal(paged.sequences, plain.sequences)
    scale = plain.thoughts.abs().max()
    assert (paged.thoughts - plain.thoughts).abs().max() <= 1e-5 * scale


def add_noise(cm, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cm.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def optimizer_step(cm, seed):
    opt = torch.optim.AdamW(cm.model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(seed)
    for p in cm.model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    opt.zero_grad(set_to_none=True)


def load_state_dict(cm, seed):
    other = engine_model(cm.config.model_type, seed=seed)
    cm.model.load_state_dict(other.model.state_dict())


def load_official_checkpoint(cm, seed, tmp_path):
    other = engine_model(cm.config.model_type, seed=seed).model
    state = {f"base_causallm.{k}": v for k, v in other.state_dict().items()}
    state["embedding.weight"] = other.get_input_embeddings().weight.detach().clone()
    torch.save(state, tmp_path / "checkpoint_1")
    cm.load_official_checkpoint(tmp_path / "checkpoint_1")


def data_write(cm, seed):
    """Through `.data`: autograd's view of the tensor, whose writes bump no version counter."""
    gen = torch.Generator().manual_seed(seed)
    for p in cm.model.parameters():
        p.data.add_(0.1 * torch.randn(p.shape, generator=gen))


def fused_optimizer_step(cm, seed):
    opt = torch.optim.AdamW(cm.model.parameters(), lr=0.05, fused=True)  # writes bump no version counter
    gen = torch.Generator().manual_seed(seed)
    for p in cm.model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


def one_embedding_row(cm, seed):
    """One row of the embedding matrix (a prompt's first token), through `.data`."""
    emb = cm.model.get_input_embeddings().weight
    emb.data[QUESTIONS[0][0]] = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(seed))


CHANGES = {"add_": add_noise, "optimizer": optimizer_step, "load_state_dict": load_state_dict,
           "official_checkpoint": load_official_checkpoint, "data": data_write, "fused_optimizer": fused_optimizer_step,
           "one_row": one_embedding_row}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_in_place_weight_changes_drop_the_prefix_cache(family, change, tmp_path):
    cm = engine_model(family)
    engine_for(cm, kernels="torch", block_size=BLOCK)
    assert_paged_equals_torch(cm)
    engine = engine_for(cm)  # sized to the batch by the first call
    assert engine.allocator.key_to_block  # the prompts' blocks are cached: a second call would reuse them
    runner = engine.runner
    args = (cm, 11, tmp_path) if change == "official_checkpoint" else (cm, 11)
    CHANGES[change](*args)
    assert_paged_equals_torch(cm)
    assert engine_for(cm) is engine and engine.runner is runner  # same storage: kept, only the keys dropped


def test_replaced_parameters_rebuild_the_runner():
    cm = engine_model("gpt2")
    engine_for(cm, kernels="torch", block_size=BLOCK)
    assert_paged_equals_torch(cm)
    engine = engine_for(cm)
    runner = engine.runner
    head = cm.model.lm_head
    head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(3)))
    assert_paged_equals_torch(cm)
    assert engine.runner is not runner


def test_in_place_changes_reach_the_static_buffer_graph_steps():
    """With graphs on, the thought loop and decode steps read the weights through the same storage: an
    in-place update needs no recapture (eagerly on CPU; the replay of the same bodies on a GPU)."""
    cm = engine_model("llama")
    questions, counts = QUESTIONS, [3, 3]  # both think together: the thought loop runs
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device"):
        llm = LLM(cm, num_blocks=32, block_size=BLOCK, kernels="torch", cuda_graphs=True)
    sp = SamplingParams(max_new_tokens=NEW, eos_token_ids=(60,))
    assert_matches_reference(cm, llm.generate(questions, sp, num_thoughts=counts, use_tqdm=False), questions,
                             counts, NEW)
    graphs = llm.runner.graphs
    assert ("thoughts", 2, 2) in graphs.bodies
    add_noise(cm, 5)
    assert_matches_reference(cm, llm.generate(questions, sp, num_thoughts=counts, use_tqdm=False), questions,
                             counts, NEW)
    assert llm.runner.graphs is graphs


def test_reset_prefix_cache_forgets_every_key():
    cm = engine_model("llama")
    llm = LLM(cm, num_blocks=32, block_size=BLOCK, kernels="torch")
    sp = SamplingParams(max_new_tokens=2)
    llm.generate(QUESTIONS, sp, num_thoughts=COUNTS, use_tqdm=False)
    assert llm.allocator.key_to_block
    llm.reset_prefix_cache()
    assert not llm.allocator.key_to_block and all(b.key is None for b in llm.allocator.blocks)
    first = len(llm.stats.steps)
    llm.generate(QUESTIONS[:1], sp, num_thoughts=COUNTS[:1], use_tqdm=False)
    assert llm.stats.steps[first].num_tokens == len(QUESTIONS[0]) + 1  # the whole prompt through <bot> again


@pytest.mark.parametrize("error", [RuntimeError("out of memory"), KeyboardInterrupt()])
def test_a_failed_prompt_step_publishes_no_key(monkeypatch, error):
    cm = engine_model("llama")
    llm = LLM(cm, num_blocks=32, block_size=BLOCK, kernels="torch")
    sp = SamplingParams(max_new_tokens=NEW, eos_token_ids=(60,))

    def fail(step):
        raise error

    monkeypatch.setattr(llm.runner, "run", fail)  # the very step that admits the prompts and writes their blocks
    with pytest.raises(type(error)):
        llm.generate(QUESTIONS, sp, num_thoughts=COUNTS, use_tqdm=False)
    assert not llm.allocator.key_to_block and not llm.allocator.pending
    assert all(b.key is None for b in llm.allocator.blocks)
    assert_all_blocks_free(llm)
    monkeypatch.undo()
    first = len(llm.stats.steps)
    outputs = llm.generate(QUESTIONS, sp, num_thoughts=COUNTS, use_tqdm=False)
    assert llm.stats.steps[first].num_tokens == sum(len(q) + 1 for q in QUESTIONS)  # nothing taken from the cache
    assert_matches_reference(cm, outputs, QUESTIONS, COUNTS, NEW)
    assert_all_blocks_free(llm)


def test_blocks_are_shared_within_their_step_and_published_after_it(monkeypatch):
    cm = engine_model("llama")
    llm = LLM(cm, num_blocks=32, block_size=BLOCK, kernels="torch")
    seen, run = [], llm.runner.run

    def spy(step):
        tables = [list(seq.block_table) for seq in step.seqs]
        seen.append((tables, set(llm.allocator.key_to_block.values()), set(llm.allocator.pending.values())))
        return run(step)

    monkeypatch.setattr(llm.runner, "run", spy)
    prompt = QUESTIONS[0] + [cm.latent_ids.start, cm.latent_ids.latent, cm.latent_ids.end]
    outputs = llm.generate([prompt, prompt], SamplingParams(max_new_tokens=2), use_tqdm=False)
    (a, b), published, pending = seen[0]
    assert a[:2] == b[:2] and not published and pending == set(a[:2])  # shared in the step that writes them
    assert all(not later_pending for _, _, later_pending in seen[1:])
    assert set(llm.allocator.key_to_block.values()) == set(a[:2])  # published once the step has run
    assert outputs[0].token_ids == outputs[1].token_ids
    assert_all_blocks_free(llm)


def test_a_model_with_active_dropout_is_refused():
    model = make_coconut("gpt2").model
    model.config.resid_pdrop = 0.1
    cm = CoconutModel.from_pretrained(type(model)(model.config), tokenizer=make_coconut("gpt2").tokenizer)
    cm.train()
    ids, mask = left_pad(QUESTIONS, cm.tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=r"training mode with dropout.*\.eval\(\)"):
        cm.generate(ids, mask, num_thoughts=COUNTS, max_new_tokens=2, backend="paged")
    out = cm.generate(ids, mask, num_thoughts=COUNTS, max_new_tokens=2, backend="torch")  # as before: allowed
    assert out.shape[0] == 2
    cm.eval()
    assert cm.generate(ids, mask, num_thoughts=COUNTS, max_new_tokens=2, backend="paged").shape[0] == 2

    llama = make_coconut("llama")
    llama.model.config.attention_dropout = 0.0
    llama.train()  # training mode without any dropout probability: nothing is dropped, so it runs
    assert llama.generate(ids, mask, num_thoughts=COUNTS, max_new_tokens=2, backend="paged").shape[0] == 2
    for layer in llama.model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="self_attn"):
        llama.generate(ids, mask, num_thoughts=COUNTS, max_new_tokens=2, backend="paged")


@pytest.mark.parametrize("backend", ["torch", "paged"])
def test_bad_token_ids_are_named_by_both_backends(backend):
    cm = engine_model("llama")
    vocab = cm.model.get_input_embeddings().weight.shape[0]
    ids, mask = left_pad(QUESTIONS, cm.tokenizer.pad_token_id)
    for bad in (vocab, -3):
        wrong = ids.clone()
        wrong[1, -1] = bad
        with pytest.raises(ValueError, match=rf"prompt 1: token ids must be in \[0, {vocab}\), got \[{bad}\]"):
            cm.generate(wrong, mask, num_thoughts=COUNTS, max_new_tokens=2, backend=backend)
    with pytest.raises(TypeError, match="integer token ids.*torch.float32"):
        cm.generate(ids.float(), mask, num_thoughts=COUNTS, max_new_tokens=2, backend=backend)
    with pytest.raises(TypeError, match="torch.bool"):
        cm.generate(ids.bool(), mask, num_thoughts=COUNTS, max_new_tokens=2, backend=backend)


@pytest.mark.parametrize("write", ["neg", "one_element", "scale", "swap_rows"])
def test_the_value_fingerprint_sees_writes_no_version_counter_records(write):
    from coconut_fast.engine.weights import WeightState

    cm = engine_model("llama")
    before = WeightState.of(cm.model)
    assert WeightState.of(cm.model).same_values(before)  # deterministic for unchanged weights
    weight = cm.model.model.layers[0].mlp.down_proj.weight
    if write == "neg":
        weight.data.neg_()
    elif write == "one_element":
        weight.data[3, 5] += 1e-3
    elif write == "scale":
        weight.data.mul_(1.01)
    else:  # two rows of the embedding swapped: its sum and norm stay, the row-weighted sum does not
        emb = cm.model.get_input_embeddings().weight.data
        emb[[1, 2]] = emb[[2, 1]].clone()
    after = WeightState.of(cm.model)
    assert after.versions == before.versions and after.same_storage(before)
    assert not after.same_values(before)
