"""Parallel latent mode: all thoughts of a sample refined together by Jacobi iteration (as in PCCoT).

The columns before the first latent go in one cached pass, as in the sequential mode. Then each
of `iterations` passes runs the whole latent span [first, last] at once against that prefix:
every latent slot takes, as its input, the hidden state its predecessor column had in the
previous iteration (the first iteration starts from the `<|latent|>` token embeddings; the
first latent's predecessor is the exact prefix). A last pass over [first, T) gives the hidden
states of the rest. Gradients flow through every iteration.

After t iterations the first t thoughts are exact, so with `iterations` >= the number of latent
columns the result equals the sequential mode (up to float rounding); with fewer it is an
approximation whose thoughts after the first `iterations` ones have not converged.
Passes: 1 + iterations + 1, each of the latent span's width, instead of one per latent column.
"""
from __future__ import annotations

import torch

from .passes import Backbone, Passes, cache_state, fill_latent, restore_cache


def run_jacobi(
    backbone: Backbone, token_embeds, latent_mask, attention_mask, position_ids, span: tuple[int, int],
    iterations: int, checkpoint_layers=(),
):
    """Returns (hidden [B,T,H], inputs_embeds [B,T,H]) of a batch with latents in columns span[0]..span[1]."""
    first, last = span
    run = Passes(backbone, token_embeds, attention_mask, position_ids, checkpoint_layers)
    prefix = run(0, first, token_embeds[:, :first])
    prefix_cache = cache_state(run.cache)
    latent = latent_mask[:, first : last + 1]
    span_tokens = token_embeds[:, first : last + 1]
    inputs = span_tokens
    for _ in range(iterations):
        hidden = run(first, last + 1, inputs)
        restore_cache(run.cache, prefix_cache)  # the iteration's keys and values are not kept
        inputs = fill_latent(torch.cat([prefix[:, -1:], hidden[:, :-1]], dim=1), span_tokens, latent)
    rest = torch.cat([inputs, token_embeds[:, last + 1 :]], dim=1)
    final = run(first, token_embeds.shape[1], rest)
    return torch.cat([prefix, final], dim=1), torch.cat([token_embeds[:, :first], rest], dim=1)
