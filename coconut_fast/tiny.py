"""Small random-weight models of every supported family, built from configs (no downloads)."""
from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from .families import FAMILIES

__all__ = ["FAMILIES", "tiny_config", "tiny_model"]


def tiny_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, context: int = 256):
    """A config of `family` with the given size; Llama-like families use grouped-query attention."""
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=context,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
        )
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=context,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    if family == "llama":
        return LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=hidden // heads)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def tiny_model(family: str, vocab_size: int, seed: int = 0, dtype=torch.float32, **size):
    """A random-weight causal LM of `family` in eval mode."""
    config = tiny_config(family, vocab_size, **size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = {
            "gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM,
            "qwen3": Qwen3ForCausalLM, "mistral": MistralForCausalLM,
        }[family](config)
    return model.to(dtype).eval()
