"""Evaluation during training: batched Coconut generation scored with the official metric, and the
validation loss.

Per question: the answer after the last '#' (commas removed) must equal the reference answer
(official accuracy); the text between the question line and the first '#' must equal the reference
steps joined by newlines (official CoT match); and the number of tokens generated after the
prompt, EOS included. Under torch.distributed the questions are split over the ranks, every rank's
backbone calls are kept in step, and the results are gathered on every rank.
"""
from __future__ import annotations

import contextlib
import random

import torch
from tqdm import tqdm

from ..data.curriculum import CurriculumConfig, build_eval_example, build_training_example
from ..data.records import TokenizedRecord, answer_matches, extract_answer, extract_cot
from ..prompts import left_pad
from .distributed import DistContext, SyncedForward, all_reduce, gather_objects


def up_to_eos(row: list[int], eos_id: int | None) -> list[int]:
    """Generated tokens up to and including the first EOS."""
    return row[: row.index(eos_id) + 1] if eos_id is not None and eos_id in row else row


def score_sample(tokenizer, prompt: list[int], new: list[int], record: dict, idx: int, latent_id: int) -> dict:
    """One question's outcome, from the decoded prompt + generated tokens, as the official runner scores it."""
    text = tokenizer.decode(prompt + new, skip_special_tokens=True)
    reference_cot = "\n".join(record["steps"])
    return {
        "idx": idx,
        "num_thoughts": sum(t == latent_id for t in prompt),
        "text": text,
        "generated": tokenizer.decode(new, skip_special_tokens=True),
        "predicted_answer": extract_answer(text),
        "answer": record["answer"],
        "correct": answer_matches(text, record["answer"]),
        "cot_match": extract_cot(text) == reference_cot,
        "generated_tokens": len(new),
    }


def evaluate_generation(coconut, records: list[dict], tokenized: list[TokenizedRecord], stage: int,
                        curriculum: CurriculumConfig, batch_size: int = 16, max_new_tokens: int = 128,
                        ctx: DistContext | None = None, progress: bool = True, auto_thoughts: int | None = None,
                        switch_threshold: float = 0.5) -> dict:
    """Generate an answer for every record at `stage` and score it; the same result on every rank.

    Returns accuracy, cot_match, generated_tokens (mean), num_samples, stage, forward_calls and
    dummy_calls (this rank's backbone calls, and how many of them only kept step with other ranks),
    and the per-question `samples` (with the decoded `text`), ordered by record index. `mean_thoughts` is the
    mean number of thoughts per question: the stage's fixed count, or with `auto_thoughts=K` (needs the
    model's switch head) the count each question's head chose (at most K) for its question alone.
    """
    ctx = ctx or DistContext(device=coconut.device)
    tok, ids = coconut.tokenizer, coconut.latent_ids
    mine = list(range(ctx.rank, len(records), ctx.world_size))
    was_training = coconut.training
    coconut.eval()
    samples = []
    bar = tqdm(total=len(mine), desc=f"eval stage {stage}", disable=not (progress and ctx.is_main), leave=False)
    with torch.no_grad(), SyncedForward(coconut, ctx) as sync:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            if auto_thoughts is None:
                prompts = [build_eval_example(tokenized[i], stage, curriculum, ids)["input_ids"] for i in chunk]
                input_ids, mask = left_pad(prompts, tok.pad_token_id, ctx.device)
                out = coconut.generate(input_ids, mask, max_new_tokens=max_new_tokens, return_dict_in_generate=True)
            else:
                input_ids, mask = left_pad([tokenized[i].question for i in chunk], tok.pad_token_id, ctx.device)
                out = coconut.generate(input_ids, mask, num_thoughts="auto", max_thoughts=auto_thoughts,
                                       switch_threshold=switch_threshold, max_new_tokens=max_new_tokens,
                                       return_dict_in_generate=True)
                prompts = [tokenized[i].question + [ids.start] + [ids.latent] * k + [ids.end]
                           for i, k in zip(chunk, out.num_thoughts.tolist())]
            rows = out.sequences[:, out.prompt_length :].tolist()
            for i, prompt, row in zip(chunk, prompts, rows):
                samples.append(score_sample(tok, prompt, up_to_eos(row, tok.eos_token_id), records[i], i, ids.latent))
            bar.update(len(chunk))
    bar.close()
    coconut.train(was_training)
    samples = sorted((s for part in gather_objects(samples, ctx) for s in part), key=lambda s: s["idx"])
    n = max(len(samples), 1)
    return {
        "stage": stage,
        "num_samples": len(samples),
        "accuracy": sum(s["correct"] for s in samples) / n,
        "cot_match": sum(s["cot_match"] for s in samples) / n,
        "generated_tokens": sum(s["generated_tokens"] for s in samples) / n,
        "mean_thoughts": sum(s["num_thoughts"] for s in samples) / n,
        "forward_calls": sync.forward_calls,
        "dummy_calls": sync.dummy_calls,
        "samples": samples,
    }


def evaluate_loss(coconut, tokenized: list[TokenizedRecord], stage: int, curriculum: CurriculumConfig, collate,
                  batch_size: int, ctx: DistContext | None = None, rng=None, forward_options: dict | None = None,
                  autocast=None) -> float:
    """Token-weighted mean cross-entropy of the validation set in the stage's training format.

    `autocast` is a callable returning the forward's autocast context (or None)."""
    ctx = ctx or DistContext(device=coconut.device)
    rng = rng or random.Random(0)
    examples = [build_training_example(r, stage, curriculum, coconut.latent_ids, rng) for r in tokenized]
    mine = examples[ctx.rank :: ctx.world_size]
    was_training = coconut.training
    coconut.eval()
    total, count = 0.0, 0
    with torch.no_grad(), SyncedForward(coconut, ctx):
        for start in range(0, len(mine), batch_size):
            batch = collate(mine[start : start + batch_size])
            batch = {k: v.to(ctx.device) for k, v in batch.items() if k != "idx"}
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            with autocast() if autocast is not None else contextlib.nullcontext():
                loss = coconut(**batch, **(forward_options or {})).loss
            total += float(loss) * n
            count += n
    coconut.train(was_training)
    total, count = all_reduce([total, count], ctx)
    return total / count if count else float("nan")
