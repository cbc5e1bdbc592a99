"""The reference implementation of Coconut: the oracle every fast path is tested against.

Written to be read, not to be fast. Every pass recomputes the whole sequence from scratch with
the plain HF model (no KV cache), and a latent slot at position p gets the last-layer hidden
state at p-1 (`hidden_states[-1]`, after the final norm) as its input embedding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding (left or right): 0, 1, 2, ... over the real tokens."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def latent_positions(input_ids: torch.Tensor, latent_id: int) -> list[list[int]]:
    """For each sample, the positions of its latent slots, in order."""
    positions = [(row == latent_id).nonzero().flatten().tolist() for row in input_ids]
    for b, pos in enumerate(positions):
        if pos and pos[0] == 0:
            raise ValueError(f"sample {b}: a latent slot at position 0 has no preceding hidden state")
    return positions


def last_hidden_states(model, inputs_embeds, attention_mask, position_ids) -> torch.Tensor:
    """HF's `hidden_states[-1]`: the last layer's output after the final norm."""
    out = model(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
        use_cache=False,
    )
    return out.hidden_states[-1]


def fill_latents(model, input_ids, attention_mask, position_ids, latent_id: int) -> torch.Tensor:
    """Input embeddings with every latent slot replaced by its continuous thought.

    Pass j fills the j-th latent of every sample; it needs everything before that slot, which
    earlier passes have already filled. k latents therefore take k full passes here (plus the
    final pass that produces the logits).
    """
    embeds = model.get_input_embeddings()(input_ids)
    positions = latent_positions(input_ids, latent_id)
    for j in range(max((len(p) for p in positions), default=0)):
        hidden = last_hidden_states(model, embeds, attention_mask, position_ids)
        rows = []
        for b, pos in enumerate(positions):
            row = embeds[b]
            if j < len(pos):
                p = pos[j]
                row = torch.cat([row[:p], hidden[b, p - 1 : p], row[p + 1 :]])
            rows.append(row)
        embeds = torch.stack(rows)
    return embeds


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels that are not -100."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )


def reference_forward(model, input_ids, latent_id: int, attention_mask=None, labels=None, position_ids=None):
    """Coconut training forward: returns (loss or None, logits [B, T, V], inputs_embeds [B, T, H])."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_ids is None:
        position_ids = default_position_ids(attention_mask)
    embeds = fill_latents(model, input_ids, attention_mask, position_ids, latent_id)
    logits = model(
        inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).logits
    loss = causal_lm_loss(logits, labels) if labels is not None else None
    return loss, logits, embeds


@torch.no_grad()
def reference_generate(model, prompt: list[int], latent_id: int, eos_token_id: int | None, max_new_tokens: int):
    """Greedy decoding of one unpadded prompt (latents already in it); no cache.

    Every new token recomputes the whole sequence. Returns the new tokens (the EOS included
    when it is produced) and the continuous thoughts [k, H].
    """
    ids = torch.tensor([prompt], device=model.device)
    mask = torch.ones_like(ids)
    pos = default_position_ids(mask)
    embeds = fill_latents(model, ids, mask, pos, latent_id)
    thought_pos = latent_positions(ids, latent_id)[0]
    thoughts = embeds[0, thought_pos]
    new_tokens: list[int] = []
    embed = model.get_input_embeddings()
    for _ in range(max_new_tokens):
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=default_position_ids(mask)).logits
        token = int(logits[0, -1].argmax())
        new_tokens.append(token)
        if token == eos_token_id:
            break
        embeds = torch.cat([embeds, embed(torch.tensor([[token]], device=embeds.device))], dim=1)
    return new_tokens, thoughts
