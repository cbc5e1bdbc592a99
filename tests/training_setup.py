"""Small ProsQA-style data, a local tokenizer and tiny GPT-2 models for the training tests."""
from __future__ import annotations

import torch
from transformers import GPT2LMHeadModel

from coconut_fast.data import default_tokenizer, generate_prosqa
from coconut_fast.tiny import tiny_config
from coconut_fast.training import TrainConfig


def tiny_records(n: int, seed: int = 0) -> list[dict]:
    """Short ProsQA-style questions (1-3 steps, small graphs): about 70 tokens per sequence."""
    return generate_prosqa(n, seed=seed, min_steps=1, max_steps=3, min_nodes=6, max_nodes=9)


def local_tokenizer():
    """A fresh byte-level BPE trained on a fixed set of short records (CoconutModel adds tokens to it)."""
    return default_tokenizer(tiny_records(64, seed=1234))


def tiny_gpt2(tokenizer, seed: int = 0, dropout: float = 0.0, hidden: int = 32, layers: int = 2) -> GPT2LMHeadModel:
    config = tiny_config("gpt2", len(tokenizer), hidden=hidden, layers=layers, heads=2, context=256)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = dropout
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def run_config(tmp_path, **overrides) -> TrainConfig:
    """A Coconut run over two stages on the tiny model, saving under tmp_path."""
    values = dict(
        save_path=str(tmp_path), name="run", coconut=True, c_thought=1, epochs_per_stage=1, max_latent_stage=1,
        pad_latent_to_max=True, model_id="tiny:gpt2", tiny_size={"hidden": 32, "layers": 2, "heads": 2,
                                                                 "context": 256},
        batch_size_training=4, num_epochs=2, lr=1e-3, eval_batch_size=4, max_new_tokens=8, seed=0,
    )
    values.update(overrides)
    return TrainConfig.from_dict(values)

