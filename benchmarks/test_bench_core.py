"""CPU throughput of the core paths against the reference (pytest-benchmark).

    python -m pytest benchmarks --benchmark-only

A GPT-2-shaped model, small enough for a CPU: ProsQA-length sequences (about 400 tokens with
the local tokenizer), batch 8, 0 to 6 thoughts. Numbers from CPU runs are for comparing the
paths with one another, not for GPU claims.
"""
import random

import pytest
import torch

from coconut_fast import CoconutModel
from coconut_fast.data import CoconutCollator, CurriculumConfig, build_eval_example, build_training_example
from coconut_fast.data import default_tokenizer, generate_prosqa, tokenize_record
from coconut_fast.generation import left_pad
from coconut_fast.reference import reference_forward, reference_generate
from coconut_fast.tiny import tiny_model

BATCH = 8


@pytest.fixture(scope="module")
def setup():
    tok = default_tokenizer()
    cm = CoconutModel.from_pretrained(tiny_model("gpt2", len(tok), hidden=128, layers=4, heads=4, context=1024), tokenizer=tok)
    records = [tokenize_record(r, tok, i) for i, r in enumerate(generate_prosqa(BATCH, seed=11))]
    return cm, records


def training_batch(cm, records, stage):
    cfg = CurriculumConfig(mode="coconut", max_latent_stage=6, pad_latent_to_max=True)
    feats = [build_training_example(r, stage, cfg, cm.latent_ids, random.Random(0)) for r in records]
    return CoconutCollator(cm.tokenizer.pad_token_id, cm.latent_ids.latent)(feats)


@pytest.mark.parametrize("stage", [0, 3, 6])
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_train_step(benchmark, setup, stage, path):
    cm, records = setup
    b = training_batch(cm, records, stage)
    args = (b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"])

    def step():
        if path == "fast":
            loss = cm(*args).loss
        else:
            loss = reference_forward(cm.model, b["input_ids"], cm.latent_ids.latent, *args[1:])[0]
        loss.backward()
        cm.zero_grad(set_to_none=True)
        return loss.item()

    benchmark.extra_info["samples"] = BATCH
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_generate_six_thoughts(benchmark, setup, path):
    cm, records = setup
    cfg = CurriculumConfig(mode="coconut", max_latent_stage=6, pad_latent_to_max=True)
    prompts = [build_eval_example(r, 6, cfg, cm.latent_ids)["input_ids"] for r in records]

    def run():
        with torch.no_grad():
            if path == "fast":
                return cm.generate(*left_pad(prompts, cm.tokenizer.pad_token_id), max_new_tokens=16)
            return [reference_generate(cm.model, p, cm.latent_ids.latent, cm.tokenizer.eos_token_id, 16) for p in prompts]

    benchmark.extra_info["samples"] = BATCH
    benchmark.pedantic(run, rounds=2, warmup_rounds=0)
