"""Batched, KV-cached Coconut generation: thoughts first, then language, one cache throughout.

`generate` prepares the prompts (`prepare`) and hands them to a backend: `generate_torch` (the HF model
with one DynamicCache) or `generate_paged` (the paged engine, built per model by `engine_for`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from .engine import LLM, SamplingParams
from .passes import run_passes
from .prompts import build_prompts, check_num_thoughts_arg, default_position_ids, left_pad
from .sampling import logits_warpers

BACKENDS = ("torch", "paged")
DEFAULT_BLOCK_SIZE = 16


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


@dataclass
class Prepared:
    """A checked batch: the unpadded prompts with their blocks, and how to decode them."""

    prompts: list[list[int]]
    counts: list[int]  # thoughts per prompt
    max_new_tokens: int
    eos: list[int]
    pad: int
    sampling: dict  # do_sample, temperature, top_k, top_p
    auto: tuple[int, float] | None = None  # (max_thoughts, switch_threshold) of num_thoughts="auto"

    @property
    def width(self) -> int:
        return max(len(p) for p in self.prompts)


def prepare(coconut, input_ids, attention_mask, num_thoughts, max_new_tokens, eos_token_id, pad_token_id,
            do_sample, temperature, top_k, top_p) -> Prepared:
    """Check every argument once, for both backends; the prompts with their latent blocks."""
    model, tokenizer = coconut.model, coconut.tokenizer
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    vocab_size = model.get_input_embeddings().weight.shape[0]
    prompts, counts = build_prompts(input_ids, attention_mask, num_thoughts, coconut.latent_ids, vocab_size)
    width = max(len(p) for p in prompts)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and width + max_new_tokens > limit:
        raise ValueError(
            f"the longest prompt with its thoughts has {width} tokens; with max_new_tokens={max_new_tokens} "
            f"that exceeds the model's context of {limit} positions"
        )
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < vocab_size:
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab_size}) (the pad after each EOS), got {pad!r}")
    if do_sample:
        logits_warpers(temperature, top_k, top_p)  # checks the three values
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    return Prepared(prompts, counts, max_new_tokens, eos, pad, sampling)


def generate(
    coconut,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    num_thoughts: int | list[int] | str | None = None,
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
    max_thoughts: int | None = None,
    switch_threshold: float = 0.5,
):
    """Generate from left-padded prompts.

    Prompts either carry their `<bot><latent>…<eot>` blocks (the official format) or get
    `num_thoughts` latents appended (an int, or one per prompt). Each sample stops at its EOS.
    `num_thoughts="auto"` (needs the model's switch head, `add_switch_head`): each prompt gets `<bot>` and
    thinks until its head gives p(switch) >= `switch_threshold` on its latest thought, or `max_thoughts`
    thoughts; then `<eot>` and the answer (`num_thoughts` of the dict output holds each prompt's count).
    Returns the `sequences` tensor, or a `CoconutGenerateOutput` when `return_dict_in_generate`
    or `output_thoughts` is set.

    `backend="torch"` runs the HF model with one DynamicCache; `backend="paged"` runs the paged
    engine (`coconut_fast.engine`) and returns the same result types, shapes and padding. Greedy
    tokens agree; sampled tokens come from one generator per request, seeded from the global RNG.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_num_thoughts_arg(num_thoughts)
    auto = num_thoughts == "auto"
    if auto:
        check_auto(coconut, max_thoughts, switch_threshold)
    elif max_thoughts is not None:
        raise ValueError("max_thoughts applies to num_thoughts='auto' only")
    batch = prepare(coconut, input_ids, attention_mask, 0 if auto else num_thoughts, max_new_tokens, eos_token_id,
                    pad_token_id, do_sample, temperature, top_k, top_p)
    if auto:
        batch.prompts = [p[:-1] for p in batch.prompts]  # the question and <bot>: the head decides what follows
        batch.auto = (max_thoughts, float(switch_threshold))
        check_context(coconut, batch.width + max_thoughts + 1, max_new_tokens)
        run = generate_paged if backend == "paged" else generate_torch_auto
    else:
        run = generate_paged if backend == "paged" else generate_torch
    new_tokens, thoughts = run(coconut, batch)
    prompt_ids, _ = left_pad(batch.prompts, batch.pad, coconut.device)
    sequences = torch.cat([prompt_ids, new_tokens], dim=1)
    if not (return_dict_in_generate or output_thoughts):
        return sequences
    out = CoconutGenerateOutput(sequences=sequences, prompt_length=batch.width,
                                num_thoughts=torch.tensor(batch.counts, device=sequences.device))
    if output_thoughts:
        padded = thoughts[0].new_zeros(len(batch.counts), max(batch.counts, default=0), thoughts[0].shape[-1])
        for b, t in enumerate(thoughts):
            padded[b, : batch.counts[b]] = t
        out.thoughts = padded
    return out


def check_auto(coconut, max_thoughts, switch_threshold) -> None:
    if getattr(coconut, "switch_head", None) is None:
        raise ValueError("num_thoughts='auto' needs a switch head: call add_switch_head() and train it, or load a "
                         "model saved with one")
    if isinstance(max_thoughts, bool) or not isinstance(max_thoughts, int) or max_thoughts < 0:
        raise ValueError(f"num_thoughts='auto' needs max_thoughts, an integer >= 0, got {max_thoughts!r}")
    if isinstance(switch_threshold, bool) or not isinstance(switch_threshold, (int, float)):
        raise ValueError(f"switch_threshold must be a number (p(switch) >= it ends the thoughts), "
                         f"got {switch_threshold!r}")


def check_context(coconut, width: int, max_new_tokens: int) -> None:
    limit = getattr(coconut.model.config, "max_position_embeddings", None)
    if limit is not None and width + max_new_tokens > limit:
        raise ValueError(f"the longest prompt with up to max_thoughts thoughts and <eot> has {width} tokens; with "
                         f"max_new_tokens={max_new_tokens} that exceeds the model's context of {limit} positions")


# ---------------------------------------------------------------- the torch backend
def pick_tokens(logits: torch.Tensor, warpers: list | None) -> torch.Tensor:
    """Greedy argmax, or a draw from the warped distribution (transformers' warpers, the global RNG)."""
    if warpers is None:
        return logits.argmax(-1)
    for warp in warpers:
        logits = warp(None, logits)
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)


def generate_torch(coconut, batch: Prepared) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """New tokens [B, n] (pad after each EOS) and thoughts [k_b, H]: the Coconut passes over the prompts, then
    one cached step per token."""
    model, device = coconut.model, coconut.device
    B = len(batch.prompts)
    seq, mask = left_pad(batch.prompts, batch.pad, device)
    positions = default_position_ids(mask)
    embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    latent = seq == coconut.latent_ids.latent
    hidden, embeds, cache = run_passes(coconut.backbone, embed(seq), latent, mask, positions)
    logits = lm_head(hidden[:, -1]).float()
    s = batch.sampling
    warpers = logits_warpers(s["temperature"], s["top_k"], s["top_p"]) if s["do_sample"] else None
    eos = torch.tensor(batch.eos, device=device, dtype=torch.long)

    new_tokens = []
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    next_pos = positions[:, -1] + 1
    for step in range(batch.max_new_tokens):
        token = torch.where(unfinished, pick_tokens(logits, warpers), batch.pad)
        new_tokens.append(token)
        unfinished &= ~torch.isin(token, eos)
        if step + 1 == batch.max_new_tokens or not unfinished.any():
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        h = coconut.backbone(embed(token[:, None]), mask, next_pos[:, None], cache)
        next_pos = next_pos + 1
        logits = lm_head(h[:, -1]).float()
    tokens = torch.stack(new_tokens, 1) if new_tokens else seq.new_zeros(B, 0)
    return tokens, [embeds[b][latent[b]] for b in range(B)]


# ---------------------------------------------------------------- the paged backend
def engine_for(coconut, min_blocks: int = 1, **options) -> LLM:
    """The engine `generate(backend="paged")` uses for `coconut`, built on first use and kept on the model.

    Options given here (see `LLM`) replace the engine and are kept for later rebuilds. Without
    `num_blocks` or `memory_fraction` the cache is sized to the batch at hand (`min_blocks`) and
    grows with later, larger batches. The engine is also rebuilt when the model moved to another
    device or dtype.
    """
    engine, user = getattr(coconut, "paged_engine", None) or (None, {})
    user = dict(options) if options else user
    sized_by_user = user.get("num_blocks") is not None or user.get("memory_fraction") is not None
    dtype = coconut.model.get_input_embeddings().weight.dtype
    if (engine is None or options or engine.device != coconut.device or engine.dtype != dtype
            or (not sized_by_user and engine.num_blocks < min_blocks)):
        built = dict(user)
        if not sized_by_user:
            built["num_blocks"] = max(min_blocks, engine.num_blocks if engine is not None and not options else 0)
        engine = LLM(coconut, **built)
        coconut.paged_engine = (engine, user)  # a plain attribute: kept out of state_dict
    return engine


def generate_paged(coconut, batch: Prepared) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """New tokens [B, n] (pad after each EOS) and thoughts [k_b, H], from the paged engine."""
    _, user = getattr(coconut, "paged_engine", None) or (None, {})
    block_size = user.get("block_size", DEFAULT_BLOCK_SIZE)
    extra = batch.auto[0] + 1 if batch.auto is not None else 0  # the latents and <eot> a learned count may add
    need = sum(-(-(len(p) + extra + batch.max_new_tokens) // block_size) for p in batch.prompts)
    engine = engine_for(coconut, min_blocks=need)
    sampling = SamplingParams(max_new_tokens=batch.max_new_tokens, eos_token_ids=tuple(batch.eos), **batch.sampling)
    outputs = engine.generate_checked(batch.prompts, [sampling] * len(batch.prompts), auto=batch.auto)
    if batch.auto is not None:  # the blocks the switch head chose
        batch.prompts = [o.prompt_token_ids for o in outputs]
        batch.counts = [o.num_thoughts for o in outputs]
    tokens = torch.full((len(outputs), max(len(o.token_ids) for o in outputs)), batch.pad, dtype=torch.long,
                        device=coconut.device)
    for b, o in enumerate(outputs):
        tokens[b, : len(o.token_ids)] = torch.tensor(o.token_ids, dtype=torch.long)
    return tokens, [o.thoughts for o in outputs]


def generate_torch_auto(coconut, batch: Prepared) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`generate_torch` with learned thought counts; fills `batch.prompts` / `batch.counts` with the blocks chosen.

    One cache, one column per step for every row: a row that is thinking takes its last hidden state, a row
    whose head just said switch takes `<eot>`, a row past `<eot>` takes its last token. Each row's columns
    stay contiguous, so rows that switch at different steps never leave gaps in their positions."""
    model, device, head = coconut.model, coconut.device, coconut.switch_head
    max_thoughts, threshold = batch.auto
    ids = coconut.latent_ids
    B = len(batch.prompts)
    seq, mask = left_pad(batch.prompts, batch.pad, device)
    positions = default_position_ids(mask)
    embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    cache = coconut.backbone.new_cache()
    h = coconut.backbone(embed(seq), mask, positions, cache)[:, -1]  # every row ends at its <bot>
    s = batch.sampling
    warpers = logits_warpers(s["temperature"], s["top_k"], s["top_p"]) if s["do_sample"] else None
    eos = torch.tensor(batch.eos, device=device, dtype=torch.long)
    eot = embed(torch.tensor([ids.end], device=device))

    thinking = torch.ones(B, dtype=torch.bool, device=device)
    answering = torch.zeros(B, dtype=torch.bool, device=device)  # the last input was <eot> or a new token
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    counts = torch.zeros(B, dtype=torch.long, device=device)
    thoughts: list[list[torch.Tensor]] = [[] for _ in range(B)]
    new_tokens = torch.full((B, batch.max_new_tokens), batch.pad, dtype=torch.long, device=device)
    num_new = torch.zeros(B, dtype=torch.long, device=device)
    next_pos = positions[:, -1] + 1
    while True:
        token = torch.full((B,), batch.pad, dtype=torch.long, device=device)
        if answering.any():
            token = torch.where(answering, pick_tokens(lm_head(h).float(), warpers), token)
            rows = answering.nonzero().flatten()
            new_tokens[rows, num_new[rows]] = token[rows]
            num_new += answering.long()
            done = answering & (torch.isin(token, eos) | (num_new >= batch.max_new_tokens))
            unfinished &= ~done
            answering &= ~done
        switch = torch.zeros_like(thinking)
        if thinking.any():
            p = head.switch_probability(h)
            switch = thinking & ((p >= threshold) | (counts >= max_thoughts))
        go_on = thinking & ~switch
        for b in go_on.nonzero().flatten().tolist():
            thoughts[b].append(h[b])
        counts += go_on.long()
        thinking = go_on
        if batch.max_new_tokens == 0:  # no answer allowed: a row is done once it switches
            unfinished &= ~switch
        else:
            answering |= switch
        if not unfinished.any():
            break
        inputs = torch.where(go_on[:, None], h.to(eot.dtype), embed(token))
        inputs = torch.where(switch[:, None], eot, inputs)
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        h = coconut.backbone(inputs[:, None], mask, next_pos[:, None], cache)[:, -1]
        next_pos = next_pos + 1
    batch.counts = counts.tolist()
    batch.prompts = [p + [ids.latent] * k + [ids.end] for p, k in zip(batch.prompts, batch.counts)]
    hidden_size = h.shape[-1]
    stacked = [torch.stack(t) if t else h.new_zeros(0, hidden_size) for t in thoughts]
    return new_tokens[:, : int(num_new.max()) if B else 0], stacked
