"""The Coconut multi-pass forward over an HF backbone with one KV cache.

The columns before the first latent go in one pass; every column from the first to the last
latent is one single-position pass for the whole batch (a latent takes the hidden state its
predecessor column just produced); the rest goes in one final pass. Autograd flows through the
cache, so gradients reach every thought.
"""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


def _cache_kwarg(backbone) -> str:
    # transformers renamed `past_key_values` to `cache` (5.2x); accept both.
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class Backbone:
    """The base model (without LM head) called one span of columns at a time against a cache."""

    def __init__(self, causal_lm):
        self.model = causal_lm.base_model
        self.config = causal_lm.config
        self.cache_kwarg = _cache_kwarg(self.model)

    def new_cache(self):
        return DynamicCache(config=self.config)

    def __call__(self, embeds, attention_mask, position_ids, cache) -> torch.Tensor:
        """Hidden states after the final norm for `embeds`, the columns after those in `cache`.

        With `cache=None` nothing is cached (a single pass that needs no later one)."""
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **({self.cache_kwarg: cache} if cache is not None else {}),
        )
        return out.last_hidden_state


def latent_span(latent_mask: torch.Tensor) -> tuple[int, int] | None:
    """(first, last) column holding a latent in any sample, or None; one host sync."""
    cols = latent_mask.any(0).nonzero().flatten()
    if cols.numel() == 0:
        return None
    first, last = cols[[0, -1]].tolist()
    if first == 0:
        raise ValueError("a latent slot in column 0 has no preceding hidden state")
    return first, last


def run_passes(backbone: Backbone, token_embeds, latent_mask, attention_mask, position_ids, keep_cache=True):
    """Run the Coconut passes over a batch; returns (hidden [B,T,H], inputs_embeds [B,T,H], cache).

    `token_embeds` are the token embeddings of every column; latent columns are replaced on the
    way by the thoughts. A batch without latents and `keep_cache=False` takes one uncached pass
    (and returns no cache).
    """
    T = token_embeds.shape[1]
    span = latent_span(latent_mask)
    if span is None and not keep_cache:
        return backbone(token_embeds, attention_mask, position_ids, None), token_embeds, None
    cache = backbone.new_cache()
    first, last = span if span is not None else (T, T - 1)
    hiddens, inputs = [], []

    def step(start, end, embeds):
        h = backbone(embeds, attention_mask[:, :end], position_ids[:, start:end], cache)
        hiddens.append(h)
        inputs.append(embeds)
        return h

    h = step(0, first, token_embeds[:, :first])  # first > 0: latent_span rejects column 0
    for col in range(first, last + 1):
        token = token_embeds[:, col : col + 1]
        h = step(col, col + 1, torch.where(latent_mask[:, col, None, None], h[:, -1:], token))
    if last + 1 < T:
        step(last + 1, T, token_embeds[:, last + 1 :])
    return torch.cat(hiddens, dim=1), torch.cat(inputs, dim=1), cache
