"""Records in the official Coconut JSON format, their tokenization, and the answer metric."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TokenizedRecord:
    """Token ids of one record, split the way the curriculum needs them."""

    question: list[int]
    steps: list[list[int]]
    answer: list[int]
    idx: int = 0


def _check_record(record: object, i: int) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"record {i}: expected an object, got {type(record).__name__}")
    for key in ("question", "answer"):
        if key not in record:
            raise ValueError(f"record {i}: missing key {key!r}")
        if not isinstance(record[key], str):
            raise ValueError(f"record {i}: key {key!r} must be a string, got {type(record[key]).__name__}")
    if "steps" not in record:
        raise ValueError(f"record {i}: missing key 'steps'")
    steps = record["steps"]
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise ValueError(f"record {i}: key 'steps' must be a list of strings")


def load_records(path: str | Path) -> list[dict]:
    """Load a JSON list of {question, steps, answer, ...}; extra fields are kept as they are."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        _check_record(record, i)
    return data


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; the answer must end with eos")
    return eos


def tokenize_record(record: dict, tokenizer, idx: int = 0) -> TokenizedRecord:
    """Tokenize question, each step and the answer separately, as the official dataset does."""
    _check_record(record, idx)
    question = tokenizer.encode(record["question"] + "\n", add_special_tokens=True)
    steps = [tokenizer.encode(s + "\n", add_special_tokens=False) for s in record["steps"]]
    answer = tokenizer.encode("### " + record["answer"], add_special_tokens=False) + [_eos_id(tokenizer)]
    return TokenizedRecord(question=question, steps=steps, answer=answer, idx=idx)


def check_tokenization(record: dict, tokenizer, idx: int = 0) -> TokenizedRecord:
    """Raise ValueError unless tokenizing the parts separately equals tokenizing the whole text."""
    rec = tokenize_record(record, tokenizer, idx)
    whole = record["question"] + "\n" + "\n".join(record["steps"]) + "\n### " + record["answer"]
    expected = tokenizer.encode(whole, add_special_tokens=True) + [_eos_id(tokenizer)]
    got = rec.question + [t for step in rec.steps for t in step] + rec.answer
    if got != expected:
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        raise ValueError(
            f"record {idx}: tokenizing question/steps/answer separately does not match tokenizing the "
            f"whole text (first difference at token {at}: parts={got[at:at + 5]} whole={expected[at:at + 5]}); "
            "the latent curriculum would splice inconsistent token sequences"
        )
    return rec


def extract_answer(text: str) -> str:
    """The text after the last '#', without commas, stripped (official metric)."""
    return text.split("#")[-1].replace(",", "").strip()


def extract_cot(text: str) -> str:
    """The reasoning chain: everything after the first line and before the first '#'."""
    return "\n".join(text.split("\n")[1:]).split("#")[0].strip()


def answer_matches(generated_text: str, reference_answer: str) -> bool:
    """Exact match of the extracted answer with the comma-free, stripped reference."""
    return extract_answer(generated_text) == reference_answer.replace(",", "").strip()
