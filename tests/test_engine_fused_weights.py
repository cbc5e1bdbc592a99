"""Fused q/k/v and gate/up weights: the HF parameters view one matrix each, no second copy of the weights, and
training, the torch backend and the engine read and update the same storage."""
import pytest
import torch

from coconut_fast import CoconutModel
from coconut_fast.engine import LLM
from coconut_fast.engine.fused_weights import backs
from coconut_fast.prompts import left_pad
from engine_helpers import engine_model

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [[5, 6, 7, 8, 9], [1, 2, 3]]


def assert_paged_equals_torch(cm):
    ids, mask = left_pad(QUESTIONS, cm.tokenizer.pad_token_id)
    kw = dict(num_thoughts=[2, 3], max_new_tokens=5, output_thoughts=True)
    paged, plain = cm.generate(ids, mask, backend="paged", **kw), cm.generate(ids, mask, backend="torch", **kw)
    assert torch.equal(paged.sequences, plain.sequences)
    assert (paged.thoughts - plain.thoughts).abs().max() <= 1e-5 * plain.thoughts.abs().max()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_projections_become_views_of_one_matrix(family):
    cm = engine_model(family)
    params = {id(p) for p in cm.model.parameters()}
    before = sum(p.numel() for p in cm.model.parameters())
    opt = torch.optim.SGD(cm.model.parameters(), lr=0.1)  # built before the engine: must keep working
    LLM(cm, num_blocks=16, block_size=4, kernels="torch")
    assert {id(p) for p in cm.model.parameters()} == params  # the same Parameter objects
    for layer in cm.model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, qkv_bias = attn.qkv_proj
        assert backs(qkv, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        assert (qkv_bias is not None) == (attn.q_proj.bias is not None)
        if qkv_bias is not None:
            assert backs(qkv_bias, [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        assert backs(mlp.gate_up_proj[0], [mlp.gate_proj.weight, mlp.up_proj.weight])
    assert sum(p.numel() for p in cm.model.parameters()) == before
    # an optimizer step on the old references reaches the engine's matrices, and the two backends agree
    gen = torch.Generator().manual_seed(0)
    for p in cm.model.parameters():
        p.grad = 0.05 * torch.randn(p.shape, generator=gen)
    q_before = cm.model.model.layers[0].self_attn.qkv_proj[0].clone()
    opt.step()
    assert not torch.equal(cm.model.model.layers[0].self_attn.qkv_proj[0], q_before)
    assert_paged_equals_torch(cm)


def test_a_second_engine_reuses_the_fusion_and_the_model_still_trains_and_saves(tmp_path):
    cm = engine_model("qwen2")
    LLM(cm, num_blocks=16, block_size=4, kernels="torch")
    fused = cm.model.model.layers[1].self_attn.qkv_proj[0]
    LLM(cm, num_blocks=16, block_size=4, kernels="torch")
    assert cm.model.model.layers[1].self_attn.qkv_proj[0] is fused  # no new copy
    ids = torch.tensor([[1, 2, 3, cm.latent_ids.start, cm.latent_ids.latent, cm.latent_ids.end, 4, 5]])
    cm.train()
    loss = cm(ids, labels=ids).loss
    loss.backward()
    assert cm.model.model.layers[1].self_attn.k_proj.weight.grad is not None
    cm.eval()
    cm.save_pretrained(tmp_path / "m")
    loaded = CoconutModel.from_pretrained(tmp_path / "m")
    for a, b in zip(cm.model.parameters(), loaded.model.parameters()):
        assert torch.equal(a, b)
