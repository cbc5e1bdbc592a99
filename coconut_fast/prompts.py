"""Prompts as both generation backends take them: token-id checks, `<bot> … <eot>` blocks, left padding,
positions that skip padding."""
from __future__ import annotations

import torch

from .tokens import LatentIds


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


def check_num_thoughts(k, index) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"num_thoughts[{index}] must be an integer >= 0, got {k!r}")


NUM_THOUGHTS_FORMS = ("an integer >= 0 (thoughts appended to every prompt), a list of them (one per prompt), None "
                      "(the prompts carry their <bot> … <eot> blocks) or 'auto' (the switch head decides)")


def check_num_thoughts_arg(num_thoughts) -> None:
    """`num_thoughts` of generate: one of NUM_THOUGHTS_FORMS; anything else is a ValueError that says so."""
    if num_thoughts is None or (isinstance(num_thoughts, str) and num_thoughts == "auto"):
        return
    if isinstance(num_thoughts, (list, tuple)):
        for i, k in enumerate(num_thoughts):
            if k is not None:
                check_num_thoughts(k, i)
        return
    if isinstance(num_thoughts, int) and not isinstance(num_thoughts, bool) and num_thoughts >= 0:
        return
    hint = " (the learned count is spelled 'auto')" if isinstance(num_thoughts, str) and \
        num_thoughts.strip().lower() == "auto" else ""
    raise ValueError(f"num_thoughts must be {NUM_THOUGHTS_FORMS}; got {num_thoughts!r}{hint}")


def with_thoughts(prompt: list[int], k: int | None, ids: LatentIds, index: int) -> tuple[list[int], int]:
    """The prompt with its latent block and its number of thoughts: `k=None` keeps the blocks it carries (the
    official format); an int appends `<bot> <latent>*k <eot>` to a prompt without one."""
    carried = check_latent_blocks(prompt, ids, index)
    if k is None:
        return prompt, carried
    check_num_thoughts(k, index)
    if ids.start in prompt or ids.end in prompt:
        raise ValueError(
            f"input_ids row {index} already carries a <bot> … <eot> block; pass num_thoughts=None "
            "for prompts in the official format, or prompts without latent tokens with num_thoughts")
    return prompt + [ids.start] + [ids.latent] * k + [ids.end], k


def build_prompts(input_ids, attention_mask, num_thoughts, ids: LatentIds,
                  vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """The unpadded prompts of a padded batch with their latent blocks, and each prompt's number of thoughts."""
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
    counts = [num_thoughts] * B if num_thoughts is None or isinstance(num_thoughts, int) else list(num_thoughts)
    if len(counts) != B:
        raise ValueError(f"num_thoughts has {len(counts)} entries for a batch of {B} prompts")
    for b, k in enumerate(counts):
        if k is not None:
            check_num_thoughts(k, b)
    built = [with_thoughts(p, k, ids, b) for b, (p, k) in enumerate(zip(prompts, counts))]
    return [p for p, _ in built], [k for _, k in built]


def prompt_token_ids(prompt, num_thoughts: int | None, ids: LatentIds, tokenizer, vocab_size: int,
                     index: int) -> list[int]:
    """Token ids of one prompt (text or ids) with its `<bot><latent>*k<eot>` block (see `with_thoughts`)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"prompt {index} is text but there is no tokenizer; pass token ids")
        tokens = list(tokenizer(prompt)["input_ids"])
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        tokens = list(prompt)
    else:
        raise TypeError(f"prompt {index} must be a string or a list of token ids, got {type(prompt).__name__}")
    if not tokens:
        raise ValueError(f"prompt {index} is empty")
    check_token_ids(tokens, vocab_size, index)
    return with_thoughts(tokens, num_thoughts, ids, index)[0]


def left_pad(prompts: list[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as a left-padded batch: (input_ids, attention_mask)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding (left or right): 0, 1, 2, ... over the real tokens."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
