"""CPU throughput of generation against the reference (pytest-benchmark); training steps are in
test_bench_training.py.

    python -m pytest benchmarks --benchmark-only

A GPT-2-shaped model, small enough for a CPU: ProsQA-length sequences (about 400 tokens with
the local tokenizer), batch 8, 0 to 6 thoughts. Numbers from CPU runs are for comparing the
paths with one another, not for GPU claims.
"""
import pytest
import torch

from coconut_fast import CoconutModel
from coconut_fast.data import CurriculumConfig, build_eval_example
from coconut_fast.data import default_tokenizer, generate_prosqa, tokenize_record
from coconut_fast.generation import left_pad
from coconut_fast.reference import reference_generate
from coconut_fast.tiny import tiny_model

BATCH = 8


@pytest.fixture(scope="module")
def setup():
    tok = default_tokenizer()
    cm = CoconutModel.from_pretrained(tiny_model("gpt2", len(tok), hidden=128, layers=4, heads=4, context=1024), tokenizer=tok)
    records = [tokenize_record(r, tok, i) for i, r in enumerate(generate_prosqa(BATCH, seed=11))]
    return cm, records


@pytest.mark.parametrize("path", ["fast", "paged", "reference"])
def test_generate_six_thoughts(benchmark, setup, path):
    cm, records = setup
    cfg = CurriculumConfig(mode="coconut", max_latent_stage=6, pad_latent_to_max=True)
    prompts = [build_eval_example(r, 6, cfg, cm.latent_ids)["input_ids"] for r in records]

    def run():
        with torch.no_grad():
            if path in ("fast", "paged"):
                backend = "torch" if path == "fast" else "paged"  # paged: the engine, torch-reference kernels on CPU
                return cm.generate(*left_pad(prompts, cm.tokenizer.pad_token_id), max_new_tokens=16, backend=backend)
            return [reference_generate(cm.model, p, cm.latent_ids.latent, cm.tokenizer.eos_token_id, 16) for p in prompts]

    benchmark.extra_info["samples"] = BATCH
    benchmark.pedantic(run, rounds=2, warmup_rounds=0)
