"""Batched, KV-cached Coconut generation: thoughts first, then language, one cache throughout."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.utils import ModelOutput

from .passes import run_passes
from .reference import default_position_ids
from .tokens import LatentIds


@dataclass
class CoconutGenerateOutput(ModelOutput):
    """`sequences`: prompts (with their `<bot>…<eot>` blocks, left-padded) then the new tokens.

    New tokens start at column `prompt_length`; after a sample's EOS come pad tokens.
    `thoughts` [B, max thoughts, H] holds each sample's continuous thoughts, zero-padded.
    """

    sequences: torch.Tensor | None = None
    prompt_length: int | None = None
    num_thoughts: torch.Tensor | None = None
    thoughts: torch.Tensor | None = None


def check_latent_blocks(prompt: list[int], ids: LatentIds, row: int) -> int:
    """Number of latents in a prompt whose latents all sit inside `<bot> … <eot>` blocks."""
    inside, count = False, 0
    for pos, tok in enumerate(prompt):
        if tok == ids.start:
            if inside:
                raise ValueError(f"input_ids row {row}: nested <bot> at position {pos}")
            inside = True
        elif tok == ids.end:
            if not inside:
                raise ValueError(f"input_ids row {row}: <eot> at position {pos} without a <bot>")
            inside = False
        elif tok == ids.latent:
            if not inside:
                raise ValueError(f"input_ids row {row}: latent token at position {pos} outside a <bot> … <eot> block")
            count += 1
    if inside:
        raise ValueError(f"input_ids row {row}: <bot> without a closing <eot>")
    return count


def check_token_ids(prompt: list[int], vocab_size: int, index: int) -> None:
    """Every id of a prompt must index a row of the embedding matrix."""
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt {index}: token ids must be in [0, {vocab_size}), got {bad[:5]}")


def build_prompts(input_ids, attention_mask, num_thoughts, ids: LatentIds,
                  vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """The unpadded prompts with their latent blocks, and each prompt's number of thoughts."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids (torch.long), got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(input_ids.shape)}")
    B = input_ids.shape[0]
    if B == 0:
        raise ValueError("input_ids holds no prompt (batch size 0)")
    prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu())]
    for b, p in enumerate(prompts):
        if not p:
            raise ValueError(f"input_ids row {b} is an empty prompt (no token with attention_mask 1)")
        check_token_ids(p, vocab_size, b)
    carried = [check_latent_blocks(p, ids, b) for b, p in enumerate(prompts)]
    if num_thoughts is None:
        return prompts, carried
    counts = [num_thoughts] * B if isinstance(num_thoughts, int) else list(num_thoughts)
    if len(counts) != B:
        raise ValueError(f"num_thoughts has {len(counts)} entries for a batch of {B} prompts")
    for b, k in enumerate(counts):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"num_thoughts[{b}] must be an integer >= 0, got {k!r}")
    for b, p in enumerate(prompts):
        if ids.start in p or ids.end in p:
            raise ValueError(
                f"input_ids row {b} already carries a <bot> … <eot> block; pass num_thoughts=None "
                "for prompts in the official format, or prompts without latent tokens with num_thoughts"
            )
    prompts = [p + [ids.start] + [ids.latent] * k + [ids.end] for p, k in zip(prompts, counts)]
    return prompts, counts


def left_pad(prompts: list[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as a left-padded batch: (input_ids, attention_mask)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _warpers(temperature: float, top_k: int, top_p: float) -> list:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


BACKENDS = ("torch", "paged")


def _max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def generate(
    coconut,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    num_thoughts: int | list[int] | None = None,
    max_new_tokens: int = 128,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    return_dict_in_generate: bool = False,
    output_thoughts: bool = False,
    backend: str = "torch",
):
    """Generate from left-padded prompts.

    Prompts either carry their `<bot><latent>…<eot>` blocks (the official format) or get
    `num_thoughts` latents appended (an int, or one per prompt). Each sample stops at its EOS.
    Returns the `sequences` tensor, or a `CoconutGenerateOutput` when `return_dict_in_generate`
    or `output_thoughts` is set.

    `backend="torch"` runs the HF model with one DynamicCache; `backend="paged"` runs the paged
    engine (`coconut_fast.engine`) and returns the same result types, shapes and padding. Greedy
    tokens agree; sampled tokens come from one generator per request, seeded from the global RNG.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    ids: LatentIds = coconut.latent_ids
    model, tokenizer = coconut.model, coconut.tokenizer
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    vocab_size = model.get_input_embeddings().weight.shape[0]
    prompts, counts = build_prompts(input_ids, attention_mask, num_thoughts, ids, vocab_size)
    width = max(len(p) for p in prompts)
    limit = _max_positions(model.config)
    if limit is not None and width + max_new_tokens > limit:
        raise ValueError(
            f"the longest prompt with its thoughts has {width} tokens; with max_new_tokens={max_new_tokens} "
            f"that exceeds the model's context of {limit} positions"
        )
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=coconut.device, dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
    pad = pad if pad is not None else (int(eos[0]) if eos.numel() else 0)
    warpers = _warpers(temperature, top_k, top_p) if do_sample else None

    B, device = len(prompts), coconut.device
    seq, mask = left_pad(prompts, pad, device)
    positions = default_position_ids(mask)
    embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    if backend == "paged":
        from .engine.llm import paged_generate

        tokens, thoughts = paged_generate(
            coconut, prompts, max_new_tokens, eos.tolist(), do_sample, temperature, top_k, top_p
        )
        new = torch.full((B, max(map(len, tokens))), pad, dtype=torch.long, device=device)
        for b, t in enumerate(tokens):
            new[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        return _result(torch.cat([seq, new], dim=1), width, counts, thoughts, return_dict_in_generate, output_thoughts)

    latent = seq == ids.latent
    hidden, embeds, cache = run_passes(coconut.backbone, embed(seq), latent, mask, positions)
    logits = lm_head(hidden[:, -1]).float()

    new_tokens = []
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    next_pos = positions[:, -1] + 1
    for step in range(max_new_tokens):
        if warpers is None:
            token = logits.argmax(-1)
        else:
            for warp in warpers:
                logits = warp(None, logits)
            token = torch.multinomial(logits.softmax(-1), 1).squeeze(1)
        token = torch.where(unfinished, token, pad)
        new_tokens.append(token)
        unfinished &= ~torch.isin(token, eos)
        if step + 1 == max_new_tokens or not unfinished.any():
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        h = coconut.backbone(embed(token[:, None]), mask, next_pos[:, None], cache)
        next_pos = next_pos + 1
        logits = lm_head(h[:, -1]).float()

    sequences = torch.cat([seq, torch.stack(new_tokens, 1)], dim=1) if new_tokens else seq
    thoughts = [embeds[b][latent[b]] for b in range(B)]
    return _result(sequences, width, counts, thoughts, return_dict_in_generate, output_thoughts)


def _result(sequences, width, counts, thoughts, return_dict_in_generate, output_thoughts):
    """`sequences`, or the dict output with the thoughts [k_b, H] of each sample zero-padded."""
    if not (return_dict_in_generate or output_thoughts):
        return sequences
    device = sequences.device
    out = CoconutGenerateOutput(
        sequences=sequences, prompt_length=width, num_thoughts=torch.tensor(counts, device=device)
    )
    if output_thoughts:
        padded = thoughts[0].new_zeros(len(counts), max(counts, default=0), thoughts[0].shape[-1])
        for b, t in enumerate(thoughts):
            padded[b, : counts[b]] = t
        out.thoughts = padded
    return out
