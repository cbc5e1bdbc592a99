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


def fixed_vs_learned(model, records: list[dict], num_thoughts: int, batch_size: int = 16, max_new_tokens: int = 64,
                     threshold: float = 0.5) -> dict:
    """Answer accuracy and mean thoughts per question: always `num_thoughts` thoughts (fixed padding) against
    the model's switch head choosing up to `num_thoughts` (learned switch), greedy, full answers."""
    from ..data.records import answer_matches, tokenize_record
    from ..prompts import left_pad

    if getattr(model, "switch_head", None) is None:
        raise ValueError("the learned switch needs a model with a switch head (saved with one)")
    tokenizer = model.tokenizer
    rows = {"fixed": [], "learned": []}
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        prompts = [tokenize_record(r, tokenizer, start + j).question for j, r in enumerate(batch)]
        ids, mask = left_pad(prompts, tokenizer.pad_token_id, model.device)
        for name, options in (("fixed", dict(num_thoughts=num_thoughts)),
                              ("learned", dict(num_thoughts="auto", max_thoughts=num_thoughts,
                                               switch_threshold=threshold))):
            out = model.generate(ids, mask, max_new_tokens=max_new_tokens, return_dict_in_generate=True, **options)
            texts = tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
            for record, text, k in zip(batch, texts, out.num_thoughts.tolist()):
                rows[name].append((answer_matches(text, record["answer"]), k))
    n = max(len(records), 1)
    return {name: {"accuracy": sum(c for c, _ in r) / n, "mean_thoughts": sum(k for _, k in r) / n,
                   "thought_counts": [k for _, k in r]}
            for name, r in rows.items()} | {"threshold": threshold, "max_thoughts": num_thoughts}
