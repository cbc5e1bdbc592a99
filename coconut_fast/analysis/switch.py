"""Switch to language after k thoughts: close the latent block early and read the next step in words."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def stop_token_ids(tokenizer) -> list[int]:
    """Tokens that end a language step: every token whose text holds a newline, and EOS."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    stops = {i for i, t in enumerate(texts) if "\n" in t}
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    return sorted(stops)


@dataclass
class Step:
    """The language a sample produced after its thoughts, up to the end of the first step."""

    num_thoughts: int
    token_ids: list[int]  # new tokens, the stop token included when one came
    text: str  # the step's text without the newline that ends it
    stopped: bool  # False: the token budget ran out first


def read_steps(tokenizer, sequences: torch.Tensor, prompt_length: int, num_thoughts: int, stop_ids) -> list[Step]:
    """The first language step of each row of a `generate` output that stopped at `stop_ids`."""
    stops = set(stop_ids)
    steps = []
    for row in sequences[:, prompt_length:].tolist():
        end = next((j for j, t in enumerate(row) if t in stops), None)
        ids = row if end is None else row[: end + 1]
        words = [t for t in ids if t != tokenizer.eos_token_id]
        text = tokenizer.decode(words).split("\n")[0].strip()
        steps.append(Step(num_thoughts, ids, text, end is not None))
    return steps


def switch_steps(model, input_ids, attention_mask, num_thoughts: int, max_step_tokens: int, stop_ids, pad_token_id):
    """Greedy first language step of every prompt after exactly `num_thoughts` thoughts, then `<eot>`."""
    out = model.generate(
        input_ids, attention_mask, num_thoughts=num_thoughts, max_new_tokens=max_step_tokens,
        eos_token_id=stop_ids, pad_token_id=pad_token_id, return_dict_in_generate=True,
    )
    return read_steps(model.tokenizer, out.sequences, out.prompt_length, num_thoughts, stop_ids)
