"""The three Coconut special tokens: names, ids, and how they join a tokenizer and a model."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

START_LATENT = "<|start-latent|>"
END_LATENT = "<|end-latent|>"
LATENT = "<|latent|>"
# The official code adds the tokens in this order, so their ids match its checkpoints.
LATENT_TOKENS = (START_LATENT, END_LATENT, LATENT)
# The official code copies the rows of "<<" into the new tokens' rows.
INIT_TOKEN = "<<"


@dataclass(frozen=True)
class LatentIds:
    """Token ids of `<bot>` (start), `<|latent|>` and `<eot>` (end)."""

    start: int
    latent: int
    end: int


def _token_id(tokenizer, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        return None
    return int(tid)


def latent_ids(tokenizer) -> LatentIds:
    """The ids of the special tokens; a ValueError names the missing ones."""
    ids = {t: _token_id(tokenizer, t) for t in LATENT_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(
            f"tokenizer has no {', '.join(missing)} token(s); load the model with "
            "CoconutModel.from_pretrained(..., add_latent_tokens=True) or call "
            "coconut_fast.tokens.add_latent_tokens(tokenizer, model)"
        )
    return LatentIds(start=ids[START_LATENT], latent=ids[LATENT], end=ids[END_LATENT])


def init_source_id(tokenizer) -> int:
    """Row the new tokens start from: "<<" when it is one token, else the EOS token."""
    tid = _token_id(tokenizer, INIT_TOKEN)
    if tid is not None:
        return tid
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither a '<<' token nor an eos_token to initialise latent tokens from")
    return int(tokenizer.eos_token_id)


def add_latent_tokens(tokenizer, model) -> LatentIds:
    """Add the missing special tokens to `tokenizer` and give `model` rows for them.

    New input-embedding and output rows are copies of the "<<" token's rows (EOS when the
    tokenizer has no single "<<" token). The vocabulary only grows: models whose embedding
    matrix already has room (Qwen pads its vocabulary) are not resized.
    """
    missing = [t for t in LATENT_TOKENS if _token_id(tokenizer, t) is None]
    for token in missing:  # one at a time keeps the official id order
        tokenizer.add_tokens([token], special_tokens=True)
    ids = latent_ids(tokenizer)
    if not missing:
        return ids
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the official code does
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    source = init_source_id(tokenizer)
    new_ids = [_token_id(tokenizer, t) for t in missing]
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        for tid in new_ids:
            emb[tid] = emb[source]
            if out is not None and out.weight is not emb:
                out.weight[tid] = out.weight[source]
    logger.info("added %s to the tokenizer, rows copied from token id %d", ", ".join(missing), source)
    return ids
